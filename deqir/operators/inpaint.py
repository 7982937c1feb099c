"""Inpainting: y = m * x with a 0/1 mask m (1 = observed), shared by all channels or per channel."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from deqir.operators.base import SVDOperator, cast
from deqir.operators.masks import check_mask, save_mask


class Inpainting(SVDOperator):
    """Masking operator with image-shaped measurements: (B, C, H, W) -> (B, C, H, W), zeros where missing.

    A = A^T = A+ = diag(m) is an orthogonal projector, so every identity is exact and
    ``pinv_noise_gain() == 1``. ``measure`` adds noise on observed pixels only (missing pixels carry no
    information; y stays in the range of A). Keeping y image-shaped (instead of the official vector of
    kept values, docs/operators.md) lets users pass an already-damaged photo as y. SVD: V_T lists the
    observed entries (channel-major) then the missing ones; U is the isometry that scatters m values
    into the observed entries; all singular values are 1.

    Args:
        image_shape: (C, H, W).
        mask: (H, W) or (C, H, W) of 0/1 (see ``masks.make_mask`` for the generated kinds).
    """

    def __init__(self, image_shape, mask: Tensor) -> None:
        super().__init__(image_shape)
        mask = check_mask(mask, self.image_shape)
        self.register_buffer("mask", mask.clone())
        full = mask.expand(self.image_shape).flatten()
        self.register_buffer("_keep", torch.nonzero(full > 0).flatten())
        self.register_buffer("_miss", torch.nonzero(full == 0).flatten())

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return x * cast(self.mask, x)

    def A_pinv(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y * cast(self.mask, y)

    A_adjoint = A_pinv

    def observed(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y * cast(self.mask, y)

    def project_range(self, x: Tensor) -> Tensor:
        return x * cast(self.mask, x)

    def project_null(self, x: Tensor) -> Tensor:
        return x * (1 - cast(self.mask, x))

    def _measurement_noise(self, y: Tensor, generator: torch.Generator | None) -> Tensor:
        return super()._measurement_noise(y, generator) * cast(self.mask, y)

    def pinv_noise_gain(self) -> float:
        return 1.0

    def y_to_image(self, y: Tensor) -> Tensor:
        """Observed pixels as measured, missing ones at 0 (mid-gray on [-1, 1])."""
        return self.A_pinv(y)

    def V_T(self, x: Tensor) -> Tensor:
        self.check_image(x)
        flat = x.reshape(x.shape[0], -1)
        return torch.cat([flat[:, self._keep], flat[:, self._miss]], dim=1)

    def V(self, z: Tensor) -> Tensor:
        out = z.new_empty(z.shape[0], self.numel_image)
        out[:, self._keep] = z[:, : self._keep.numel()]
        out[:, self._miss] = z[:, self._keep.numel() :]
        return out.reshape(z.shape[0], *self.image_shape)

    def U_T(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y.reshape(y.shape[0], -1)[:, self._keep]

    def U(self, s: Tensor) -> Tensor:
        out = s.new_zeros(s.shape[0], self.numel_image)
        out[:, self._keep] = s
        return out.reshape(s.shape[0], *self.image_shape)

    def singulars(self) -> Tensor:
        return torch.ones(self._keep.numel(), dtype=torch.float64, device=self.mask.device)

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        return save_mask(self.mask, directory)

    def extra_repr(self) -> str:
        missing = 1.0 - float(self.mask.mean())
        return f"image_shape={self.image_shape}, missing={missing:.3f}"
