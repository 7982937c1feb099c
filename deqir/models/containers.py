"""Reading checkpoint files and finding the weights inside them (docs/models.md).

Every checkpoint is read with ``torch.load(..., weights_only=True)`` (or safetensors): a checkpoint never
executes code. :func:`extract_state_dict` recognises deqir's own model file (:mod:`deqir.models.export`),
our Lightning training checkpoints (EMA weights preferred), DDIM-style training lists, dicts nesting the
weights under ``ema``/``ema_model``/``model``/``state_dict``... and flat state dicts, and strips
``module.`` / ``_orig_mod.`` prefixes.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqir.models.export import FORMAT
from deqir.models.safe_read import describe_refused, load_safetensors, quiet_torch_load

# Classes allowed on top of torch's weights-only set. TorchVersion is a ``str`` subclass that creeps into
# metadata as ``torch.__version__`` (files written by export.py before its metadata was stringified).
_SAFE_GLOBALS = [torch.torch_version.TorchVersion]
# Where training code nests the weights, EMA copies first.
_NESTED_KEYS = ("ema", "ema_model", "ema_state_dict", "model_ema", "state_dict", "model", "model_state_dict", "net")


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
