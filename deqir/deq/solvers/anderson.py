"""Type-II Anderson acceleration (Walker & Ni 2011, "Anderson acceleration for fixed-point iterations").

Iteration structure of the official DeqIR / DEQ-DDIM sampler (docs/solvers.md), with history size m,
regularisation lam and damping beta:

    X^(0) = z0,  F^(0) = f(X^(0))
    X^(1) = F^(0) (beta = 1),  F^(1) = f(X^(1))
    k >= 2:  n = min(k, m),  G_i = F_i - X_i for the n newest pairs (ring buffer)
             alpha = argmin ||sum_i alpha_i G_i||^2 + lam ||alpha||^2   s.t.  sum_i alpha_i = 1
             X^(k) = beta sum_i alpha_i F_i + (1 - beta) sum_i alpha_i X_i,   F^(k) = f(X^(k))

so ``max_iter`` counts evaluations of f (15 in the official sampler: 2 setup + 13 mixing steps). The
constrained least-squares problem is solved through its bordered (KKT) system

    [[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0]

batched with ``torch.linalg.solve_ex`` in float64 (the n x n system is tiny; the state stays in its own
dtype). A problem whose system is singular, or whose weights or mixed iterate are non-finite, takes a
damped Picard step instead (alpha = newest) and is counted in ``stats.fallback_trace``.

Mixing: ``mixing="image"`` (default) treats each image's whole (S, *rest) state as one vector, so all
slots share one set of weights; ``mixing="slot"`` solves an independent Anderson problem per (image, slot),
as the official code does (its "batch" is the T slots). Stopping is per image in both cases.

Example:
    >>> import torch
    >>> A = 0.3 * torch.eye(4, dtype=torch.float64)
    >>> f = lambda z: z @ A + 1.0
    >>> z, stats = anderson(f, torch.zeros(2, 3, 4, dtype=torch.float64), max_iter=15, tol=1e-10,
    ...                     lam_mode="relative")
    >>> round(float(z[0, 0, 0]), 6), stats.status   # fixed point 1 / (1 - 0.3)
    (1.428571, 'converged')
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

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

__all__ = ["LAM_MODES", "MIXINGS", "anderson", "anderson_weights"]

MIXINGS = ("image", "slot")
LAM_MODES = ("absolute", "relative")
Mixing = Literal["image", "slot"]
LamMode = Literal["absolute", "relative"]

# A bordered-system solution whose weights do not sum to 1 within this tolerance is treated as failed
# (ill-conditioned solve); the exact solution satisfies the constraint.
_SUM_TOL = 1e-6


def anderson_weights(G: Tensor, lam: float, lam_mode: LamMode = "absolute") -> tuple[Tensor, Tensor]:
    """Anderson mixing weights for P independent problems (Walker & Ni, type II).

    Solves min_alpha ||alpha^T G||^2 + lam ||alpha||^2 subject to sum(alpha) = 1 via the bordered system
    [[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0], in float64.

    Args:
        G: (P, n, D) residual history F_i - X_i of each problem (any floating dtype).
        lam: Tikhonov regularisation (>= 0) added to the Gram matrix G G^T.
        lam_mode: "absolute" adds lam I (official); "relative" adds lam * mean(diag(G G^T)) I, which is
            invariant to the scale of the state.

    Returns:
        ``(alpha, ok)``: alpha (P, n) float64 weights and ok (P,) bool, False where the system was
        singular or produced non-finite weights (alpha is then meaningless for that problem).
    """
    P, n, _ = G.shape
    Gd = G.to(torch.float64)
    gram = Gd @ Gd.transpose(1, 2)  # (P, n, n)
    eye = torch.eye(n, dtype=torch.float64, device=G.device)
    kkt = torch.zeros(P, n + 1, n + 1, dtype=torch.float64, device=G.device)
    kkt[:, 0, 1:] = 1.0
    kkt[:, 1:, 0] = 1.0
    if lam_mode == "relative":
        reg = lam * gram.diagonal(dim1=1, dim2=2).mean(dim=1)[:, None, None]
    else:
        reg = lam
    kkt[:, 1:, 1:] = gram + reg * eye
    rhs = torch.zeros(P, n + 1, 1, dtype=torch.float64, device=G.device)
    rhs[:, 0] = 1.0
    finite_sys = torch.isfinite(kkt).flatten(1).all(dim=1)
    # Non-finite systems are replaced by the identity so the batched LU never sees NaN/inf.
    kkt = torch.where(finite_sys[:, None, None], kkt, torch.eye(n + 1, dtype=torch.float64, device=G.device))
    sol, info = torch.linalg.solve_ex(kkt, rhs)
    alpha = sol[:, 1:, 0]
    ok = (
        finite_sys
        & (info == 0)
        & torch.isfinite(alpha).all(dim=1)
        & ((alpha.sum(dim=1) - 1.0).abs() < _SUM_TOL)
    )
    return alpha, ok


def _check_options(history_size: int, lam: float, lam_mode: str, beta: float, mixing: str, return_value: str,
                   select: str) -> None:
    """ValueError (listing the valid values) for an invalid Anderson option."""
    if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
        raise ValueError(f"history_size must be an integer >= 1, got {history_size!r}")
    if not (lam >= 0.0) or lam == float("inf"):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    check_choice("lam_mode", lam_mode, LAM_MODES)
    check_choice("mixing", mixing, MIXINGS)
    check_choice("return_value", return_value, RETURN_VALUES)
    check_choice("select", select, SELECTS)


def _mixed_iterate(X_hist: Tensor, F_hist: Tensor, i: int, n: int, lam: float, lam_mode: LamMode,
                   beta: float) -> tuple[Tensor, Tensor]:
    """The next iterate of every mixing problem from the first ``n`` history pairs (newest at ``i``).

    Returns ``(x_new, ok)``: x_new (P, D), and ok (P,) False where the mixing fell back to the damped Picard
    step from the newest pair (a singular system or a non-finite extrapolation).
    """
    P = X_hist.shape[0]
    # 1. Mixing weights (Walker & Ni): alpha = 1 with one pair, i.e. X^(1) = F^(0) for beta = 1.
    if n == 1:
        alpha = torch.ones(P, 1, dtype=torch.float64, device=X_hist.device)
        ok = torch.ones(P, dtype=torch.bool, device=X_hist.device)
    else:
        alpha, ok = anderson_weights(F_hist[:, :n] - X_hist[:, :n], lam, lam_mode)
    # 2. Fallback: a failed system takes the damped Picard step from the newest pair.
    newest = torch.zeros_like(alpha)
    newest[:, i] = 1.0
    alpha = torch.where(ok[:, None], alpha, newest).to(X_hist.dtype)

    # 3. X^(k+1) = beta sum alpha F + (1 - beta) sum alpha X.
    x_new = torch.einsum("pn,pnd->pd", alpha, F_hist[:, :n])
    if beta != 1.0:
        x_new = beta * x_new + (1.0 - beta) * torch.einsum("pn,pnd->pd", alpha, X_hist[:, :n])
    # A finite system can still extrapolate to inf/NaN in float32: fall back for those too.
    finite_new = torch.isfinite(x_new).all(dim=1)
    if not bool(finite_new.all()):
        picard_step = beta * F_hist[:, i] + (1.0 - beta) * X_hist[:, i]
        x_new = torch.where(finite_new[:, None], x_new, picard_step)
        ok = ok & finite_new
    return x_new, ok


def anderson(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    max_iter: int,
    tol: float = 1e-3,
    stop_mode: StopMode = "rel",
    history_size: int = 5,
    lam: float = 1e-3,
    lam_mode: LamMode = "absolute",
    beta: float = 1.0,
    mixing: Mixing = "image",
    return_value: ReturnValue = "f",
    select: Select = "best",
    callback: Callback | None = None,
) -> tuple[Tensor, SolverStats]:
    """Solve z = f(z) by type-II Anderson acceleration, per image, without autograd.

    Defaults are the official DeqIR sampler's values (m = 5, lam = 1e-3, beta = 1, relative tolerance 1e-3;
    it runs 15 evaluations; docs/solvers.md), except that the best iterate is kept and f of it returned.

    Args:
        f: the map, (B, S, *rest) -> (B, S, *rest), same dtype.
        z0: (B, S, *rest) initial state X^(0) (the caller's warm start); not modified.
        max_iter: maximum number of evaluations of f (>= 1).
        tol: stop an image when its residual is strictly below ``tol`` (>= 0).
        stop_mode: "rel" (||f(z) - z|| / (1e-5 + ||f(z)||), per image) or "abs" (||f(z) - z||).
        history_size: m, number of (X, F) pairs kept (>= 1; 1 is damped Picard).
        lam: regularisation of the Gram matrix (>= 0).
        lam_mode: "absolute" adds lam I to G G^T, as the official code: negligible for image-sized
            states (||G||^2 >> lam) but it stalls convergence once ||G||^2 ~ lam (small states, tight
            tolerances); "relative" adds lam * mean ||G_i||^2 I, which is scale-invariant.
        beta: damping in (0, 1]: X = beta sum alpha F + (1 - beta) sum alpha X.
        mixing: "image" (one weight vector per image) or "slot" (one per image and slot, official).
        return_value: "f" returns f(X) of the selected round (one Picard step further, free);
            "x" returns the mixed iterate X itself (the official behaviour).
        select: "best" keeps the round with the lowest residual per image (default); "last" the latest
            finite round (the official behaviour).
        callback: called once per round with {"round", "abs_residual" (B,), "rel_residual" (B,),
            "nfe", "active" (B,)}.

    Returns:
        ``(z, stats)``: z (B, S, *rest) detached, and :class:`SolverStats` (``fallback_trace`` counts
        mixing systems that fell back to a damped Picard step).

    Raises:
        ValueError: for invalid options (listing the valid ones) or a map returning the wrong shape/dtype.
    """
    check_common(max_iter, tol, stop_mode, callback)
    check_state(z0)
    _check_options(history_size, lam, lam_mode, beta, mixing, return_value, select)

    with torch.no_grad():
        B, S = z0.shape[0], z0.shape[1]
        P = B if mixing == "image" else B * S  # number of independent mixing problems
        D = z0.numel() // P
        m = history_size
        tracker = RoundTracker(
            "anderson", z0, tol=tol, stop_mode=stop_mode, return_value=return_value, select=select,
            callback=callback,
        )
        # Ring buffers of the last m iterates and their images (slot k mod m), as in the official sampler.
        X_hist = z0.new_zeros(P, m, D)
        F_hist = z0.new_zeros(P, m, D)
        x = z0.detach()
        for k in range(max_iter):
            fx = evaluate(f, x)
            active = tracker.record(x, fx)
            if k == max_iter - 1 or not bool(active.any()):
                break
            i = k % m
            X_hist[:, i] = x.reshape(P, D)
            F_hist[:, i] = fx.reshape(P, D)
            x_new, ok = _mixed_iterate(X_hist, F_hist, i, min(k + 1, m), lam, lam_mode, beta)
            active_p = active if mixing == "image" else active.repeat_interleave(S)
            tracker.add_fallbacks((active_p & ~ok).view(B, -1).sum(dim=1))
            # Frozen images (converged / non-finite) keep their state.
            x = torch.where(image_view(active, x), x_new.view_as(x), x)
        return tracker.finish()
