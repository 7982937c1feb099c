"""Build ε-models and load their weights safely.

Every checkpoint is read with ``torch.load(..., weights_only=True)`` (or safetensors): a checkpoint
never executes code. Accepted containers: deqir's own model file (:mod:`deqir.models.export`), our
Lightning training checkpoints (EMA weights preferred), DDIM-style training lists, dicts nesting the
weights under ``ema``/``ema_model``/``model``/``state_dict``..., and flat state dicts, with ``module.``
/ ``_orig_mod.`` prefixes stripped. Loading is strict by default; a mismatch raises one ``ValueError``
that names the counts, the first keys and the known model config that would fit.

Special ``ckpt_path`` values: ``None`` = the weights packaged with deqir (the embedded default model,
``deqir/weights/default_ema_fp16.pt``); ``"random"`` = no checkpoint, the deterministic "scaled" random
initialisation of the checkpoint manifests with ``seed`` (tests, benchmarks).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deqir.models.adapters import DiffusersEps, EpsModel, diffusers_schedule
from deqir.models.export import FORMAT
from deqir.models.factory import build_model
from deqir.models.safe_read import describe_refused, load_safetensors, quiet_torch_load

RANDOM = "random"
# Classes allowed on top of torch's weights-only set. TorchVersion is a ``str`` subclass that creeps into
# metadata as ``torch.__version__`` (files written by export.py before its metadata was stringified).
_SAFE_GLOBALS = [torch.torch_version.TorchVersion]
# Where training code nests the weights, EMA copies first.
_NESTED_KEYS = ("ema", "ema_model", "ema_state_dict", "model_ema", "state_dict", "model", "model_state_dict", "net")
SOURCES = ("auto", "deqir", "lightning", "ddpm_ckpt", "guided_diffusion", "diffusers")
DEFAULT_SCHEDULE = {"name": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

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


def packaged_default_path() -> Path:
    """Where the embedded default weights live inside the installed package."""
    return Path(str(resources.files("deqir").joinpath("weights", KNOWN_MODELS["default"]["file"])))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------------
# reading and unpacking checkpoints


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, or safetensors for ``*.safetensors``.

    Raises:
        FileNotFoundError: no such file (see :func:`missing_checkpoint_error` for the helpful variant).
        ValueError: the file needs full unpickling (refused) or is not a checkpoint at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        return quiet_torch_load(path, _SAFE_GLOBALS)
    except (pickle.UnpicklingError, struct.error, IndexError, KeyError, TypeError) as err:  # the unpickler's
        raise ValueError(describe_refused(path, str(err))) from None  # errors on odd or cut-off streams
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _tensor_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return sum(isinstance(v, Tensor) for v in obj.values()) * 2 > len(obj)


def extract_state_dict(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Find the weights in a loaded checkpoint.

    Returns:
        (state_dict, info): a flat ``{key: tensor}`` without wrapper prefixes, and ``info`` with ``kind``
        (what was found) plus ``arch``/``config``/``schedule`` when the file records them.
    """
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        sd = obj["state_dict"]
        info = {"kind": "deqir model file", "arch": obj.get("arch"), "config": obj.get("config"),
                "schedule": obj.get("schedule")}
    elif isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        sd, hp = obj["state_dict"], obj["hyper_parameters"]
        info = {"kind": "Lightning checkpoint"}
        if isinstance(hp, Mapping) and "arch" in hp and "model_config" in hp:
            info.update(arch=hp["arch"], config=dict(hp["model_config"]), schedule=hp.get("schedule"))
    elif isinstance(obj, (list, tuple)):
        # DDIM-style training checkpoint: [model, optimizer, epoch, step, ema]
        if len(obj) == 5 and _tensor_dict(obj[4]):
            sd, info = obj[4], {"kind": "training list (EMA entry)"}
        elif obj and _tensor_dict(obj[0]):
            sd, info = obj[0], {"kind": "training list (first entry)"}
        else:
            raise ValueError("checkpoint is a list without a state dict")
    elif _tensor_dict(obj):
        sd, info = obj, {"kind": "state dict"}
    elif isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if _tensor_dict(obj.get(key)):
                sd, info = obj[key], {"kind": f"nested {key!r} entry"}
                break
        else:
            raise ValueError(f"no state dict found in the checkpoint (top-level keys: {list(obj)[:8]})")
    else:
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    return _strip_prefixes({k: v for k, v in sd.items() if isinstance(v, Tensor)}, info), info


def _strip_prefixes(sd: dict[str, Tensor], info: dict[str, Any]) -> dict[str, Tensor]:
    for wanted in ("ema.", "model_ema."):  # Lightning module with a raw and an EMA copy: prefer the EMA one
        if any(k.startswith(wanted) for k in sd) and not all(k.startswith(wanted) for k in sd):
            sd = {k: v for k, v in sd.items() if k.startswith(wanted)}
            info["kind"] += ", EMA weights"
            break
    prefixes = ("module.", "_orig_mod.", "ema.", "model_ema.", "model.", "net.")
    while sd and (p := next((p for p in prefixes if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------------------
# matching state dicts to architectures


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


# ---------------------------------------------------------------------------------------------------------
# the public entry point


def load_eps_model(
    arch: str | None = None,
    config: Mapping[str, Any] | None = None,
    ckpt_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    source: str = "auto",
    strict: bool = True,
    seed: int = 0,
    schedule: Mapping[str, Any] | None = None,
    name: str | None = None,
    hub_id: str | None = None,
    subfolder: str | None = None,
) -> EpsModel:
    """Build an ε-model and load its weights; the keyword names are the ``conf/model/*.yaml`` keys.

    Args:
        arch: ``"ddpm"`` (:class:`DDPMUNet`), ``"adm"`` (:class:`ADMUNet`) or ``"diffusers"``; None = from the
            file or the default model.
        config: constructor kwargs with the reference names; None = recorded in the file, else the unique
            known config whose keys and shapes fit the checkpoint.
        ckpt_path: checkpoint file; None = the packaged default weights; ``"random"`` = scaled random init
            with ``seed``; for diffusers a local directory (or None to use ``hub_id``).
        dtype: autocast dtype of the forward pass (``float32`` | ``bfloat16`` | ``float16``); output is float32.
        device: where the model lives. source: informational (``auto`` detects the container).
        strict: require exactly the model's keys. schedule: overrides the recorded noise schedule.
        name: label for :meth:`EpsModel.describe`. hub_id, subfolder: diffusers ``from_pretrained`` arguments.

    Returns:
        :class:`EpsModel` in eval mode with frozen parameters (``requires_grad_(True)`` to fine-tune):
        ``eps = model(x, t)``, (B, C, H, W) float32. Gradients with respect to ``x`` still flow.

    Raises:
        FileNotFoundError: missing checkpoint (names the download address of known checkpoints).
        ValueError: mismatching checkpoint, non-weights-only pickle, unknown option.

    Examples:
        >>> model = load_eps_model("ddpm", {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
        ...                                 "attn_resolutions": [], "resolution": 32}, "random")
        >>> model(torch.zeros(1, 3, 32, 32), torch.tensor([500])).shape
        torch.Size([1, 3, 32, 32])
    """
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r}; valid: {', '.join(SOURCES)}")
    compute_dtype = parse_dtype(dtype)
    config = None if config is None else _plain(config)
    if arch == "diffusers" or source == "diffusers":
        net, in_ch, rec = _load_diffusers(config, ckpt_path, hub_id, subfolder, seed, strict)
        found_schedule = rec.pop("schedule", None)
        info = {"name": name or "diffusers", "arch": "diffusers", "source": "diffusers", **rec}
        return _finish(net, in_ch, compute_dtype, device, info, schedule or found_schedule)

    if ckpt_path is not None and str(ckpt_path) == RANDOM:
        if arch is None or config is None:
            raise ValueError("ckpt_path='random' needs an explicit arch and config")
        with torch.device("meta"):
            net = build_model(arch, **config)
        net = init_random_(net.to_empty(device="cpu"), seed)
        info = {"name": name, "arch": arch, "config": config, "source": "random", "ckpt_path": RANDOM, "seed": seed}
        return _finish(net, _in_channels(net), compute_dtype, device, info, schedule)

    if ckpt_path is None:
        if arch not in (None, KNOWN_MODELS["default"]["arch"]):
            raise ValueError(f"ckpt_path=None selects the packaged default weights (arch 'ddpm'), not arch "
                             f"{arch!r}: set ckpt_path to a checkpoint file or 'random'")
        path = packaged_default_path()
        if not path.is_file():
            raise FileNotFoundError(f"the packaged default weights are missing: {path}; reinstall deqir, or set "
                                    f"model.ckpt_path to a checkpoint file (or 'random')")
        name = name or "default"
    else:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise missing_checkpoint_error(path, arch, config)

    sd, found = extract_state_dict(read_checkpoint(path))
    arch, config = _resolve_arch_config(arch, config, sd, found, path)
    if strict:
        net = load_weights(_meta_model(arch, config), sd, where=str(path), arch=arch, info=found)
    else:
        net = load_weights(build_model(arch, **config), sd, strict=False, where=str(path), arch=arch, info=found)
    info = {"name": name, "arch": arch, "config": config, "source": source if source != "auto" else found["kind"],
            "ckpt_path": str(path)}
    return _finish(net, _in_channels(net), compute_dtype, device, info, schedule or found.get("schedule"))


def _resolve_arch_config(arch: str | None, config: dict | None, sd: Mapping[str, Tensor], found: Mapping[str, Any],
                         path: Path) -> tuple[str, dict]:
    if config is not None:
        if arch is None:
            if found.get("arch") is None:
                raise ValueError(f"a config was given for {path} without its arch; set arch ('ddpm' or 'adm')")
            arch = found["arch"]
        return arch, config
    if found.get("config") is not None and arch in (None, found.get("arch")):
        return found["arch"], _plain(found["config"])
    fits = fitting_configs(_shapes(sd), arch)
    if len(fits) >= 1:
        return known_model_configs()[fits[0]]
    raise ValueError(f"cannot tell the architecture of {path}: no config given, none recorded in the file and no "
                     f"known model config fits its {len(sd)} tensors; pass arch and config")


def _in_channels(net: nn.Module) -> int:
    return int(getattr(net, "in_channels"))


def _finish(net: nn.Module, in_channels: int, compute_dtype: torch.dtype, device: str | torch.device,
            info: dict[str, Any], schedule: Mapping[str, Any] | None) -> EpsModel:
    model = EpsModel(net, in_channels, compute_dtype, info={k: v for k, v in info.items() if v is not None},
                     schedule=dict(schedule) if schedule else DEFAULT_SCHEDULE)
    return model.to(device).eval().requires_grad_(False)


def _load_diffusers(config: dict | None, ckpt_path: str | os.PathLike | None, hub_id: str | None,
                    subfolder: str | None, seed: int, strict: bool) -> tuple[nn.Module, int, dict[str, Any]]:
    if ckpt_path is not None and (str(ckpt_path) == RANDOM or Path(ckpt_path).expanduser().is_file()):
        if not config:
            raise ValueError("a diffusers model from a weights file or 'random' needs its UNet2DModel config")
        from diffusers import UNet2DModel

        net = DiffusersEps(UNet2DModel(**config))
        if str(ckpt_path) == RANDOM:
            init_random_(net.unet, seed)
        else:
            sd, found = extract_state_dict(read_checkpoint(ckpt_path))
            load_weights(net.unet, sd, strict=strict, where=str(ckpt_path), arch="diffusers", info=found)
        return net, net.in_channels, {"config": config, "ckpt_path": str(ckpt_path)}
    where = ckpt_path if ckpt_path is not None else hub_id
    if where is None:
        raise ValueError("a diffusers model needs ckpt_path (a local directory) or hub_id")
    if ckpt_path is not None and not Path(ckpt_path).expanduser().is_dir():
        raise FileNotFoundError(f"diffusers model directory not found: {Path(ckpt_path).expanduser().absolute()}; "
                                f"set model.ckpt_path to a saved UNet2DModel (or pipeline) directory, or use hub_id")
    try:
        net = DiffusersEps.from_pretrained(str(where), subfolder=subfolder)
    except OSError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(f"could not load a diffusers UNet2DModel from {where!r}: {first_line}; without "
                                f"internet, download it once or point model.ckpt_path at a local copy") from None
    rec: dict[str, Any] = {"ckpt_path": str(where), "config": dict(net.unet.config)}
    rec["schedule"] = diffusers_schedule(Path(str(where)).expanduser())
    return net, net.in_channels, rec
