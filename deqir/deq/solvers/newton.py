"""Quasi-Newton sweeps over a triangular chain, with a frontier window and per-slot freezing (docs/solvers.md).

For a map in step form, X_j = Phi_j(X_{j-1}) (slot 0 reads the fixed x_T), one round is

    1. R_j = Phi_j(X_{j-1}) - X_j for the evaluated slots j in [lo, hi)   (one batched model call)
    2. D_lo = R_lo,  D_j = R_j + M_j D_{j-1} for j > lo                   (a cheap sequential sweep)
    3. X_j += D_j for every j >= lo

i.e. X <- X + (I - M L)^{-1} R: Newton's method on the triangular system with the step Jacobians replaced by
M_j (Picard is M = 0). M_j = M0_j + a multisecant correction: M0_j is the map's own linear model
(:meth:`~deqir.deq.joint_map.ChainMap.linear_step`, a Gaussian-prior linearisation, no model call), and the
last ``history_size`` pairs (s, y) of (input change of slot j, output change of Phi_j) observed over the rounds
fix it on the directions the iteration actually moves (least-change update, Broyden's "good" form per slot):

    M_j v = M0_j v + (Y - M0_j S) (S^T S + reg)^{-1} S^T v

M0 uses the Gaussian prior's gain until the first round has measured the model's own (``calibration_levels``,
:meth:`~deqir.deq.joint_map.ChainMap.eval_eps_calibrated`: forward differences at a few slots, batched into the
first model call, turned into each image's ring-averaged Fourier gain); from then on every sweep uses that.

Slots beyond the window are not evaluated; step 2 still moves them by the linear propagation of the upstream
correction (R_j = 0 there), a free fill-ahead in the spirit of ParaSolver's DDIM-jump initialisation.

Freezing and stopping (ParaDiGMS-style noise-scaled tolerances, Shih et al. 2023). Slot j's change is
judged against the noise the chain itself holds at that slot, sigma_j = sqrt(1 - a'_j):
``RMS(D_j) <= max(tol sigma_j, floor)``, the floor ``slot_floor`` 8-bit levels (by default ``output_tol`` shrunk by
sqrt(25 / S) on chains longer than 25 slots: the low-noise slots it governs carry their accepted errors to x0
nearly unchanged, and a longer chain has more of them); a chain without fresh noise (deterministic DDIM, where
nothing washes an accepted error out) uses ``deterministic_tol`` instead of ``tol``. Slot lo is exact after the round (its input was exact), and
every following slot whose input barely moved is exact too, so the frontier ``lo`` (the converged prefix)
advances by at least one slot per round and frozen slots are never evaluated again. On a chain without fresh
noise a slot also needs its change, carried to x0 by the sweep's M_k, below ``carried_tol`` 8-bit levels RMS. An image stops when
the prefix covers the chain, or when the output slot (x0) was evaluated, both its residual and its change are
below ``output_tol`` 8-bit levels everywhere (max over pixels: a change the saved image cannot show) and no
slot moved by more than its own tolerance in that round, or when x0's estimated remaining error is below ``error_tol``
8-bit levels RMS: the sweep converges linearly, so with q = d_k / d_{k-1} the ratio of x0's RMS changes in two
consecutive whole-chain rounds (the slower of the last two such rates, q < 0.9), what is left is about
d_k q / (1 - q) (docs/solvers.md, "The error estimate"). Work is counted exactly: B x (evaluated slots) per round.

Example:
    >>> # z, stats = quasi_newton(chain_map, z0, tol=0.02, window=None, history_size=4)  # chain_map: ChainMap
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from deqir.deq.linearize import SpectralGaussianPrior
from deqir.deq.solvers._common import Callback, check_common, check_state, image_view
from deqir.deq.solvers.stats import SolverStats, overall_status

__all__ = ["FLOOR_SLOTS", "LEVEL", "MAX_RATE", "quasi_newton", "slot_floor_levels"]

#: One 8-bit level on the chain's [-1, 1] scale.
LEVEL = 2.0 / 255.0
#: The error-estimate stop trusts a contraction rate q = d_k / d_{k-1} only below this.
MAX_RATE = 0.9
#: Added to the error for a string value: Hydra's command line reads ``.inf`` (YAML's spelling) as a string.
_INF_HINT = " (a string: on the command line write solver.{}=inf, in a YAML file .inf)"
#: The chain length at which the slot tolerance's floor equals ``output_tol`` (where it was tuned, T = 25).
FLOOR_SLOTS = 25


def slot_floor_levels(output_tol: float, num_slots: int, slot_floor: float | None = None) -> float:
    """The floor of every slot's tolerance, in 8-bit levels RMS: ``slot_floor`` where given, else
    ``output_tol * sqrt(FLOOR_SLOTS / num_slots)`` on chains longer than FLOOR_SLOTS (``output_tol`` on shorter
    ones). Frozen low-noise slots each carry up to the floor to x0 along a near-identity transport, so the
    floor shrinks as the square root of their number (docs/solvers.md, "The slot floor").

    Example:
        >>> slot_floor_levels(0.5, 100)
        0.25
    """
    if slot_floor is not None:
        return float(slot_floor)
    return output_tol * math.sqrt(min(1.0, FLOOR_SLOTS / num_slots))


def quasi_newton(
    f,
    z0: Tensor,
    *,
    max_iter: int | None = None,
    tol: float = 0.02,
    deterministic_tol: float = 0.02,
    stop_mode: str = "noise",
    window: int | None = None,
    history_size: int = 4,
    output_tol: float = 0.5,
    prior_slope: float = 3.0,
    prior_variance: float = 0.5,
    calibration_levels: int = 7,
    carried_tol: float = 0.5,
    error_tol: float = 1.0,
    slot_floor: float | None = None,
    callback: Callback | None = None,
) -> tuple[Tensor, SolverStats]:
    """Solve the triangular fixed point z = f(z) by quasi-Newton sweeps, without autograd.

    Args:
        f: a step-form :class:`~deqir.deq.joint_map.ChainMap` (``eval_eps`` returns the new states;
            ``linear_step``, ``slot_noise_std``).
        z0: (B, S, C, H, W) initial chain; not modified.
        max_iter: maximum rounds (None: S, always enough: the prefix grows by >= 1 slot per round).
        tol: noise-scaled slot tolerance: a slot is unchanged when RMS(change) <= tol * sigma_j.
        deterministic_tol: the tolerance used instead when the chain adds no fresh noise (``f.fresh_noise``
            False: DDIM eta = 0, unconditional generation): nothing washes its errors out, so it needs a
            tighter one (ParaDiGMS likewise uses a 100x tighter tolerance for DDIM than for DDPM).
        stop_mode: "noise" (the only mode: tolerances scale with each slot's noise level).
        window: slots evaluated per round, from the frontier (None: all not-yet-converged slots).
        history_size: secant pairs kept per slot (0: the Gaussian-prior linearisation alone).
        output_tol: stop when the output slot's residual and change are below this many 8-bit levels.
        prior_slope, prior_variance: the Gaussian image prior of the linearisation (deqir.deq.linearize).
        calibration_levels: measure the linearisation on the model instead (0: the Gaussian prior alone): the
            first round, when it covers the whole chain, also probes this many levels (at most T // 3)
            (:meth:`~deqir.deq.joint_map.ChainMap.eval_eps_calibrated`, B levels extra evaluations in the
            same model call) and every later sweep uses each image's measured gain.
        carried_tol: for chains without fresh noise, a slot also freezes only when its change, carried to the
            output by the sweep's linear model, is below this many 8-bit levels RMS (nothing downstream washes an
            accepted error out; ``math.inf``: off).
        error_tol: also stop when x0's estimated remaining error, d_k q / (1 - q) with d_k its RMS change in this
            whole-chain round and q = max(d_k / d_{k-1}, d_{k-1} / d_{k-2}) < ``MAX_RATE`` (the slower of the last
            two rates where both exist), is below this many 8-bit levels RMS (1 level RMS is 48 dB; ``math.inf``:
            off, 0: never).
        slot_floor: the floor of every slot's tolerance in 8-bit levels RMS (None: :func:`slot_floor_levels`,
            ``output_tol`` at up to 25 slots, shrinking as sqrt(25 / S) beyond).
        callback: once per round with {"round", "abs_residual" (B,), "rel_residual" (B,), "nfe", "active",
            "window" (lo, hi), "prefix" (B,), "last_slot" (B, C, H, W)}.

    Returns:
        ``(z, stats)``; ``stats.window_trace`` holds the (lo, hi) of every round.
    """
    check_state(z0)
    B, S = z0.shape[0], z0.shape[1]
    if getattr(f, "num_slots", None) != S or not hasattr(f, "linear_step"):
        raise ValueError("quasi_newton needs a step-form ChainMap (linear_step, slot_noise_std) with "
                         f"num_slots == {S}; set sampler.form=step")
    if getattr(f, "form", "step") != "step":
        raise ValueError("quasi_newton solves the map's step form: set sampler.form=step")
    max_iter = S if max_iter is None else max_iter
    if stop_mode != "noise":
        raise ValueError(f"quasi_newton uses noise-scaled tolerances: stop_mode must be 'noise', got {stop_mode!r}")
    check_common(max_iter, tol, "abs", callback)
    if not (deterministic_tol >= 0 and math.isfinite(deterministic_tol)):
        raise ValueError(f"deterministic_tol must be a finite number >= 0, got {deterministic_tol!r}")
    if not getattr(f, "fresh_noise", False):
        tol = min(tol, deterministic_tol)
    window = S if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
    if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 0:
        raise ValueError(f"history_size must be an integer >= 0, got {history_size!r}")
    if not (output_tol >= 0 and math.isfinite(output_tol)):
        raise ValueError(f"output_tol must be a finite number >= 0 (8-bit levels), got {output_tol!r}")
    if isinstance(calibration_levels, bool) or not isinstance(calibration_levels, int) or calibration_levels < 0:
        raise ValueError(f"calibration_levels must be an integer >= 0 (0 = the Gaussian prior), got {calibration_levels!r}")
    if isinstance(carried_tol, bool) or not isinstance(carried_tol, (int, float)) or not carried_tol >= 0:
        raise ValueError(f"carried_tol must be a number >= 0 (8-bit levels RMS; inf = off), got {carried_tol!r}"
                         f"{_INF_HINT.format('carried_tol') if isinstance(carried_tol, str) else ''}")
    if isinstance(error_tol, bool) or not isinstance(error_tol, (int, float)) or not error_tol >= 0:
        raise ValueError(f"error_tol must be a number >= 0 (8-bit levels RMS; inf = off), got {error_tol!r}"
                         f"{_INF_HINT.format('error_tol') if isinstance(error_tol, str) else ''}")
    if slot_floor is not None and (isinstance(slot_floor, bool) or not isinstance(slot_floor, (int, float))
                                   or not (slot_floor >= 0 and math.isfinite(slot_floor))):
        raise ValueError(f"slot_floor must be null (scaled from output_tol) or a finite number >= 0 (8-bit levels RMS), "
                         f"got {slot_floor!r}")
    estimate = math.isfinite(error_tol) and error_tol > 0
    carry = not getattr(f, "fresh_noise", False) and math.isfinite(carried_tol)
    prior = SpectralGaussianPrior(prior_slope, prior_variance)
    calibrate = (calibration_levels > 0 and window >= S and getattr(f, "linearizable", False)
                 and hasattr(f, "eval_eps_calibrated"))

    with torch.no_grad():
        dev = z0.device
        z = z0.detach().clone()
        sigma = f.slot_noise_std.to(device=dev, dtype=torch.float64)
        slot_tol = torch.clamp(tol * sigma, min=slot_floor_levels(output_tol, S, slot_floor) * LEVEL)  # (S,) RMS per pixel
        out_tol = output_tol * LEVEL
        secants = _Secants(history_size)
        prefix = torch.zeros(B, dtype=torch.long, device=dev)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        converged = torch.zeros(B, dtype=torch.bool, device=dev)
        nonfinite = torch.zeros(B, dtype=torch.bool, device=dev)
        image_rounds = torch.zeros(B, dtype=torch.long, device=dev)
        last_res = torch.full((B,), math.inf, dtype=torch.float64, device=dev)
        last_round = torch.full((B,), -1, dtype=torch.long, device=dev)
        prev_out = torch.full((B,), math.inf, dtype=torch.float64, device=dev)  # x0's RMS change, last whole-chain round
        prev_rate = torch.full((B,), math.nan, dtype=torch.float64, device=dev)  # its rate q one round earlier (nan: none)
        traces: dict[str, list[Tensor]] = {"abs": [], "rel": [], "abs_slot": [], "rel_slot": []}
        windows: list[tuple[int, int]] = []
        nfe = rounds = 0
        numel = z0[0, 0].numel()
        while rounds < max_iter and bool(active.any()):
            lo = int(prefix[active].min())
            hi = min(S, lo + window)
            # 1. the expensive part: new states of the window slots (inputs are slots lo-1 .. hi-2)
            inputs = z[:, max(lo - 1, 0) : hi - 1]
            if calibrate and rounds == 0:  # the model's own linearisation, measured in the first call
                levels = min(calibration_levels, max(1, (hi - lo) // 3))  # probes: at most a third of the round
                new, prior = f.eval_eps_calibrated(z, lo, hi, levels)
                nfe += B * len(prior.levels)
            else:
                new = f.eval_eps(z, lo, hi)
            if not isinstance(new, Tensor) or new.shape != z[:, lo:hi].shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise ValueError(f"eval_eps(z, {lo}, {hi}) must return {tuple(z[:, lo:hi].shape)}, got {got}")
            new = new.to(z.dtype)
            R = new - z[:, lo:hi]
            # 2. the sweep D_j = R_j + M_j D_{j-1}; past the window R_j = 0 (linear fill-ahead)
            secants.observe(lo, hi, inputs, new, lambda v, j: f.linear_step(v, j, prior))
            D = _sweep(f, prior, secants, R, lo, S)
            finite = torch.isfinite(D.flatten(1)).all(dim=1)
            nonfinite |= active & ~finite
            write = active & finite
            z[:, lo:] = torch.where(image_view(write, D), z[:, lo:] + D, z[:, lo:])
            # 3. frontier: slot lo, then every next slot whose input moved less than its tolerance
            rms = torch.linalg.vector_norm(D.flatten(2), dim=-1, dtype=torch.float64) / math.sqrt(numel)
            small = (rms[:, : hi - lo - 1] <= slot_tol[lo : hi - 1])
            if carry:  # deterministic chain: what a frozen slot got wrong reaches x0 unchanged in kind
                small = _carried_small(f, prior, secants, D, small, lo, S, carried_tol * LEVEL)
            run = torch.cumprod(small.long(), dim=1).sum(dim=1)
            prefix = torch.where(write, torch.maximum(prefix, lo + 1 + run), prefix)
            done = write & (prefix >= S)
            if hi == S:  # the output slot was evaluated: stop when its change is invisible in 8 bits
                r_out = R[:, -1].flatten(1).abs().amax(dim=1).double()
                d_out = D[:, -1].flatten(1).abs().amax(dim=1).double()
                calm = (rms <= slot_tol[lo:]).all(dim=1)  # and no slot moved more than its noise tolerance
                done |= write & calm & (r_out <= out_tol) & (d_out <= out_tol)
                rate = torch.where(torch.isfinite(prev_out), rms[:, -1] / prev_out, math.nan)  # nan: no rate yet
                if estimate:  # linear convergence at rate q leaves about d q / (1 - q) (docs/solvers.md)
                    q = torch.maximum(rate, prev_rate.nan_to_num(0.0))  # the slower of the last two rates (nan: none)
                    left = torch.where(q < MAX_RATE, rms[:, -1] * q / (1 - q), math.inf)
                    done |= write & (left <= error_tol * LEVEL)
                prev_out = torch.where(write, rms[:, -1], prev_out)
                prev_rate = torch.where(write, rate, prev_rate)
            else:  # x0 moved by the fill-ahead alone: not a rate to trust
                prev_out = torch.full_like(prev_out, math.inf)
                prev_rate = torch.full_like(prev_rate, math.nan)
            # bookkeeping
            res_abs = torch.linalg.vector_norm(R.flatten(1), dim=-1, dtype=torch.float64)
            new_n = torch.linalg.vector_norm(new.flatten(1), dim=-1, dtype=torch.float64)
            res_slot = torch.linalg.vector_norm(R.flatten(2), dim=-1, dtype=torch.float64)
            new_slot = torch.linalg.vector_norm(new.flatten(2), dim=-1, dtype=torch.float64)
            image_rounds += active.long()
            last_res = torch.where(write, res_abs, last_res)
            last_round = torch.where(write, torch.full_like(last_round, rounds), last_round)
            nan_slots = torch.full((B, S), math.nan, dtype=torch.float64, device=dev)
            for key, per_image, per_slot in (("abs", res_abs, res_slot),
                                             ("rel", res_abs / (1e-5 + new_n), res_slot / (1e-5 + new_slot))):
                traces[key].append(torch.where(active, per_image, math.nan))
                row = nan_slots.clone()
                row[:, lo:hi] = torch.where(active[:, None], per_slot, math.nan)
                traces[key + "_slot"].append(row)
            converged |= done
            active = active & ~done & ~nonfinite
            windows.append((lo, hi))
            nfe += B * (hi - lo)
            rounds += 1
            if callback is not None:
                callback({"round": rounds - 1, "abs_residual": res_abs, "rel_residual": res_abs / (1e-5 + new_n),
                          "nfe": nfe, "active": active.clone(), "window": (lo, hi), "prefix": prefix.clone(),
                          "last_slot": z[:, -1]})

        image_status, status = overall_status(converged, nonfinite)
        stats = SolverStats(
            solver="quasi_newton", stop_mode="noise", tol=float(tol), rounds=rounds, nfe=nfe,
            abs_trace=_stack(traces["abs"], (B,), dev), rel_trace=_stack(traces["rel"], (B,), dev),
            abs_slot_trace=_stack(traces["abs_slot"], (B, S), dev), rel_slot_trace=_stack(traces["rel_slot"], (B, S), dev),
            converged=converged, image_status=image_status, status=status, image_rounds=image_rounds,
            best_residual=last_res, best_round=last_round,
            fallback_trace=torch.zeros(rounds, B, dtype=torch.long, device=dev),
            window_trace=torch.tensor(windows, dtype=torch.long, device=dev).view(rounds, 2),
        )
        return z, stats


def _carried_small(f, prior, secants: "_Secants", D: Tensor, small: Tensor, lo: int, S: int, limit: float) -> Tensor:
    """The frontier test for a deterministic chain: slot lo + i may join the converged prefix only if, besides its
    own tolerance (``small`` (B, n)), its change D_{lo+i} carried to the output slot by the sweep's M_k
    (k = lo+i+1 .. S-1) has RMS <= ``limit``. Checked in order and only while an image's run of small slots lasts,
    so a round carries a few slots (each S - lo - i - 1 linear steps, no model call). Returns the refined test."""
    small = small.clone()
    run = torch.ones(small.shape[0], dtype=torch.bool, device=small.device)
    numel = D[0, 0].numel()
    for i in range(small.shape[1]):
        run = run & small[:, i]
        if not bool(run.any()):
            break
        v = D[:, i]
        for k in range(lo + i + 1, S):
            v = f.linear_step(v, k, prior) + secants.correct(k, v)
        carried = torch.linalg.vector_norm(v.flatten(1), dim=-1, dtype=torch.float64) / math.sqrt(numel)
        run = run & (carried <= limit)
        small[:, i] = run
    return small


def _sweep(f, prior, secants: "_Secants", R: Tensor, lo: int, S: int) -> Tensor:
    """D_lo = R_lo, D_j = R_j + M_j D_{j-1} for j = lo+1 .. S-1 (R_j = 0 past the evaluated window).

    R: (B, hi - lo, C, H, W) residuals of the evaluated slots. Returns D (B, S - lo, C, H, W)."""
    D = R.new_zeros((R.shape[0], S - lo, *R.shape[2:]))
    for j in range(lo, S):
        d = R[:, j - lo] if j - lo < R.shape[1] else torch.zeros_like(R[:, 0])
        if j > lo:
            prev = D[:, j - lo - 1]
            d = d + f.linear_step(prev, j, prior) + secants.correct(j, prev)
        D[:, j - lo] = d
    return D


class _Secants:
    """Per-slot multisecant pairs (input change of slot j-1, output change of Phi_j), the last m of them."""

    def __init__(self, m: int):
        self.m = m
        self.last: dict[int, tuple[Tensor, Tensor]] = {}  # j -> (input x_{j-1}, output Phi_j) last evaluated
        self.pairs: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def observe(self, lo: int, hi: int, inputs: Tensor, outputs: Tensor, m0) -> None:
        """Record the evaluations of slots lo..hi-1 (inputs: slots max(lo-1, 0)..hi-2); m0(v, j) = M0_j v.
        Each pair is stored as (s, y - M0_j s), what the least-change correction needs."""
        if self.m == 0:
            return
        first_input = max(lo - 1, 0)  # inputs[:, i] is slot first_input + i, read by slot first_input + i + 1
        for j in range(max(lo, 1), hi):  # slot 0 reads the fixed x_T: no input change to learn from
            x_in, out = inputs[:, j - 1 - first_input], outputs[:, j - lo]
            if j in self.last:
                px, po = self.last[j]
                lst = self.pairs.setdefault(j, [])
                s = x_in - px
                lst.append((s, out - po - m0(s, j)))
                del lst[: -self.m]
            self.last[j] = (x_in.clone(), out.clone())

    def correct(self, j: int, v: Tensor) -> Tensor | float:
        """(Y - M0 S)(S^T S + reg)^{-1} S^T v for slot j (B, C, H, W); 0 without pairs."""
        pairs = self.pairs.get(j)
        if not pairs:
            return 0.0
        B = v.shape[0]
        Sm = torch.stack([s for s, _ in pairs], 1).reshape(B, len(pairs), -1).double()
        Y = torch.stack([y for _, y in pairs], 1).reshape(B, len(pairs), -1).double()
        G = Sm @ Sm.transpose(1, 2)
        n = G.shape[-1]
        eye = torch.eye(n, dtype=torch.float64, device=v.device)
        G = G + (1e-6 * G.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] + 1e-300) * eye
        c = torch.linalg.solve(G, Sm @ v.reshape(B, -1, 1).double())
        out = (Y.transpose(1, 2) @ c).reshape(v.shape).to(v.dtype)
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def _stack(rows: list[Tensor], shape: tuple[int, ...], dev) -> Tensor:
    return torch.stack(rows) if rows else torch.empty((0, *shape), dtype=torch.float64, device=dev)
