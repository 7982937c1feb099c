"""Gradient-guided chains with one vector-Jacobian product through the eps-model per step: PiGDM and DPS.

J = d x0_hat / d x_j = (I - sqrt(1 - a) d eps / d x) / sqrt(a), so J^T w = (w - sqrt(1 - a) vjp(w)) / sqrt(a).

PiGDM (Song et al., ICLR 2023, eq. 7-8; the DDIM form with the guidance added to x0_hat):
    v = r^2 A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat)   (r^2 = 1 - a; = A^+(y - A x0_hat) when noiseless)
    x_{j+1} = sqrt(a') (x0_hat + w sqrt(a) J^T v) + c2 eps + c1 z_j,   c1, c2 of DDIM-eta (eq. 16)
v is exact through the SVD; operators without one use A^+ (the noiseless form).

DPS (Chung et al., ICLR 2023, Algorithm 1) on our DDIM grid (deterministic for eta = 0):
    x0_hat = clip(x0 prediction), eps_hat = (x_j - sqrt(a) x0_hat) / sqrt(1 - a)
    x_{j+1} = sqrt(a') x0_hat + c2 eps_hat + c1 z_j - zeta grad_{x_j} |y - A x0_hat(x_j)|
The residual norm is per image (the official code takes it over the whole batch, coupling the images).
"""
from __future__ import annotations

import torch
from torch import Tensor

from deqir.chains.base import ChainStep, Vjp, bcast, ddim_eta_coefficients, flat
from deqir.operators.base import SVDOperator


class _Guided(ChainStep):
    needs_vjp = True

    def _jt(self, w: Tensor, a: Tensor, vjp: Vjp | None) -> Tensor:
        """J^T w for x0_hat = (x - sqrt(1 - a) eps) / sqrt(a)."""
        if vjp is None:
            raise ValueError(f"chain {self.name!r} needs the model's vector-Jacobian product (vjp=)")
        return (w - torch.sqrt(1 - a) * vjp(w)) / a.sqrt()


class PiGDMStep(_Guided):
    """PiGDM step. Args: weight (w, default 1), eta (DDIM eta, default 0: deterministic given x_T)."""

    name = "pigdm"

    def __init__(self, coeffs, *, operator=None, y=None, z=None, sigma_y: float = 0.0, clip_x0: bool = False,
                 weight: float = 1.0, eta: float = 0.0):
        super().__init__(coeffs, operator=operator, y=y, z=z, sigma_y=sigma_y, clip_x0=clip_x0)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"pigdm needs eta in [0, 1], got {eta}")
        self.weight, self.eta = float(weight), float(eta)

    @property
    def fresh_noise(self) -> bool:
        return self.eta > 0

    def guidance_vector(self, x0: Tensor, a: Tensor) -> Tensor:
        """v (B, J, C, H, W): the pseudo-inverse residual r^2 A^T (r^2 A A^T + sigma_y^2)^{-1} (y - A x0_hat)."""
        op = self.operator
        B, J = x0.shape[:2]
        x0f = flat(x0)
        res = self.per_slot_y(J).to(x0) - op.A(x0f)
        sy = 2.0 * self.sigma_y
        if sy == 0 or not isinstance(op, SVDOperator):
            return op.A_pinv(res).reshape(x0.shape)
        r2 = (1 - a).reshape(1, J).expand(B, J).reshape(B * J, 1)
        s = op.singulars().to(x0)
        m = s.numel()
        gain = torch.where(s > 0, r2 * s / (r2 * s**2 + sy**2), torch.zeros_like(r2 * s))
        coef = gain * op.U_T(res)
        pad = coef.new_zeros(coef.shape[0], op.numel_image - m)
        return op.V(torch.cat([coef, pad], dim=1)).reshape(x0.shape)

    def __call__(self, x: Tensor, eps: Tensor, lo: int, hi: int, vjp: Vjp | None = None) -> Tensor:
        a, a_next = self.scalars(lo, hi, x)
        x0 = self.x0_hat(x, eps, a)
        if self.operator is not None:
            v = self.guidance_vector(x0, a)
            if self.clip_x0:  # the clamp's Jacobian: identity where x0 was inside [-1, 1]
                pred = (x - torch.sqrt(1 - a) * eps) / a.sqrt()
                v = v * ((pred >= -1) & (pred <= 1)).to(v)
            x0 = x0 + self.weight * a.sqrt() * self._jt(v, a, vjp)
        c1, c2 = ddim_eta_coefficients(a, a_next, self.eta)
        out = a_next.sqrt() * x0 + c2 * eps
        if self.eta > 0:
            out = out + c1 * self.noise(lo, hi, x, required=True)
        return out


class DPSStep(_Guided):
    """DPS step. Args: zeta (step size, official 0.3 SR/deblur, 0.5 inpainting; a float, or one per step),
    eta (DDIM eta, default 0)."""

    name = "dps"

    def __init__(self, coeffs, *, operator=None, y=None, z=None, sigma_y: float = 0.0, clip_x0: bool = True,
                 zeta: float | list[float] = 1.0, eta: float = 0.0):
        super().__init__(coeffs, operator=operator, y=y, z=z, sigma_y=sigma_y, clip_x0=clip_x0)
        zeta_t = torch.as_tensor(zeta, dtype=torch.float64).flatten()
        if zeta_t.numel() not in (1, self.num_slots) or bool((zeta_t < 0).any()) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"dps needs zeta >= 0 (one value or one per step) and eta in [0, 1], got zeta={zeta}, "
                             f"eta={eta}")
        self.zeta, self.eta = zeta_t.expand(self.num_slots), float(eta)

    @property
    def fresh_noise(self) -> bool:
        return self.eta > 0

    def residual_gradient(self, x: Tensor, eps: Tensor, a: Tensor, vjp: Vjp | None) -> Tensor:
        """grad_{x_j} |y - A x0_hat(x_j)| per slot (B, J, C, H, W) (through the clamp when clip_x0)."""
        op = self.operator
        J = x.shape[1]
        pred = (x - torch.sqrt(1 - a) * eps) / a.sqrt()
        x0 = pred.clamp(-1, 1) if self.clip_x0 else pred
        res = op.A(flat(x0)) - self.per_slot_y(J).to(x)
        norm = res.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (res.ndim - 1)))
        w = op.A_adjoint(res / norm).reshape(x.shape)  # d |A x0 - y| / d x0
        if self.clip_x0:
            w = w * ((pred >= -1) & (pred <= 1)).to(w)
        return self._jt(w, a, vjp)

    def __call__(self, x: Tensor, eps: Tensor, lo: int, hi: int, vjp: Vjp | None = None) -> Tensor:
        a, a_next = self.scalars(lo, hi, x)
        x0 = self.x0_hat(x, eps, a)
        eps_hat = (x - a.sqrt() * x0) / torch.sqrt(1 - a)
        c1, c2 = ddim_eta_coefficients(a, a_next, self.eta)
        out = a_next.sqrt() * x0 + c2 * eps_hat
        if self.eta > 0:
            out = out + c1 * self.noise(lo, hi, x, required=True)
        if self.operator is not None and bool((self.zeta[lo:hi] > 0).any()):
            out = out - bcast(self.zeta[lo:hi], x) * self.residual_gradient(x, eps, a, vjp)
        return out
