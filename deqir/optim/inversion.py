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

__all__ = ["INVERSION_INITS", "ddim_invert", "invert_image"]

INVERSION_INITS = ("ddim", "noise")


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


def invert_image(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x: Tensor,
    *,
    operator: LinearOperator | None = None,
    y: Tensor | None = None,
    z: Tensor | None = None,
    init: Literal["ddim", "noise"] | Tensor = "ddim",
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
        init: ``"ddim"`` (:func:`ddim_invert`, whose path also warm-starts the first solve), ``"noise"``
            (x_T ~ N(0, I) from ``generator``) or a (B, C, H, W) tensor.
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
