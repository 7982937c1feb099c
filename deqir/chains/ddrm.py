"""DDRM (Kawar et al., NeurIPS 2022, section 3.2-3.3 and eq. 7-8) as a step, in the operator's SVD space.

With x_bar = V^T x0_hat, e_bar = V^T eps, z_bar = V^T z_j, y_bar_i = (U^T y)_i / s_i, the VE levels
sigma' = sqrt((1 - a') / a') and sigma_y the measurement std on [-1, 1] (twice the [0, 1] value), each
spectral index i gets (the case test uses the next level sigma'):

    (N) s_i = 0, i >= m, or s_i sigma' = sigma_y:  x_bar + sqrt(1 - eta^2) sigma' e_bar + eta sigma' z_bar
    (A) s_i sigma' < sigma_y:  x_bar + sqrt(1 - eta^2) sigma' s_i (y_bar - x_bar) / sigma_y + eta sigma' z_bar
    (B) s_i sigma' > sigma_y:  eta_b y_bar + (1 - eta_b) x_bar + sqrt(sigma'^2 - eta_b^2 sigma_y^2 / s_i^2) z_bar

and x_{j+1} = sqrt(a') V x_bar'. The last step (sigma' = 0) returns x0_hat of the last model call. The (B)
case injects fresh noise even at eta = 0, so the chain is deterministic only given (x_T, z_0..z_{T-1}).
Unlike the official code, x_T is plain noise (its initialisation mixes y_bar / sigma_T into x_T).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from deqir.chains.base import ChainStep, Vjp, flat, pinv_spectral


class DDRMStep(ChainStep):
    """DDRM step. Args: eta (the (N)/(A) cases, official default 0.85), eta_b (case (B), default 1)."""

    name = "ddrm"

    def __init__(self, coeffs, *, operator=None, y=None, z=None, sigma_y: float = 0.0, clip_x0: bool = False,
                 eta: float = 0.85, eta_b: float = 1.0):
        super().__init__(coeffs, operator=operator, y=y, z=z, sigma_y=sigma_y, clip_x0=clip_x0)
        if not 0.0 <= eta <= 1.0 or not 0.0 <= eta_b <= 1.0:
            raise ValueError(f"ddrm needs eta and eta_b in [0, 1], got eta={eta}, eta_b={eta_b}")
        self.eta, self.eta_b = float(eta), float(eta_b)
        if operator is not None:
            self.svd()

    @property
    def fresh_noise(self) -> bool:
        """eta > 0, or observed coordinates (re-noised every step, even at eta = 0)."""
        observed = self.operator is not None and math.prod(self.operator.measurement_shape) > 0
        return self.eta > 0 or observed

    def __call__(self, x: Tensor, eps: Tensor, lo: int, hi: int, vjp: Vjp | None = None) -> Tensor:
        a, a_next = self.scalars(lo, hi, x)
        x0 = self.x0_hat(x, eps, a)
        B, J = x.shape[:2]
        sig = torch.sqrt((1 - a_next) / a_next)  # sigma' (1, J, 1, 1, 1); 0 after the last step
        z = self.noise(lo, hi, x, required=self.operator is not None or self.eta > 0)
        if self.operator is None:  # plain DDIM-eta in VE form
            out = x0 + (1 - self.eta**2) ** 0.5 * sig * eps + (self.eta * sig * z if z is not None else 0)
            return a_next.sqrt() * out
        op = self.svd()
        xb, eb, zb = op.V_T(flat(x0)), op.V_T(flat(eps)), op.V_T(flat(z))  # (B*J, D)
        sig_n = sig.reshape(1, J).expand(B, J).reshape(B * J, 1)
        out = xb + (1 - self.eta**2) ** 0.5 * sig_n * eb + self.eta * sig_n * zb  # case (N) everywhere
        s, uy = self.spectral_y(J, xb)  # (m,), (B*J, m)
        m = s.numel()
        ybar = pinv_spectral(s) * uy
        sy = 2.0 * self.sigma_y
        xm, zm = xb[:, :m], zb[:, :m]
        level = s * sig_n  # s_i sigma'
        case_b = (s > 0) & (level > sy)
        case_a = (s > 0) & (level < sy)
        std_b = torch.sqrt((sig_n**2 - self.eta_b**2 * sy**2 * pinv_spectral(s) ** 2).clamp_min(0))
        val_b = self.eta_b * ybar + (1 - self.eta_b) * xm + std_b * zm
        val_a = xm + (1 - self.eta**2) ** 0.5 * sig_n * s * (ybar - xm) / max(sy, 1e-300) + self.eta * sig_n * zm
        obs = torch.where(case_b, val_b, torch.where(case_a, val_a, out[:, :m]))
        out = torch.cat([obs, out[:, m:]], dim=1)
        return self._to_image(op, out, a_next, x.shape)

    @staticmethod
    def _to_image(op, out: Tensor, a_next: Tensor, shape) -> Tensor:
        """sqrt(a') V out: (B*J, D) -> (B, J, C, H, W)."""
        return a_next.sqrt() * op.V(out).reshape(shape)
