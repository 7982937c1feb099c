"""DEQ inversion: find the x_T from which the DEQ sampler reproduces a given clean image (docs/gradients.md).

Two stages:

1. :func:`ddim_invert` -- deterministic DDIM inversion along the ascending grid (docs/gradients.md
   ``--smart_init``). Starting from the clean image x at t_{T-1} (= 0), for j = T-1 .. 1:

       eps      = eps_theta(h, t_j)
       x0_hat   = (h - sqrt(1 - a_j) eps) / sqrt(a_j)                                   (DDIM x0 prediction)
       h        <- sqrt(a_{j-1}) x0_hat + sqrt(1 - a_{j-1}) eps                          (state at t_{j-1})

   which is the official update h <- sqrt(a_{j-1}/a_j) h + sqrt(a_{j-1}) (sqrt(1/a_{j-1} - 1) -
   sqrt(1/a_j - 1)) eps; T - 1 model calls. The final h (at t_0) is x_T. The intermediate values are the
   chain's states (X_{j-1} is the state at t_j), a free warm start for the first DEQ solve.
   :func:`fixed_point_invert` inverts the chain's own steps instead: for j = T-1 .. 0 it solves
   Phi_j(h_j) = h_{j+1} (h_T = the image, h_0 = x_T) for the input h_j of the step. With
   Phi_j(h) = r_j h + g_j eps(h, t_j) + c1_j z_j (unconditional step; r_j = sqrt(a'_j / a_j),
   g_j = c2_j - sqrt(a'_j) sqrt((1 - a_j) / a_j), docs/solvers.md) this is the fixed point

       h_j = (h_{j+1} - g_j eps(h_j, t_j) - c1_j z_j) / r_j                                        (3)

   iterated ``iters`` times from the DDIM guess eps(h_{j+1}) (iters x T model calls). Near-exact where (3)
   contracts: then the chain run from x_T reproduces the image up to the residual of (3).
2. :func:`invert_image` -- refine x_T by DEQ gradients (:func:`~deqir.optim.init_opt.optimize_init`)
   minimising the per-image reconstruction error mean (x0 - x)^2, recording the reconstruction PSNR of
   every evaluation (``history[k]["psnr"]``; step 0 is the DDIM-inversion start).

With an operator, the sampler's x0 = A^+ y + N(...) with y = A x by default, so only the null-space
content has to be found.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from deqir.diffusion.chain import ChainCoefficients
from deqir.diffusion.protocols import EpsModel, LinearOperator
from deqir.deq.grad import DEQGradientConfig
from deqir.deq.joint_map import EpsEvaluator, evaluate_in_chunks
from deqir.optim.init_opt import InitOptResult, SolveConfig, optimize_init

__all__ = ["INVERSION_INITS", "ddim_invert", "fixed_point_invert", "invert_image"]

INVERSION_INITS = ("fixed_point", "ddim", "noise")


@torch.no_grad()
def ddim_invert(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x: Tensor,
    *,
    max_batch: int | None = None,
    return_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Deterministic DDIM inversion of clean images to the chain's initial noise (module docstring).

    Args:
        model: eps-model.
        coeffs: chain coefficients; only the grid (t_j, a_j) is used.
        x: (B, C, H, W) clean images on [-1, 1].
        max_batch: micro-batch size of the model calls.
        return_states: also return chain states (B, T, C, H, W) matching the inversion path:
            X_{j-1} = h at t_j (j >= 1), X_{T-1} = x.

    Returns:
        x_T (B, C, H, W), and the states when ``return_states``.
    """
    T = len(coeffs)
    a = coeffs.a
    h = x  # the clean image stands for the state at t_{T-1} (= 0), i.e. X_{T-2}
    states: list[Tensor] = [x] * T
    for j in range(T - 1, 0, -1):  # from t_j to t_{j-1} (ascending time)
        t = torch.full((x.shape[0],), int(coeffs.t[j]), dtype=torch.long, device=x.device)
        eps = evaluate_in_chunks(model, h, t, max_batch).to(x.dtype)
        x0_hat = (h - float(1 - a[j]) ** 0.5 * eps) / float(a[j]) ** 0.5
        h = float(a[j - 1]) ** 0.5 * x0_hat + float(1 - a[j - 1]) ** 0.5 * eps
        if j >= 2:
            states[j - 2] = h  # state at t_{j-1} = output of step j - 2
    if not return_states:
        return h
    return h, torch.stack(states, dim=1)


@torch.no_grad()
def fixed_point_invert(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x: Tensor,
    *,
    iters: int,
    z: Tensor | None = None,
    max_batch: int | None = None,
    return_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Invert the unconditional chain step by step by the fixed point (3) (module docstring).

    Args:
        model, coeffs: eps-model and chain coefficients (any etw; nw > 0 needs ``z``).
        x: (B, C, H, W) clean images on [-1, 1]: the chain's output X_{T-1}.
        iters: fixed-point iterations per step (>= 1; 1 = the DDIM guess corrected once).
        z: (B, T or 1, C, H, W) the chain's noise (needed when it has a noise term).
        max_batch: micro-batch size of the model calls.
        return_states: also return the states (B, T, C, H, W) of the inverted chain (X_{j} = h_{j+1}),
            the warm start of the first DEQ solve.

    Returns:
        x_T (B, C, H, W), and the states when ``return_states``.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    T = len(coeffs)
    if bool((coeffs.c1 > 0).any()) and z is None:
        raise ValueError("the chain has a noise term (nw > 0): pass z")
    a, an = coeffs.a, coeffs.a_next
    r = torch.sqrt(an / a)
    g = coeffs.c2 - torch.sqrt(an) * torch.sqrt((1 - a) / a)
    states: list[Tensor] = [x] * T
    h_out = x
    for j in range(T - 1, -1, -1):
        t = torch.full((x.shape[0],), int(coeffs.t[j]), dtype=torch.long, device=x.device)
        rhs = h_out
        if float(coeffs.c1[j]) > 0:
            rhs = rhs - float(coeffs.c1[j]) * (z[:, 0] if z.shape[1] == 1 else z[:, j]).to(x.dtype)
        h = h_out  # DDIM guess: eps evaluated at the step's output
        for _ in range(iters):
            eps = evaluate_in_chunks(model, h, t, max_batch).to(x.dtype)
            h = (rhs - float(g[j]) * eps) / float(r[j])  # (3)
        states[j] = h_out
        h_out = h
    if not return_states:
        return h_out
    return h_out, torch.stack(states, dim=1)


def invert_image(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x: Tensor,
    *,
    operator: LinearOperator | None = None,
    y: Tensor | None = None,
    z: Tensor | None = None,
    init: Literal["fixed_point", "ddim", "noise"] | Tensor = "fixed_point",
    init_iters: int = 2,
    generator: torch.Generator | None = None,
    steps: int,
    lr: float,
    prior_weight: float = 0.0,
    patience: int | None = None,
    min_improvement: float = 0.0,
    stop_below: float | None = None,
    solve: SolveConfig,
    gradient: DEQGradientConfig | None = None,
    max_batch: int | None = None,
    eps_evaluator: EpsEvaluator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    map_form: str,
    clip_x0: bool = False,
) -> InitOptResult:
    """Find x_T whose DEQ restoration reproduces ``x``: DDIM inversion, then DEQ-gradient refinement.

    Args:
        model, coeffs: eps-model and chain coefficients.
        x: (B, C, H, W) clean images on [-1, 1] to invert.
        operator, y, z: optional degradation (y defaults to ``operator.A(x)``) and chain noise.
        init: ``"fixed_point"`` (:func:`fixed_point_invert`, the chain's steps inverted by ``init_iters``
            fixed-point iterations each), ``"ddim"`` (:func:`ddim_invert`); both paths warm-start the first
            solve; ``"noise"`` (x_T ~ N(0, I) from ``generator``) or a (B, C, H, W) tensor.
        init_iters: fixed-point iterations per step of ``init="fixed_point"``.
        steps, lr, patience, min_improvement, stop_below, solve, gradient, max_batch, eps_evaluator,
        callback, map_form, clip_x0: as :func:`~deqir.optim.init_opt.optimize_init`.
        prior_weight: weight of the Gaussian-shell ``prior`` term (0: reconstruction only).

    Returns:
        :class:`~deqir.optim.init_opt.InitOptResult`; the objective is the ``reference`` term with kind
        ``l2`` against ``x`` (``uses_oracle`` is False: x is the input, not hidden ground truth) and
        ``history[k]["psnr"]`` is the reconstruction PSNR of evaluation k.
    """
    if operator is not None and y is None:
        with torch.no_grad():
            y = operator.A(x)
    init_states = None
    if isinstance(init, Tensor):
        if init.shape != x.shape:
            raise ValueError(f"init must have the shape of x {tuple(x.shape)}, got {tuple(init.shape)}")
        x_T0 = init.to(x.dtype)
    elif init == "fixed_point":
        x_T0, init_states = fixed_point_invert(model, coeffs, x, iters=init_iters, z=z, max_batch=max_batch,
                                               return_states=True)
    elif init == "ddim":
        x_T0, init_states = ddim_invert(model, coeffs, x, max_batch=max_batch, return_states=True)
    elif init == "noise":
        x_T0 = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    else:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INVERSION_INITS)} or a tensor")
    weights = {"reference": 1.0, "prior": prior_weight}
    return optimize_init(
        model, coeffs, x_T0, losses=weights, operator=operator, y=y, z=z, reference=x, ground_truth=x,
        reference_kind="l2", steps=steps, lr=lr, patience=patience, min_improvement=min_improvement,
        stop_below=stop_below, solve=solve, gradient=gradient, init_states=init_states, max_batch=max_batch,
        eps_evaluator=eps_evaluator, callback=callback, map_form=map_form, clip_x0=clip_x0,
    )
