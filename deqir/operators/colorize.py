"""Colorization: y = sum_c w_c x_c, (B, C, H, W) -> (B, 1, H, W)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deqir.operators.base import SVDOperator, cast

LUMA_WEIGHTS = {
    "equal": (1 / 3, 1 / 3, 1 / 3),  # the paper / official code (0.3333, 0.3334, 0.3333), docs/operators.md
    "bt601": (0.299, 0.587, 0.114),
}


class Colorization(SVDOperator):
    """Grayscale projection with luma weights w.

    A+ y = w y / |w|^2, A^T y = w y; one singular value |w| per pixel (``pinv_noise_gain() = 1 / |w|``,
    sqrt(3) for equal weights). SVD: per pixel the orthonormal basis (w / |w|, two complements) from a
    Householder reflection; the w-coordinates of all pixels come first.

    Args:
        image_shape: (C, H, W) with C = len(weights).
        luma_weights: ``"equal"`` (1/3 each, the paper), ``"bt601"`` (0.299, 0.587, 0.114) or C numbers.
    """

    def __init__(self, image_shape, luma_weights: str | Sequence[float] = "equal") -> None:
        super().__init__(image_shape)
        w = _weights(luma_weights)
        if w.numel() != self.image_shape[0]:
            raise ValueError(f"colorization of {self.image_shape[0]}-channel images needs {self.image_shape[0]} luma "
                             f"weights, got {w.numel()} ({luma_weights!r})")
        self.register_buffer("weights", w)
        self.register_buffer("_basis", _householder_basis(w))  # (C, C), column 0 = w / |w|

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return (1, *self.image_shape[1:])

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return torch.einsum("c,bchw->bhw", cast(self.weights, x), x).unsqueeze(1)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return cast(self.weights, y)[None, :, None, None] * y

    def A_pinv(self, y: Tensor) -> Tensor:
        w = cast(self.weights, y)
        return self.A_adjoint(y) / w.pow(2).sum()

    def y_to_image(self, y: Tensor) -> Tensor:
        """The gray image y / sum(w) in every channel."""
        self.check_measurement(y)
        return (y / cast(self.weights, y).sum()).expand(-1, self.image_shape[0], -1, -1).clone()

    def V_T(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return torch.einsum("ci,bchw->bihw", cast(self._basis, x), x).reshape(x.shape[0], -1)

    def V(self, z: Tensor) -> Tensor:
        coef = z.reshape(z.shape[0], *self.image_shape)
        return torch.einsum("ci,bihw->bchw", cast(self._basis, z), coef)

    def singulars(self) -> Tensor:
        h, w = self.image_shape[1:]
        return self.weights.norm().expand(h * w).clone()

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, luma_weights={[round(float(v), 4) for v in self.weights]}"


def _weights(luma_weights: str | Sequence[float]) -> Tensor:
    if isinstance(luma_weights, str):
        if luma_weights not in LUMA_WEIGHTS:
            raise ValueError(f"unknown luma_weights {luma_weights!r}; valid: {', '.join(LUMA_WEIGHTS)} or a list of "
                             f"one weight per channel")
        return torch.tensor(LUMA_WEIGHTS[luma_weights], dtype=torch.float64)
    try:
        w = torch.tensor([float(v) for v in luma_weights], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"luma_weights must be 'equal', 'bt601' or a list of numbers, got {luma_weights!r}") from None
    if w.numel() == 0 or not torch.isfinite(w).all() or float(w.norm()) == 0:
        raise ValueError(f"luma_weights must be finite and not all zero, got {luma_weights!r}")
    return w


def _householder_basis(w: Tensor) -> Tensor:
    """Orthogonal (C, C) matrix whose first column is w / |w|."""
    c = w.numel()
    u = w / w.norm()
    e = torch.zeros(c, dtype=torch.float64)
    e[0] = 1.0
    v = e - u
    if float(v.norm()) < 1e-12:
        return torch.eye(c, dtype=torch.float64)
    return torch.eye(c, dtype=torch.float64) - 2 * torch.outer(v, v) / v.dot(v)
