"""deqir: Deep Equilibrium Diffusion Restoration (docs/api.md for the Python API, docs/app.md for invert.py).

>>> import deqir
>>> deqir.__version__
'0.1.0'
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["RestoreResult", "Restorer", "__version__", "compose_config", "evaluate", "generate", "restore"]

if TYPE_CHECKING:
    from deqir.api import Restorer, RestoreResult, compose_config, evaluate, generate, restore


def __getattr__(name: str) -> Any:
    """The API is imported on first use, so ``import deqir`` stays light (no Hydra/Lightning import)."""
    if name in ("Restorer", "RestoreResult", "compose_config", "evaluate", "generate", "restore"):
        from deqir import api

        return getattr(api, name)
    raise AttributeError(f"module 'deqir' has no attribute {name!r}")
