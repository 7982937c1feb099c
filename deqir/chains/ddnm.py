"""DDNM / DDNM+ (Wang et al., ICLR 2023): the project's default chain as a step (deqir.diffusion.chain).

    x0_tilde = x0_hat - lam_j A^+ (A x0_hat - y)          (range-space correction, eq. 13; lam_j < 1: eq. 19)
    x_{j+1}  = sqrt(a') x0_tilde + c2_j eps + c1_j z_j    (c1, c2, lam from make_chain: etw, nw, noise-aware)
"""
from __future__ import annotations

from torch import Tensor

from deqir.chains.base import ChainStep, Vjp, bcast


class DDNMStep(ChainStep):
    """DDNM step with the (etw, nw, lam) coefficients of :func:`deqir.diffusion.chain.make_chain`.

    Args:
        pinv_y: A^+ y (B, C, H, W) when the caller already has it (computed from y otherwise).
    """

    name = "ddnm"

    def __init__(self, coeffs, *, operator=None, y=None, z=None, sigma_y: float = 0.0, clip_x0: bool = False,
                 pinv_y: Tensor | None = None):
        super().__init__(coeffs, operator=operator, y=y, z=z, sigma_y=sigma_y, clip_x0=clip_x0)
        if operator is not None and pinv_y is None:
            pinv_y = operator.A_pinv(y)
        self.pinv_y = pinv_y

    @property
    def fresh_noise(self) -> bool:
        return bool((self.coeffs.c1 > 0).any())

    def __call__(self, x: Tensor, eps: Tensor, lo: int, hi: int, vjp: Vjp | None = None) -> Tensor:
        co = self.coeffs
        a, a_next = self.scalars(lo, hi, x)
        x0 = self.x0_hat(x, eps, a)
        if self.operator is not None:  # x0 - lam A^+(A x0 - y)
            op = self.operator
            B, J = x0.shape[:2]
            proj = op.A_pinv(op.A(x0.reshape(B * J, *x0.shape[2:]))).reshape(x0.shape)
            x0 = x0 - bcast(co.lam[lo:hi], x) * (proj - self.pinv_y.to(x).unsqueeze(1))
        out = a_next.sqrt() * x0 + bcast(co.c2[lo:hi], x) * eps
        if bool((co.c1[lo:hi] > 0).any()):
            out = out + bcast(co.c1[lo:hi], x) * self.noise(lo, hi, x, required=True)
        return out
