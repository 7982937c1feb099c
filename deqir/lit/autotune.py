"""``solver=auto``: measure once how much a batch of slots costs against one, and choose the schedule.

Parallel sampling pays only where a batch of b slots costs about as much as one call (idle batch capacity:
a GPU with a small model or image). Where it costs b calls (a CPU), every extra slot evaluation is extra
wall-clock and the cheapest exact schedule is the sequential one. So (docs/solvers.md "solver=auto"):

* ``knee`` = the largest probed batch whose cost is at most ``knee_factor`` x the cost of one image;
* slots per round = knee // B (B images per batch). >= T: all slots every round (round-minimising);
  1: the sequential schedule (work 1, no parallel overhead); in between: a frontier window of that many
  slots with ``max_batch`` = knee (the micro-batch at the knee of the cost curve).

The timing lives here, at the application edge; the solvers themselves never time anything.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class AutoChoice:
    """What ``solver=auto`` picked and why (written to the summary line and ``metrics.json``)."""

    schedule: str  # "all_slots" | "window" | "sequential"
    window: int | None
    max_batch: int | None
    knee: int
    costs: dict[int, float] = field(default_factory=dict)  # batch size -> seconds per call
    reason: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> AutoChoice:
        """Inverse of :meth:`as_dict` (a resumed run reuses its first choice, so its results cannot change)."""
        return cls(str(d["schedule"]), d.get("window"), d.get("max_batch"), int(d["knee"]),
                   {int(k): float(v) for k, v in (d.get("batch_cost_s") or {}).items()}, str(d.get("reason", "")))

    def as_dict(self) -> dict:
        return {"schedule": self.schedule, "window": self.window, "max_batch": self.max_batch, "knee": self.knee,
                "batch_cost_s": {str(k): round(v, 6) for k, v in self.costs.items()}, "reason": self.reason}


def measure_batch_costs(evaluate: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: int, max_size: int,
                        knee_factor: float = 1.5, repeats: int = 2) -> dict[int, float]:
    """Seconds per call of ``evaluate`` on batches 1, 2, 4, ... <= max_size of the image x (1, C, H, W).

    Stops doubling once a batch costs more than ``knee_factor`` x one image (the knee has been passed), so
    a CPU spends about four calls here. Best of ``repeats`` after one warm-up call.
    """
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    costs: dict[int, float] = {}
    with torch.no_grad():
        evaluate(x, torch.full((1,), t, dtype=torch.long, device=x.device))  # warm-up (allocator, kernels)
        b = 1
        while b <= max_size:
            xb = x.expand(b, *x.shape[1:]).contiguous()
            tb = torch.full((b,), t, dtype=torch.long, device=x.device)
            best = float("inf")
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                evaluate(xb, tb)
                sync()
                best = min(best, time.perf_counter() - start)
            costs[b] = best
            if best > knee_factor * costs[1] or b == max_size:
                break
            b = min(2 * b, max_size)
    return costs


def choose_schedule(costs: dict[int, float], num_slots: int, batch_images: int,
                    knee_factor: float = 1.5) -> AutoChoice:
    """The schedule for measured ``costs`` (see the module docstring)."""
    c1 = costs[1]
    knee = max(b for b, c in costs.items() if c <= knee_factor * c1)
    slots = knee // max(1, batch_images)
    ratio = ", ".join(f"{b}: {c / c1:.2f}x" for b, c in sorted(costs.items()))
    if slots >= num_slots:
        return AutoChoice("all_slots", None, None, knee, costs,
                          f"idle batch capacity (cost of a batch vs one image: {ratio}): all {num_slots} slots "
                          "every round, fewest rounds")
    if slots <= 1:
        return AutoChoice("sequential", 1, None, knee, costs,
                          f"no idle batch capacity (cost of a batch vs one image: {ratio}): every extra slot "
                          "evaluation costs wall-clock, so the sequential schedule (work 1.0) is the fastest")
    return AutoChoice("window", slots, knee, knee, costs,
                      f"batch capacity up to {knee} images (cost vs one image: {ratio}): a frontier window of "
                      f"{slots} slots per round, micro-batch {knee}")
