"""Sliding-window Picard iteration for triangular maps (ParaDiGMS-style, Shih et al. 2023).

For a :class:`~deqir.deq.protocols.TriangularMap` (slot j reads only slots < j; slot 0 reads the fixed
x_T) the solver keeps the model-output buffer E (B, S, ...) and iterates only a window of slots
[lo, hi), hi = min(S, lo + window). One round:

    1. E[:, lo:hi] = f.eval_eps(z, lo, hi)        (the expensive model call, window slots only)
    2. new = f.states(E[:, :hi])                   (the cheap explicit part, e.g. DeqIR's cumsums)
    3. change of each window slot: ||new_s - z_s|| (or relative to ||new_s||)
    4. z[:, lo:hi] = new[:, lo:hi]; advance lo past the converged prefix.

Convergence (exact for strictly triangular maps): slot lo is exact after the round, because its input
slot lo-1 was already converged when it was evaluated; slot s > lo is exact if slot s-1 is exact and
barely moved this round (its old value, which slot s read, equals its new one up to ``tol``). So per
image the converged prefix grows to ``lo + 1 + #(leading window slots lo, lo+1, ... with change <
tol)``, at least one slot per round; the window start is the minimum over the still-finite images.
Hence at most S rounds, and the model work (nfe = sum of B x window width) falls far below
rounds x S x B when slots converge faster than one per round.

Example:
    >>> # z, stats = sliding_window(joint_map, z0, window=8, tol=1e-3)   # joint_map: a TriangularMap
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from deqir.deq.protocols import TriangularMap
from deqir.deq.solvers._common import Callback, StopMode, check_common, check_state, image_view
from deqir.deq.solvers.stats import SolverStats, overall_status, residuals

__all__ = ["sliding_window"]


def sliding_window(
    f: TriangularMap,
    z0: Tensor,
    *,
    max_iter: int | None = None,
    tol: float = 1e-3,
    stop_mode: StopMode = "rel",
    window: int | None,
    callback: Callback | None = None,
) -> tuple[Tensor, SolverStats]:
    """Solve z = f(z) for a triangular map by Picard iteration over a sliding window, without autograd.

    Args:
        f: a :class:`~deqir.deq.protocols.TriangularMap` with ``num_slots == S``.
        z0: (B, S, *rest) initial state (the caller's warm start); not modified. Slots not yet reached
            by the window keep their z0 values.
        max_iter: maximum number of rounds (window evaluations); None means S, which always suffices.
        tol: a slot counts as unchanged when its change is strictly below ``tol`` (>= 0).
        stop_mode: "rel" (||new_s - z_s|| / (1e-5 + ||new_s||), per image and slot) or "abs".
        window: number of slots evaluated per round (>= 1); None means S (all not-yet-converged slots).
        callback: called once per round with {"round", "abs_residual" (B,), "rel_residual" (B,)
            (over the window's slots), "nfe", "active" (B,), "window" (lo, hi), "prefix" (B,)}.

    Returns:
        ``(z, stats)``: z (B, S, *rest) detached states, and :class:`SolverStats`; slot traces are NaN
        outside each round's window and ``window_trace`` holds the (lo, hi) of every round.

    Raises:
        TypeError: if ``f`` is not a TriangularMap.
        ValueError: for invalid options, ``f.num_slots != S``, or outputs of the wrong shape.
    """
    max_iter, window = _check(f, z0, max_iter, tol, stop_mode, window, callback)
    B, S = z0.shape[0], z0.shape[1]
    with torch.no_grad():
        dev = z0.device
        z = z0.detach().clone()
        E: Tensor | None = None
        prefix = torch.zeros(B, dtype=torch.long, device=dev)  # per image: slots known to be exact
        nonfinite = torch.zeros(B, dtype=torch.bool, device=dev)
        image_rounds = torch.zeros(B, dtype=torch.long, device=dev)
        last_res = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
        last_round = torch.full((B,), -1, dtype=torch.long, device=dev)
        traces = _Traces(B, S, dev)
        lo, nfe, rounds = 0, 0, 0
        while lo < S and rounds < max_iter:
            hi = min(S, lo + window)
            active = ~nonfinite & (prefix < S)
            # 1.-2. model outputs of the window slots only, then the explicit part of slots 0..hi-1
            E, new_w = _window_states(f, z, E, lo, hi)
            old_w = z[:, lo:hi]
            # 3. per-slot change of the window (the fixed-point residual of those slots).
            res = residuals(old_w, new_w)
            finite = torch.isfinite(new_w.flatten(1)).all(dim=1) & torch.isfinite(res.abs)
            nonfinite |= active & ~finite
            write = active & finite
            z[:, lo:hi] = torch.where(image_view(write, new_w), new_w, old_w)
            # 4. converged prefix per image: slot lo, then one more per leading unchanged slot.
            small = (res.select_slot(stop_mode) < tol)[:, : hi - lo - 1]
            run = torch.cumprod(small.long(), dim=1).sum(dim=1)
            prefix = torch.where(write, torch.maximum(prefix, lo + 1 + run), prefix)

            r = res.select(stop_mode)
            last_res = torch.where(write, r, last_res)
            last_round = torch.where(write, torch.full_like(last_round, rounds), last_round)
            image_rounds += active.long()
            traces.add(res, active, lo, hi)
            nfe += B * (hi - lo)
            rounds += 1

            still = ~nonfinite
            if not bool(still.any()):
                lo = S  # every image failed: nothing left to iterate
            else:
                lo = int(prefix[still].min())
            if callback is not None:
                callback({"round": rounds - 1, "abs_residual": res.abs, "rel_residual": res.rel, "nfe": nfe,
                          "active": ~nonfinite & (prefix < S), "window": (traces.windows[-1][0], hi),
                          "prefix": prefix.clone(), "last_slot": z[:, -1]})

        converged = ~nonfinite & (prefix >= S)
        image_status, status = overall_status(converged, nonfinite)
        stats = SolverStats(
            solver="sliding_window", stop_mode=stop_mode, tol=float(tol), rounds=rounds, nfe=nfe,
            **traces.stacked(), converged=converged, image_status=image_status, status=status,
            image_rounds=image_rounds, best_residual=last_res, best_round=last_round,
            fallback_trace=torch.zeros(rounds, B, dtype=torch.long, device=dev),
            window_trace=torch.tensor(traces.windows, dtype=torch.long, device=dev).view(rounds, 2),
        )
        return z, stats


def _check(f: TriangularMap, z0: Tensor, max_iter: int | None, tol: float, stop_mode: StopMode,
           window: int | None, callback: Callback | None) -> tuple[int, int]:
    """Validate the arguments; returns ``(max_iter, window)`` with None resolved to S."""
    if not isinstance(f, TriangularMap):
        raise TypeError(
            "sliding_window needs a TriangularMap (num_slots, eval_eps(z, lo, hi), states(E), __call__); "
            f"got {type(f).__name__}"
        )
    check_state(z0)
    S = z0.shape[1]
    if f.num_slots != S:
        raise ValueError(f"map has num_slots={f.num_slots} but z0 has S={S} slots")
    max_iter = S if max_iter is None else max_iter
    check_common(max_iter, tol, stop_mode, callback)
    window = S if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
    return max_iter, window


def _window_states(f: TriangularMap, z: Tensor, E: Tensor | None, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Evaluate the model on slots [lo, hi) into the buffer E (created on first use), then the explicit
    part of slots 0..hi-1; only the window's slots can have changed. Returns ``(E, new states of [lo, hi))``."""
    B, S = z.shape[0], z.shape[1]
    eps = f.eval_eps(z, lo, hi)
    if not isinstance(eps, Tensor) or eps.shape[:2] != (B, hi - lo):
        got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
        raise ValueError(f"eval_eps(z, {lo}, {hi}) must return ({B}, {hi - lo}, ...), got {got}")
    if E is None:
        E = eps.new_zeros((B, S, *eps.shape[2:]))
    E[:, lo:hi] = eps
    new = f.states(E[:, :hi])
    if not isinstance(new, Tensor) or new.shape != z[:, :hi].shape or new.dtype != z.dtype:
        got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, Tensor) else type(new).__name__
        raise ValueError(f"states(E) must return {tuple(z[:, :hi].shape)} {z.dtype}, got {got}")
    return E, new[:, lo:hi]


class _Traces:
    """Per-round residual traces: per image (B,) and per slot (B, S), NaN outside the window / for frozen
    images, plus the (lo, hi) window of every round."""

    def __init__(self, B: int, S: int, device: torch.device):
        self.B, self.S, self.device = B, S, device
        self.rows: dict[str, list[Tensor]] = {"abs": [], "rel": [], "abs_slot": [], "rel_slot": []}
        self.windows: list[tuple[int, int]] = []

    def add(self, res, active: Tensor, lo: int, hi: int) -> None:
        nan_slots = torch.full((self.B, self.S), math.nan, dtype=torch.float64, device=self.device)
        for key, per_image, per_slot in (("abs", res.abs, res.abs_slot), ("rel", res.rel, res.rel_slot)):
            self.rows[key].append(torch.where(active, per_image, math.nan))
            slot_row = nan_slots.clone()
            slot_row[:, lo:hi] = torch.where(active[:, None], per_slot, math.nan)
            self.rows[key + "_slot"].append(slot_row)
        self.windows.append((lo, hi))

    def stacked(self) -> dict[str, Tensor]:
        """``abs_trace``, ``rel_trace`` (rounds, B) and ``abs_slot_trace``, ``rel_slot_trace`` (rounds, B, S)."""
        return {f"{key}_trace": torch.stack(rows) for key, rows in self.rows.items()}
