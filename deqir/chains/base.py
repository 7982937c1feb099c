"""The step contract shared by every restoration chain (sequential sampler and DEQ step form).

A chain is one function Phi_j of the state entering step j (docs/chains.md): slot j of the DEQ step form is
Phi_j(X_{j-1}) and the sequential sampler applies Phi_0 ... Phi_{T-1} in turn, so both solve the same chain.
A step object is bound to one problem (operator, y, noise z) and called on a block of slots:

    x_next = step(x, eps, lo, hi, vjp=None)

x, eps: (B, J, C, H, W) inputs and model outputs eps_theta(x_j, t_j) of slots lo..hi-1 (J = hi - lo);
vjp (only for ``needs_vjp`` steps): w (B, J, C, H, W) -> (d eps / d x)^T w, slot by slot.
Notation: a = alpha_bar(t_j), a' = alpha_bar(t'_j) (a' = 1 after the last step), x0_hat = (x - sqrt(1-a) eps)/sqrt(a).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deqir.diffusion.chain import ChainCoefficients
from deqir.operators.base import SVDOperator, inverse_singulars

Vjp = Callable[[Tensor], Tensor]


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """(J,) float64 per-slot scalars -> (1, J, 1, 1, 1) in ``like``'s dtype and device."""
    return v.to(device=like.device, dtype=like.dtype).view(1, -1, *([1] * (like.ndim - 2)))


def flat(v: Tensor) -> Tensor:
    """(B, J, C, H, W) -> (B * J, C, H, W) (image-major slots)."""
    return v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])


def eps_and_vjp(model: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor) -> tuple[Tensor, Vjp]:
    """eps = model(x, t) (N, C, H, W), detached, and w (N, C, H, W) -> (d eps / d x)^T w.

    Runs the model with autograd on (also inside ``no_grad`` / ``inference_mode`` callers); each sample's
    eps depends only on its own input, so one VJP of the batch is the per-sample VJP.

    When ``x`` itself requires grad (and grad mode is on) both stay differentiable: eps keeps its graph to x and
    the VJP is taken with ``create_graph=True`` (double backward), so a gradient through the step (the IFT
    adjoint of docs/gradients.md, an unrolled chain) includes the model's second-order term.
    """
    if torch.is_grad_enabled() and x.requires_grad and not torch.is_inference_mode_enabled():
        eps_x = model(x, t)

        def vjp_graph(w: Tensor) -> Tensor:
            (g,) = torch.autograd.grad(eps_x, x, w.to(eps_x.dtype), retain_graph=True, create_graph=True)
            return g.to(w.dtype)

        return eps_x, vjp_graph
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        eps = model(leaf, t)

    def vjp(w: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            (g,) = torch.autograd.grad(eps, leaf, w.detach().clone().to(eps.dtype), retain_graph=True)
        return g.to(w.dtype)

    return eps.detach(), vjp


def slot_vjp(vjp: Vjp | None) -> Vjp | None:
    """A flat (N, ...) VJP as one on (B, J, ...) slot blocks."""
    if vjp is None:
        return None
    return lambda w: vjp(flat(w)).reshape(w.shape)


class ChainStep:
    """Base class: per-slot coefficients, the DDIM x0 prediction, the noise slots and spectral helpers.

    Args:
        coeffs: the grid (only ``t``, ``a``, ``a_next`` are used by chains other than DDNM).
        operator, y: degradation and measurements (B, ...); both None for unconditional sampling.
        z: (B, T or 1, C, H, W) fresh noise (one image per step, or one shared), or None.
        sigma_y: measurement noise std on the [0, 1] scale (the chain works on [-1, 1], where it is 2 sigma_y).
        clip_x0: clamp x0_hat to [-1, 1].
    """

    name = "base"
    needs_vjp = False

    @property
    def fresh_noise(self) -> bool:
        """Whether the step adds fresh noise (a stochastic chain): errors far below that noise are invisible in
        its result, which lets a solver accept them (docs/solvers.md). False unless a chain says otherwise."""
        return False

    def __init__(self, coeffs: ChainCoefficients, *, operator=None, y: Tensor | None = None, z: Tensor | None = None,
                 sigma_y: float = 0.0, clip_x0: bool = False):
        if (operator is None) != (y is None):
            raise ValueError("operator and y must be given together")
        self.coeffs, self.operator, self.y, self.z = coeffs, operator, y, z
        self.sigma_y, self.clip_x0 = float(sigma_y), bool(clip_x0)
        self.num_slots = len(coeffs)

    # -- per-slot quantities ------------------------------------------------------------------
    def scalars(self, lo: int, hi: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(a, a') of slots lo..hi-1 broadcast to (1, J, 1, 1, 1)."""
        return bcast(self.coeffs.a[lo:hi], like), bcast(self.coeffs.a_next[lo:hi], like)

    def x0_hat(self, x: Tensor, eps: Tensor, a: Tensor) -> Tensor:
        """DDIM x0 prediction (x - sqrt(1 - a) eps) / sqrt(a), clamped to [-1, 1] with ``clip_x0``."""
        x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    def noise(self, lo: int, hi: int, like: Tensor, required: bool) -> Tensor | None:
        """z of slots lo..hi-1 (B, J, C, H, W) (the shared image repeated); ValueError if required and absent."""
        if self.z is None:
            if required:
                raise ValueError(f"chain {self.name!r} with these settings injects fresh noise every step: pass z")
            return None
        zz = self.z[:, lo:hi] if self.z.shape[1] > 1 else self.z.expand(-1, hi - lo, *self.z.shape[2:])
        return zz.to(like)

    def per_slot_y(self, J: int) -> Tensor:
        """y repeated for J slots: (B * J, *measurement_shape), image-major."""
        return self.y.repeat_interleave(J, dim=0)

    def svd(self) -> SVDOperator:
        """The operator as an :class:`SVDOperator`, or ValueError naming the chain."""
        if not isinstance(self.operator, SVDOperator):
            raise ValueError(  # noqa: TRY004 (a configuration error, reported like the others)
                f"chain {self.name!r} needs an operator with an SVD (SVDOperator); "
                f"{type(self.operator).__name__} has none: use chain=ddnm, diffpir, pigdm or dps")
        return self.operator

    def spectral_y(self, J: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(s (m,), U_T y (B * J, m)) of the SVD operator, in ``like``'s dtype."""
        op = self.svd()
        s = op.singulars().to(device=like.device, dtype=like.dtype)
        return s, op.U_T(self.y.to(like)).repeat_interleave(J, dim=0)

    def __call__(self, x: Tensor, eps: Tensor, lo: int, hi: int, vjp: Vjp | None = None) -> Tensor:
        raise NotImplementedError


def pinv_spectral(s: Tensor) -> Tensor:
    """1/s where s > 0 else 0 (Moore-Penrose)."""
    return inverse_singulars(s)


def ddim_eta_coefficients(a: Tensor, a_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """DDIM (Song et al. 2021, eq. 16): c1 = eta sqrt((1 - a/a')(1 - a')/(1 - a)), c2 = sqrt(1 - a' - c1^2)."""
    c1 = eta * torch.sqrt(((1 - a / a_next) * (1 - a_next) / (1 - a)).clamp_min(0))
    c2 = torch.sqrt((1 - a_next - c1**2).clamp_min(0))
    return c1, c2
