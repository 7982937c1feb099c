"""The known model configs and matching a state dict to an architecture (docs/models.md).

:data:`KNOWN_MODELS` lists the public checkpoints and the embedded default; :func:`fitting_configs` names
the configs whose keys and shapes equal a state dict's, which is what a mismatch error suggests;
:func:`load_weights` copies a state dict into a model with that one-line error; :func:`init_random_` is the
deterministic random initialisation of the checkpoint manifests.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deqir.models.factory import build_model

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "celeba_hq_ddpm": {
        "arch": "ddpm", "file": "celeba_hq.ckpt", "what": "SDEdit CelebA-HQ 256 DDPM",
        "url": "https://image-editing-test-12345.s3-us-west-2.amazonaws.com/checkpoints/celeba_hq.ckpt",
        "config": {"ch": 128, "out_ch": 3, "ch_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2,
                   "attn_resolutions": [16], "dropout": 0.0, "resamp_with_conv": True, "in_channels": 3,
                   "resolution": 256},
    },
    "imagenet256_adm": {
        "arch": "adm", "file": "256x256_diffusion_uncond.pt", "what": "guided-diffusion ImageNet 256 unconditional",
        "url": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
        "config": {"image_size": 256, "in_channels": 3, "model_channels": 256, "out_channels": 6,
                   "num_res_blocks": 2, "attention_resolutions": [8, 16, 32], "dropout": 0.0,
                   "channel_mult": [1, 1, 2, 2, 4, 4], "conv_resample": True, "num_classes": None,
                   "use_checkpoint": False, "use_fp16": True, "num_heads": 4, "num_head_channels": 64,
                   "num_heads_upsample": -1, "use_scale_shift_norm": True, "resblock_updown": True,
                   "use_new_attention_order": False},
    },
    "default": {
        "arch": "ddpm", "file": "default_ema_fp16.pt", "what": "deqir's embedded natural-image patch prior",
        "url": None,
        "config": {"ch": 32, "out_ch": 3, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [],
                   "dropout": 0.0, "resamp_with_conv": True, "in_channels": 3, "resolution": 32, "mid_attn": False},
    },
}


def _meta_model(arch: str, config: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return build_model(arch, **config)


def _shapes(sd: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def known_model_configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """``{name: (arch, config)}`` of :data:`KNOWN_MODELS` plus the repository's ``conf/model/*.yaml``."""
    out = {name: (m["arch"], dict(m["config"])) for name, m in KNOWN_MODELS.items()}
    conf_dir = Path(__file__).resolve().parents[2] / "conf" / "model"
    if conf_dir.is_dir():
        from omegaconf import OmegaConf

        for path in sorted(conf_dir.glob("*.yaml")):
            try:  # only a source of hints: a yaml that does not parse is simply not a candidate
                cfg = OmegaConf.load(path)
                arch, config = cfg.get("arch"), cfg.get("config")
                if arch in ("ddpm", "adm") and config is not None and path.stem not in out:
                    out[path.stem] = (arch, OmegaConf.to_container(config, resolve=True))
            except Exception:  # noqa: BLE001
                continue
    return out


def fitting_configs(shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> list[str]:
    """Names of the known configs whose state-dict keys and shapes equal ``shapes`` exactly."""
    names = []
    for name, (a, config) in known_model_configs().items():
        if arch not in (None, a):
            continue
        try:
            candidate = _shapes(_meta_model(a, config).state_dict())
        except (TypeError, ValueError):  # a yaml config the constructor rejects fits nothing
            continue
        if candidate == dict(shapes):
            names.append(name)
    return names


def _mismatch_error(where: str, arch: str, expected: Mapping[str, tuple], got: Mapping[str, tuple],
                    info: Mapping[str, Any]) -> ValueError:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and expected[k] != got[k]]

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")

    shapes = [f"{k}: file {got[k]} vs model {expected[k]}" for k in wrong]
    parts = [f"{len(missing)} missing keys" + (f" ({first(missing)})" if missing else ""),
             f"{len(unexpected)} unexpected keys" + (f" ({first(unexpected)})" if unexpected else ""),
             f"{len(wrong)} shape mismatches" + (f" ({first(shapes)})" if wrong else "")]
    hint = ""
    if info.get("arch") and info.get("config") is not None:
        hint = (f" The file records arch {info['arch']!r} with config {info['config']}; set config to null "
                f"(model.config=null) to use it.")
    else:
        fits = fitting_configs(got)
        if fits:
            archs = {n: a for n, (a, _) in known_model_configs().items()}
            hint = " It fits the known model config " + " / ".join(f"{n!r} (arch {archs[n]!r})" for n in fits) + \
                   f": use model={fits[0]}."
        else:
            hint = (f" No known model config fits it (checked: {', '.join(known_model_configs())}); pass the arch "
                    "and config it was trained with.")
    return ValueError(f"checkpoint {where} does not fit arch {arch!r} with the given config: " + ", ".join(parts)
                      + "." + hint)


def load_weights(net: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True, where: str = "",
                 arch: str = "", info: Mapping[str, Any] | None = None) -> nn.Module:
    """Copy ``state_dict`` into ``net`` (cast to each parameter's dtype) with a clear error on mismatch.

    A meta-device ``net`` receives the tensors by assignment (no second copy of the weights in memory).
    """
    target = net.state_dict()
    expected, got = _shapes(target), _shapes(state_dict)
    bad_shapes = any(k in got and got[k] != s for k, s in expected.items())
    if bad_shapes or (strict and expected.keys() != got.keys()):
        raise _mismatch_error(where, arch, expected, got, info or {})
    cast = {k: v.to(target[k].dtype) for k, v in state_dict.items() if k in target}
    meta = any(t.is_meta for t in target.values())
    net.load_state_dict(cast, strict=strict, assign=meta)
    return net


def init_random_(net: nn.Module, seed: int = 0) -> nn.Module:
    """The manifests' "scaled" initialisation: walk the state dict in order with one generator.

    weights with ndim >= 2: z / sqrt(fan_in); 1-d ``*weight`` (norm gains): 1 + 0.1 z; other 1-d: 0.1 z;
    each value rounded to float16 precision. Deterministic across machines (z = randn on CPU).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in net.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            z = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if t.ndim >= 2:
                z = z / (t.numel() // t.shape[0]) ** 0.5
            elif key.endswith("weight"):
                z = 1 + 0.1 * z
            else:
                z = 0.1 * z
            t.copy_(z.half().float())
    return net


def missing_checkpoint_error(path: Path, arch: str | None, config: Mapping[str, Any] | None) -> FileNotFoundError:
    """FileNotFoundError that names the public download address of a known checkpoint and where to put it."""
    known = next((m for m in KNOWN_MODELS.values() if m["file"] == path.name), None)
    if known is None and config is not None:
        known = next((m for m in KNOWN_MODELS.values()
                      if m["arch"] == arch and json.dumps(m["config"], sort_keys=True)
                      == json.dumps(_plain(config), sort_keys=True)), None)
    where = path.expanduser().absolute()
    if known is not None and known["url"]:
        return FileNotFoundError(f"checkpoint not found: {where}. Download {known['file']} ({known['what']}) from "
                                 f"{known['url']} and save it as {where}, or set model.ckpt_path to your copy.")
    return FileNotFoundError(f"checkpoint not found: {where}. Set model.ckpt_path to an existing file "
                             f"(or 'random' for random weights).")


def _plain(obj: Any) -> Any:
    """Mappings -> dict, sequences (also OmegaConf containers) -> list, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj
