"""The empty operator of unconditional generation: nothing is measured (A = 0 with no rows).

With no measurement, A+ A = 0: the DDNM step x0 - A+(A x0 - y) leaves x0 unchanged, so every restoration
chain becomes plain DDIM (DDRM, DiffPIR and DPS likewise have no data term) and the DEQ solves DEQ-DDIM
(docs/chains.md, "Unconditional generation").
"""
from __future__ import annotations

import torch
from torch import Tensor

from deqir.operators.base import SVDOperator


class Unconditional(SVDOperator):
    """A with zero rows: measurements are (B, 0), ``A_pinv`` is the zero image, the null space is everything.

    Args:
        image_shape: (C, H, W).

    Example:
        >>> import torch
        >>> op = Unconditional((3, 8, 8))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> tuple(op.A(x).shape), float(op.A_pinv(op.A(x)).abs().sum()), bool(torch.equal(op.project_null(x), x))
        ((2, 0), 0.0, True)
    """

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return (0,)

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return x.new_zeros(x.shape[0], 0)

    def A_pinv(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return y.new_zeros(y.shape[0], *self.image_shape)

    A_adjoint = A_pinv

    def project_range(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape)

    def project_null(self, x: Tensor) -> Tensor:
        return x.clone()

    def V(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.image_shape)

    def V_T(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def singulars(self) -> Tensor:
        return torch.zeros(0, dtype=torch.float64)

    def pinv_noise_gain(self) -> float:
        return 0.0

    def y_to_image(self, y: Tensor) -> Tensor:
        """Nothing was measured: a mid-grey picture (B, C, H, W)."""
        return y.new_zeros(y.shape[0], *self.image_shape)
