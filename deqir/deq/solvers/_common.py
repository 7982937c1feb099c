"""Shared plumbing of the solvers: option validation, map evaluation, per-round bookkeeping.

Private module: the public contract lives in :mod:`deqir.deq.solvers`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from deqir.deq.solvers.stats import Residuals, SolverStats, overall_status, residuals

__all__ = [
    "ReturnValue",
    "Select",
    "StopMode",
    "STOP_MODES",
    "RETURN_VALUES",
    "SELECTS",
    "Callback",
    "RoundTracker",
    "check_choice",
    "check_common",
    "check_state",
    "evaluate",
]

Callback = Callable[[dict[str, Any]], None]
StopMode = Literal["rel", "abs"]
ReturnValue = Literal["f", "x"]
Select = Literal["best", "last"]

STOP_MODES = ("rel", "abs")
RETURN_VALUES = ("f", "x")
SELECTS = ("best", "last")


def check_choice(name: str, value: object, valid: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the valid options when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def check_common(max_iter: int, tol: float, stop_mode: str, callback: Callback | None) -> None:
    """Validate the arguments every solver shares."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    check_choice("stop_mode", stop_mode, STOP_MODES)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")


def check_state(z0: Tensor) -> None:
    """z0 must be a floating tensor of shape (B, S, *rest) with B, S >= 1."""
    if not isinstance(z0, Tensor):
        raise ValueError(f"z0 must be a torch.Tensor of shape (B, S, ...), got {type(z0).__name__}")
    if z0.ndim < 2 or z0.shape[0] < 1 or z0.shape[1] < 1:
        raise ValueError(f"z0 must have shape (B, S, ...) with B, S >= 1, got {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise ValueError(f"z0 must be a floating-point tensor, got {z0.dtype}")


def evaluate(f: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """f(z), checked to be a tensor of z's shape and dtype (fail loudly, never cast silently)."""
    out = f(z)
    if not isinstance(out, Tensor) or out.shape != z.shape or out.dtype != z.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the map must return a tensor of shape {tuple(z.shape)} and dtype {z.dtype}, got {got}")
    return out


def image_view(mask: Tensor, like: Tensor) -> Tensor:
    """(B,) mask reshaped to broadcast against a (B, ...) tensor."""
    return mask.view(-1, *([1] * (like.ndim - 1)))


class RoundTracker:
    """Per-round bookkeeping for solvers that evaluate the full map: residuals, stopping, best iterate.

    An image leaves the iteration (is *frozen*) when it converges or when the map returns a non-finite
    value for it; the solver keeps its state unchanged from then on, so each image's result equals the
    result of solving it alone. The returned tensor holds, per image, the selected iterate:
    ``return_value="f"`` stores f(x), ``"x"`` stores x, of the round with the lowest stop-mode residual
    (``select="best"``) or of the latest finite round (``select="last"``). Before any finite round it is
    the caller's z0.
    """

    def __init__(
        self,
        solver: str,
        z0: Tensor,
        *,
        tol: float,
        stop_mode: str,
        return_value: str,
        select: str,
        callback: Callback | None,
    ) -> None:
        self.solver, self.tol, self.stop_mode = solver, float(tol), stop_mode
        self.return_value, self.select, self.callback = return_value, select, callback
        self.B, self.S = z0.shape[0], z0.shape[1]
        dev = z0.device
        self.active = torch.ones(self.B, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(self.B, dtype=torch.bool, device=dev)
        self.nonfinite = torch.zeros(self.B, dtype=torch.bool, device=dev)
        self.best_residual = torch.full((self.B,), math.inf, dtype=torch.float64, device=dev)
        self.best_round = torch.full((self.B,), -1, dtype=torch.long, device=dev)
        self.image_rounds = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.result = z0.detach().clone()
        self.rounds = 0
        self.nfe = 0
        self._abs: list[Tensor] = []
        self._rel: list[Tensor] = []
        self._abs_slot: list[Tensor] = []
        self._rel_slot: list[Tensor] = []
        self._fallbacks: list[Tensor] = []

    def record(self, x: Tensor, fx: Tensor, **extra: Any) -> Tensor:
        """Book one round (x, f(x)); returns the (B,) mask of images still iterating afterwards."""
        k = self.rounds
        res = residuals(x, fx)
        was_active = self.active
        finite = torch.isfinite(fx.flatten(1)).all(dim=1) & torch.isfinite(res.abs)
        ok = was_active & finite
        r = res.select(self.stop_mode)
        take = ok & (r < self.best_residual) if self.select == "best" else ok
        candidate = fx if self.return_value == "f" else x
        self.result = torch.where(image_view(take, candidate), candidate, self.result)
        self.best_residual = torch.where(take, r, self.best_residual)
        self.best_round = torch.where(take, torch.full_like(self.best_round, k), self.best_round)
        done = ok & (r < self.tol)
        self.converged |= done
        self.nonfinite |= was_active & ~finite
        self.image_rounds += was_active.long()
        self.active = ok & ~done
        self._append(res, was_active)
        self.rounds += 1
        self.nfe += self.B * self.S
        self.notify(res, last_slot=candidate[:, -1], **extra)
        return self.active

    def _append(self, res: Residuals, measured: Tensor) -> None:
        nan = math.nan
        self._abs.append(torch.where(measured, res.abs, nan))
        self._rel.append(torch.where(measured, res.rel, nan))
        self._abs_slot.append(torch.where(measured[:, None], res.abs_slot, nan))
        self._rel_slot.append(torch.where(measured[:, None], res.rel_slot, nan))
        self._fallbacks.append(torch.zeros(self.B, dtype=torch.long, device=self.active.device))

    def notify(self, res: Residuals, **extra: Any) -> None:
        """Call the progress callback with this round's per-image residuals."""
        if self.callback is not None:
            self.callback(
                {
                    "round": self.rounds - 1,
                    "abs_residual": res.abs,
                    "rel_residual": res.rel,
                    "nfe": self.nfe,
                    "active": self.active.clone(),
                    **extra,
                }
            )

    def add_fallbacks(self, counts: Tensor) -> None:
        """Add (B,) fallback counts to the latest round."""
        self._fallbacks[-1] = self._fallbacks[-1] + counts.to(torch.long)

    def finish(self, window_trace: Tensor | None = None) -> tuple[Tensor, SolverStats]:
        """The selected iterates (B, S, *rest) and the stats."""
        image_status, status = overall_status(self.converged, self.nonfinite)
        stats = SolverStats(
            solver=self.solver,
            stop_mode=self.stop_mode,
            tol=self.tol,
            rounds=self.rounds,
            nfe=self.nfe,
            abs_trace=_stack(self._abs, (self.B,)),
            rel_trace=_stack(self._rel, (self.B,)),
            abs_slot_trace=_stack(self._abs_slot, (self.B, self.S)),
            rel_slot_trace=_stack(self._rel_slot, (self.B, self.S)),
            converged=self.converged.clone(),
            image_status=image_status,
            status=status,
            image_rounds=self.image_rounds,
            best_residual=self.best_residual,
            best_round=self.best_round,
            fallback_trace=_stack(self._fallbacks, (self.B,), dtype=torch.long),
            window_trace=window_trace,
        )
        return self.result, stats


def _stack(rows: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
    if rows:
        return torch.stack(rows)
    return torch.empty((0, *shape), dtype=dtype)
