"""Objects from ``_target_`` configs (trainer, loggers, callbacks) with one-line errors for bad keys."""
from __future__ import annotations

from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException


def build_callbacks(callbacks_cfg: dict[str, Any] | None) -> list[pl.Callback]:
    """Extra callbacks from ``callbacks:`` (name -> ``_target_`` config; a null entry is skipped)."""
    return [instantiate_strict(f"callbacks.{name}", c) for name, c in (callbacks_cfg or {}).items() if c]


def instantiate_strict(key: str, cfg: dict[str, Any], **kwargs):
    """``hydra.utils.instantiate`` with one-line ValueErrors (no ``_target_``, unknown or bad arguments)."""
    if not isinstance(cfg, dict) or "_target_" not in cfg:
        raise ValueError(f"{key} needs a _target_ (a class path, e.g. pytorch_lightning.Trainer), got {cfg!r}")
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        text = " ".join(ln.strip() for ln in str(cause).splitlines() if ln.strip() and "full_key" not in ln)
        raise ValueError(f"cannot build {key} ({cfg['_target_']}): {text}") from None
