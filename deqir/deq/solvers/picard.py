"""Picard (plain fixed-point) iteration: z <- beta f(z) + (1 - beta) z.

For a map with strictly lower-triangular slot dependence (slot j reads only slots < j, as the DeqIR
joint map, docs/solvers.md), undamped Picard is exact after S evaluations: evaluation k makes slot k-1
exact, so f(z) after S evaluations is the sequential chain. With ``return_value="f"`` (the default)
``max_iter=S`` therefore returns the exact chain.

Example:
    >>> import torch
    >>> z0 = torch.ones(1, 1, 3, dtype=torch.float64)
    >>> z, stats = picard(lambda z: 0.5 * (z + 2 / z), z0, max_iter=20, tol=1e-10)
    >>> round(float(z[0, 0, 0]) ** 2, 8), stats.status
    (2.0, 'converged')
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deqir.deq.solvers._common import (
    RETURN_VALUES,
    SELECTS,
    Callback,
    ReturnValue,
    Select,
    StopMode,
    RoundTracker,
    check_choice,
    check_common,
    check_state,
    evaluate,
    image_view,
)
from deqir.deq.solvers.stats import SolverStats

__all__ = ["picard"]


def picard(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iter: int,
    tol: float = 1e-3,
    stop_mode: StopMode = "rel",
    beta: float = 1.0,
    return_value: ReturnValue = "f",
    select: Select = "last",
    callback: Callback | None = None,
) -> tuple[Tensor, SolverStats]:
    """Solve z = f(z) by (damped) fixed-point iteration, per image, without autograd.

    Round k evaluates F_k = f(X_k) (X_0 = z0), measures ||F_k - X_k|| per image and stops an image once
    its residual is below ``tol``; otherwise X_{k+1} = beta F_k + (1 - beta) X_k. Converged or
    non-finite images are frozen while the others continue.

    Args:
        f: the map, (B, S, *rest) -> (B, S, *rest), same dtype.
        z0: (B, S, *rest) initial state (the caller's warm start); not modified.
        max_iter: maximum number of map evaluations (>= 1).
        tol: stop an image when its residual is strictly below ``tol`` (>= 0; 0 runs all ``max_iter``).
        stop_mode: "rel" (||f(z) - z|| / (1e-5 + ||f(z)||), per image) or "abs" (||f(z) - z||).
        beta: damping in (0, 1]; 1 is plain Picard (exact after S rounds on triangular maps).
        return_value: "f" returns F_k (one step past X_k, already computed); "x" returns X_k.
        select: "last" returns the latest finite round (default: later Picard iterates of a triangular
            map are exact on a longer prefix); "best" the round with the lowest residual.
        callback: called once per round with {"round", "abs_residual" (B,), "rel_residual" (B,),
            "nfe", "active" (B,)}.

    Returns:
        ``(z, stats)``: z (B, S, *rest) detached, and :class:`SolverStats`.

    Raises:
        ValueError: for invalid options (listing the valid ones) or a map returning the wrong shape/dtype.
    """
    check_common(max_iter, tol, stop_mode, callback)
    check_state(z0)
    if not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    check_choice("return_value", return_value, RETURN_VALUES)
    check_choice("select", select, SELECTS)

    with torch.no_grad():
        tracker = RoundTracker(
            "picard", z0, tol=tol, stop_mode=stop_mode, return_value=return_value, select=select,
            callback=callback,
        )
        x = z0.detach()
        for k in range(max_iter):
            fx = evaluate(f, x)
            active = tracker.record(x, fx)
            if k == max_iter - 1 or not bool(active.any()):
                break
            x_next = fx if beta == 1.0 else beta * fx + (1.0 - beta) * x
            # Frozen images (converged / non-finite) keep their state.
            x = torch.where(image_view(active, x), x_next, x)
        return tracker.finish()
