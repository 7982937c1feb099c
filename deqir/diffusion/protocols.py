"""The two contracts the samplers are written against."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class EpsModel(Protocol):
    """eps = model(x, t): x (B, C, H, W) on [-1, 1], t (B,) integer timesteps -> eps (B, C, H, W)."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


@runtime_checkable
class LinearOperator(Protocol):
    """Degradation y = A x. ``A_pinv`` is the Moore-Penrose pseudo-inverse back to image space."""

    def A(self, x: Tensor) -> Tensor: ...

    def A_pinv(self, y: Tensor) -> Tensor: ...

    def A_adjoint(self, y: Tensor) -> Tensor: ...
