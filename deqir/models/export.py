"""deqir's own eps-model file format: one ``torch.save`` dict that loads with ``weights_only=True``.

    {"format": "deqir-eps-model", "version": 1, "arch": "ddpm" | "adm", "config": {constructor kwargs},
     "schedule": {"name", "num_steps", "beta_start", "beta_end"}, "meta": {...}, "state_dict": {...}}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deqir.utils.images import atomic_write_bytes

FORMAT = "deqir-eps-model"


def save_eps_model(
    path: str | Path,
    arch: str,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    schedule: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write atomically (temp file + rename); ``dtype`` casts floating tensors (fp16 halves the size)."""
    path = Path(path)
    sd = {k: (v.detach().to("cpu", dtype) if (dtype is not None and v.is_floating_point()) else v.detach().cpu())
          for k, v in state_dict.items()}
    payload = {
        "format": FORMAT,
        "version": 1,
        "arch": arch,
        "config": _plain(config),
        "schedule": _plain(schedule or {"name": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}),
        "meta": _plain(meta or {}),
        "state_dict": sd,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, lambda tmp: torch.save(payload, tmp))


def _plain(obj: Any) -> Any:
    """Lists/dicts/scalars only (``weights_only`` loading refuses arbitrary objects)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None:
        return None
    for kind in (bool, int, float, str):  # exact builtins: subclasses (TorchVersion, numpy scalars) are refused by
        if isinstance(obj, kind):         # weights_only loading
            return kind(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _plain(obj.item())
    raise TypeError(f"cannot store {type(obj).__name__} in a deqir model file")
