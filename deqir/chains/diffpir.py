"""DiffPIR (Zhu et al., CVPRW 2023, Algorithm 1 with eq. 13-15) as a step: half-quadratic splitting.

    x0_hat   = clip(x0 prediction, -1, 1)
    x0_tilde = argmin_x |y - A x|^2 + rho_j |x - x0_hat|^2,  rho_j = lambda sigma_n^2 / sigma_bar_j^2   (data step)
    eps_hat  = (x_j - sqrt(a) x0_tilde) / sqrt(1 - a)
    x_{j+1}  = sqrt(a') x0_tilde + sqrt(1 - a') (sqrt(1 - zeta) eps_hat + sqrt(zeta) z_j)

sigma_bar_j = sqrt((1 - a) / a) and sigma_n = max(sigma_y, 0.001) on the [0, 1] scale (the official floor).
The data step is closed form in the SVD, x_bar_i = (s_i (U^T y)_i + rho x0_bar_i) / (s_i^2 + rho), and
conjugate gradients on (A^T A + rho I) x = A^T y + rho x0_hat for operators without one. On our grid the
last step (a' = 1) returns x0_tilde. zeta = 0 makes the chain deterministic given x_T.
"""
from __future__ import annotations

import torch
from torch import Tensor

from deqir.chains.base import ChainStep, Vjp, flat
from deqir.operators.base import SVDOperator

SIGMA_FLOOR = 0.001


class DiffPIRStep(ChainStep):
    """DiffPIR step. Args: lam (lambda, official 7 for deblurring), zeta (official 0.3 deblur, 1.0 inpaint),
    cg_iter, cg_tol (data step of operators without an SVD)."""

    name = "diffpir"

    def __init__(self, coeffs, *, operator=None, y=None, z=None, sigma_y: float = 0.0, clip_x0: bool = True,
                 lam: float = 7.0, zeta: float = 0.3, cg_iter: int = 30, cg_tol: float = 1e-6):
        super().__init__(coeffs, operator=operator, y=y, z=z, sigma_y=sigma_y, clip_x0=clip_x0)
        if lam <= 0 or not 0.0 <= zeta <= 1.0:
            raise ValueError(f"diffpir needs lam > 0 and zeta in [0, 1], got lam={lam}, zeta={zeta}")
        self.lam, self.zeta, self.cg_iter, self.cg_tol = float(lam), float(zeta), int(cg_iter), float(cg_tol)

    @property
    def fresh_noise(self) -> bool:
        return self.zeta > 0

    def rho(self, a: Tensor) -> Tensor:
        """rho_j = lambda sigma_n^2 a / (1 - a), same shape as a."""
        return self.lam * max(self.sigma_y, SIGMA_FLOOR) ** 2 * a / (1 - a)

    def data_step(self, x0: Tensor, rho: Tensor) -> Tensor:
        """argmin_x |y - A x|^2 + rho |x - x0|^2 per slot: x0 (B, J, C, H, W), rho (1, J, 1, 1, 1)."""
        if self.operator is None:
            return x0
        B, J = x0.shape[:2]
        r = rho.reshape(1, J).expand(B, J).reshape(B * J, 1)
        op, x0f = self.operator, flat(x0)
        if isinstance(op, SVDOperator):
            s, uy = self.spectral_y(J, x0)
            xb = op.V_T(x0f)
            m = s.numel()
            obs = (s * uy + r * xb[:, :m]) / (s**2 + r)
            return op.V(torch.cat([obs, xb[:, m:]], dim=1)).reshape(x0.shape)
        rr = r.view(-1, 1, 1, 1)
        rhs = op.A_adjoint(self.per_slot_y(J).to(x0)) + rr * x0f
        return _cg(lambda v: op.A_adjoint(op.A(v)) + rr * v, rhs, x0f, self.cg_iter, self.cg_tol).reshape(x0.shape)

    def __call__(self, x: Tensor, eps: Tensor, lo: int, hi: int, vjp: Vjp | None = None) -> Tensor:
        a, a_next = self.scalars(lo, hi, x)
        x0 = self.data_step(self.x0_hat(x, eps, a), self.rho(a))
        eps_hat = (x - a.sqrt() * x0) / torch.sqrt(1 - a)
        out = a_next.sqrt() * x0 + torch.sqrt(1 - a_next) * (1 - self.zeta) ** 0.5 * eps_hat
        if self.zeta > 0:
            out = out + torch.sqrt(1 - a_next) * self.zeta**0.5 * self.noise(lo, hi, x, required=True)
        return out


def _cg(apply, b: Tensor, x: Tensor, iters: int, tol: float) -> Tensor:
    """Conjugate gradients for the SPD ``apply`` on (N, ...) with per-sample steps, started from x."""
    dims = tuple(range(1, b.ndim))
    r = b - apply(x)
    p = r.clone()
    rs = r.pow(2).sum(dims)
    stop = (tol**2) * b.pow(2).sum(dims)
    shape = (-1, *([1] * (b.ndim - 1)))
    for _ in range(iters):
        active = rs > stop
        if not bool(active.any()):
            break
        q = apply(p)
        pq = (p * q).sum(dims)
        alpha = torch.where(active & (pq > 0), rs / torch.where(pq > 0, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        x = x + alpha.view(shape) * p
        r = r - alpha.view(shape) * q
        rs_new = r.pow(2).sum(dims)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = r + beta.view(shape) * p
        rs = torch.where(active, rs_new, rs)
    return x
