"""Denoising: A = I (the restoration problem is carried entirely by the noise sigma_y > 0)."""
from __future__ import annotations

import torch
from torch import Tensor

from deqir.operators.base import SVDOperator


class Denoising(SVDOperator):
    """Identity operator: y = x + 2 sigma_y n. All singular values are 1; U = V = flattening.

    Args:
        image_shape: (C, H, W).

    Example:
        >>> import torch
        >>> op = Denoising((3, 8, 8))
        >>> y = op.measure(torch.zeros(2, 3, 8, 8), sigma_y=0.1, generator=torch.Generator().manual_seed(0))
        >>> round(float(y.std()), 1)  # 2 * 0.1 on the [-1, 1] scale
        0.2
    """

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return self.image_shape

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return x.clone()

    def A_pinv(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y.clone()

    def A_adjoint(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y.clone()

    def project_range(self, x: Tensor) -> Tensor:
        return x.clone()

    def project_null(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape)

    def V(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.image_shape)

    def V_T(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    U = V
    U_T = V_T

    def singulars(self) -> Tensor:
        return torch.ones(self.numel_image, dtype=torch.float64)

    def pinv_noise_gain(self) -> float:
        return 1.0
