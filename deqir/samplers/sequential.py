"""Sequential reference sampler: DDIM with the (etw, nw) split plus DDNM range/null-space rectification.

This is the chain whose joint fixed point the DEQ sampler solves (docs/solvers.md); it is the ground truth
for every DEQ test. Randomness comes in as tensors (``x_T``, ``z``) drawn by :func:`draw_chain_noise`
from per-image generators, so results never depend on the batch composition.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deqir.chains import eps_and_vjp, slot_vjp
from deqir.diffusion.chain import ChainCoefficients, diffuse
from deqir.diffusion.protocols import EpsModel, LinearOperator


@dataclass
class SequentialStats:
    nfe: int  # model image-evaluations (B * T)
    steps: int


def draw_chain_noise(
    shape: Sequence[int],
    num_steps: int,
    generators: Sequence[torch.Generator],
    per_step_noise: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Per-image x_T (B, C, H, W) and noise z (B, T or 1, C, H, W), one generator per image.

    Each image's draws depend only on its own generator: x_T first, then z (one image shared by all
    steps, as the official DeqIR, or T fresh images with ``per_step_noise``). Drawn on the CPU in float32
    and moved, so the values do not depend on the device either.
    """
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per image: got {len(generators)} for batch {shape[0]}")
    img = tuple(shape[1:])
    n_z = num_steps if per_step_noise else 1
    xs, zs = [], []
    for g in generators:
        xs.append(torch.randn(img, generator=g, dtype=torch.float32))
        zs.append(torch.randn((n_z, *img), generator=g, dtype=torch.float32))
    to = dict(dtype=dtype, device=device)
    return torch.stack(xs).to(**to), torch.stack(zs).to(**to)


def chain_start(coeffs: ChainCoefficients, noise: Tensor, *, operator: LinearOperator | None = None,
                y: Tensor | None = None) -> Tensor:
    """The state the chain starts from (B, C, H, W): the drawn noise x_T, or -- for a grid truncated at t_start < N
    (``coeffs.from_measurement``) -- A^+ y diffused to the first level with that noise (docs/solvers.md "Grids")."""
    if not coeffs.from_measurement:
        return noise
    if operator is None or y is None:
        raise ValueError("a chain truncated at t_start < N starts from the measurement: pass operator and y "
                         "(or use sampler.t_start=null)")
    with torch.no_grad():
        return diffuse(operator.A_pinv(y).to(noise.dtype), noise, float(coeffs.a[0]))


def rectify(x0: Tensor, lam: float, operator: LinearOperator | None, pinv_y: Tensor | None) -> Tensor:
    """x0 - lam A^+(A x0 - y) = x0 - lam (P x0 - A^+ y); identity without an operator."""
    if operator is None:
        return x0
    return x0 - lam * (operator.A_pinv(operator.A(x0)) - pinv_y)


@torch.no_grad()
def sample_sequential(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x_T: Tensor,
    *,
    operator: LinearOperator | None = None,
    y: Tensor | None = None,
    z: Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    return_trajectory: bool = False,
    clip_x0: bool = False,
    step_fn=None,
) -> tuple[Tensor, SequentialStats] | tuple[Tensor, SequentialStats, Tensor]:
    """Run the T-step chain from x_T (B, C, H, W); returns x0 (B, C, H, W) and stats.

    Args:
        operator, y: degradation and measurement (B, ...); without them the chain is plain DDIM.
        z: noise (B, T or 1, C, H, W) for the c1 term (needed only when some c1 > 0).
        callback: called after every step with {"j", "t", "x", "x0_hat", "x0_tilde", "eps"}.
        return_trajectory: also return all T states (B, T, C, H, W) (the outputs of steps 0..T-1).
        clip_x0: clamp the x0 prediction to [-1, 1] before the rectification (a nonlinear chain; the DEQ
            solves it with the map's ``step`` form).
        step_fn: a chain step of :mod:`deqir.chains` bound to this problem (DDRM, PiGDM, DiffPIR, DPS, ...);
            None runs the DDNM chain of ``coeffs`` below. The DEQ step form applies the same step per slot.
    """
    if step_fn is not None:
        return _run_steps(model, coeffs, x_T, step_fn, callback, return_trajectory)
    return _run_chain(model, coeffs, x_T, operator, y, z, callback, return_trajectory, clip_x0)


def sample_sequential_with_grad(model, coeffs, x_T, *, operator=None, y=None, z=None, return_trajectory=False,
                                clip_x0=False):
    """Same chain with autograd enabled (reference for gradient checks; memory grows with T)."""
    return _run_chain(model, coeffs, x_T, operator, y, z, None, return_trajectory, clip_x0)


def _run_steps(model, coeffs, x_T, step_fn, callback, return_trajectory):
    """x_{j+1} = step_fn(x_j, eps_theta(x_j, t_j)) for j = 0..T-1 (one slot at a time, as the DEQ step form)."""
    T = len(coeffs)
    x, traj = x_T, []
    for j in range(T):
        t = torch.full((x.shape[0],), int(coeffs.t[j]), device=x.device, dtype=torch.long)
        if step_fn.needs_vjp:
            eps, vjp = eps_and_vjp(model, x, t)
        else:
            eps, vjp = model(x, t), None
        eps = eps.to(x.dtype)
        x_new = step_fn(x.unsqueeze(1), eps.unsqueeze(1), j, j + 1, vjp=slot_vjp(vjp))[:, 0].to(x_T.dtype)
        if callback is not None:
            a = float(coeffs.a[j])
            x0_hat = (x - (1 - a) ** 0.5 * eps) / a**0.5
            callback({"j": j, "t": int(coeffs.t[j]), "x": x_new, "x0_hat": x0_hat, "x0_tilde": x0_hat, "eps": eps})
        x = x_new
        if return_trajectory:
            traj.append(x)
    stats = SequentialStats(nfe=x_T.shape[0] * T, steps=T)
    if return_trajectory:
        return x, stats, torch.stack(traj, dim=1)
    return x, stats


def _run_chain(model, coeffs, x_T, operator, y, z, callback, return_trajectory, clip_x0=False):
    if (operator is None) != (y is None):
        raise ValueError("operator and y must be given together")
    T = len(coeffs)
    if bool((coeffs.c1 > 0).any()) and z is None:
        raise ValueError("the chain has a noise term (nw > 0): pass z")
    pinv_y = operator.A_pinv(y) if operator is not None else None
    dt = x_T.dtype
    x = x_T
    traj = []
    for j in range(T):
        t = torch.full((x.shape[0],), int(coeffs.t[j]), device=x.device, dtype=torch.long)
        eps = model(x, t)
        a, a_next = float(coeffs.a[j]), float(coeffs.a_next[j])
        x0_hat = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x0_tilde = rectify(x0_hat.clamp(-1, 1) if clip_x0 else x0_hat, float(coeffs.lam[j]), operator, pinv_y)
        x_new = a_next**0.5 * x0_tilde + float(coeffs.c2[j]) * eps
        if float(coeffs.c1[j]) != 0.0:
            zj = z[:, j] if z.shape[1] == T else z[:, 0]
            x_new = x_new + float(coeffs.c1[j]) * zj
        x = x_new.to(dt)
        if callback is not None:
            callback({"j": j, "t": int(coeffs.t[j]), "x": x, "x0_hat": x0_hat, "x0_tilde": x0_tilde, "eps": eps})
        if return_trajectory:
            traj.append(x)
    stats = SequentialStats(nfe=x_T.shape[0] * T, steps=T)
    if return_trajectory:
        return x, stats, torch.stack(traj, dim=1)
    return x, stats
