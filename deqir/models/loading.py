"""Build ε-models and load their weights safely: :func:`load_eps_model` (docs/models.md).

Reading files and finding the weights in them: :mod:`deqir.models.containers`; the known model configs and
matching a state dict to an architecture: :mod:`deqir.models.known`. Loading is strict by default; a
mismatch raises one ``ValueError`` that names the counts, the first keys and the known model config that
would fit.

Special ``ckpt_path`` values: ``None`` = the weights packaged with deqir (the embedded default model,
``deqir/weights/default_ema_fp16.pt``); ``"random"`` = no checkpoint, the deterministic "scaled" random
initialisation of the checkpoint manifests with ``seed`` (tests, benchmarks).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deqir.models.adapters import DiffusersEps, EpsModel, diffusers_schedule
from deqir.models.containers import extract_state_dict, read_checkpoint
from deqir.models.factory import build_model
from deqir.models.known import (
    KNOWN_MODELS,
    _meta_model,
    _plain,
    _shapes,
    fitting_configs,
    init_random_,
    known_model_configs,
    load_weights,
    missing_checkpoint_error,
)

__all__ = [
    "DEFAULT_SCHEDULE", "KNOWN_MODELS", "RANDOM", "SOURCES", "extract_state_dict", "fitting_configs", "init_random_",
    "known_model_configs", "load_eps_model", "load_weights", "missing_checkpoint_error", "packaged_default_path",
    "parse_dtype", "read_checkpoint",
]

RANDOM = "random"
SOURCES = ("auto", "deqir", "lightning", "ddpm_ckpt", "guided_diffusion", "diffusers")
DEFAULT_SCHEDULE = {"name": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


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
