"""Solver statistics as a value (torchdeq's ``SolverStat`` idea, as a typed dataclass).

Every solver returns ``(z, stats)``; callers decide what to log. One *round* is one evaluation of the map
(for the sliding window: one evaluation of the current window). Residuals (the official sampler's definition, docs/solvers.md):

    abs = ||f(z) - z||_2,        rel = abs / (1e-5 + ||f(z)||_2)

per image (over all slots and pixels of that image) and per (image, slot).

Example:
    >>> import torch
    >>> from deqir.deq.solvers import picard
    >>> z, stats = picard(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3, 4), max_iter=60, tol=1e-6)
    >>> stats.status, stats.rounds, stats.nfe
    ('converged', 20, 120)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["RESIDUAL_EPS", "STATUSES", "Residuals", "SolverStats", "residuals"]

#: Added to the denominator of the relative residual (official DeqIR / DEQ-DDIM value).
RESIDUAL_EPS = 1e-5

#: Possible values of ``SolverStats.status`` and of each entry of ``SolverStats.image_status``.
STATUSES = ("converged", "max_iter", "nonfinite")

Status = Literal["converged", "max_iter", "nonfinite"]


@dataclass(frozen=True)
class Residuals:
    """Residuals of one round, all float64.

    Attributes:
        abs_slot: (B, S) ||new_s - old_s|| per image and slot.
        rel_slot: (B, S) abs_slot / (1e-5 + ||new_s||).
        abs: (B,) ||new - old|| over all slots of an image.
        rel: (B,) abs / (1e-5 + ||new||).
    """

    abs_slot: Tensor
    rel_slot: Tensor
    abs: Tensor
    rel: Tensor

    def select(self, stop_mode: str) -> Tensor:
        """The per-image residual that ``stop_mode`` ("rel" | "abs") compares with ``tol``: (B,)."""
        return self.rel if stop_mode == "rel" else self.abs

    def select_slot(self, stop_mode: str) -> Tensor:
        """The per-slot residual for ``stop_mode``: (B, S)."""
        return self.rel_slot if stop_mode == "rel" else self.abs_slot


def residuals(old: Tensor, new: Tensor) -> Residuals:
    """Absolute and relative residuals of ``new`` against ``old`` (both (B, S, *rest)).

    For a fixed-point round ``old = z`` and ``new = f(z)``. Norms are accumulated in float64 so a float32
    state cannot overflow them; a non-finite entry makes the image's residuals non-finite.

    Args:
        old: (B, S, *rest) iterate.
        new: (B, S, *rest) its image under the map (or the re-evaluated state).

    Returns:
        :class:`Residuals` with (B, S) and (B,) float64 tensors.
    """
    diff = (new - old).flatten(2)
    abs_slot = torch.linalg.vector_norm(diff, dim=-1, dtype=torch.float64)
    new_slot = torch.linalg.vector_norm(new.flatten(2), dim=-1, dtype=torch.float64)
    abs_img = abs_slot.square().sum(-1).sqrt()
    new_img = new_slot.square().sum(-1).sqrt()
    return Residuals(
        abs_slot=abs_slot,
        rel_slot=abs_slot / (RESIDUAL_EPS + new_slot),
        abs=abs_img,
        rel=abs_img / (RESIDUAL_EPS + new_img),
    )


@dataclass(frozen=True)
class SolverStats:
    """What a solve did, per image. Tensors live on the state's device; traces are float64.

    Rows of the traces belong to rounds; an image that had already finished (converged or non-finite)
    gets NaN rows, so ``image_rounds`` counts the non-NaN rows. Slots not measured in a round (the
    sliding window measures only its window) are NaN as well.

    Attributes:
        solver: registry name of the solver.
        stop_mode: "rel" or "abs" (which residual was compared with ``tol``).
        tol: the tolerance (an image converges when its residual is strictly below it).
        rounds: number of rounds run (map evaluations; for the sliding window, window evaluations).
        nfe: model work in image-slot evaluations: sum over rounds of B x (slots evaluated).
        abs_trace: (rounds, B) absolute residual per image.
        rel_trace: (rounds, B) relative residual per image.
        abs_slot_trace: (rounds, B, S) absolute residual per image and slot.
        rel_slot_trace: (rounds, B, S) relative residual per image and slot.
        converged: (B,) bool, the image met the tolerance.
        image_status: per image "converged" | "max_iter" | "nonfinite".
        status: "nonfinite" if any image hit a non-finite map value, else "converged" if all converged,
            else "max_iter".
        image_rounds: (B,) long, rounds each image was iterated.
        best_residual: (B,) float64 stop-mode residual of the returned iterate (inf if none was finite;
            for the sliding window, the residual of the last window evaluated for the image).
        best_round: (B,) long, round of the returned iterate (-1: the caller's z0 was returned).
        fallback_trace: (rounds, B) long, per round and image the number of Anderson mixing problems
            (1 per image, or S per image with per-slot mixing) whose weights could not be computed
            (singular / non-finite system) and fell back to a damped Picard step. Zeros for other solvers.
        window_trace: (rounds, 2) long (lo, hi) of the evaluated window (sliding window only, else None).
    """

    solver: str
    stop_mode: str
    tol: float
    rounds: int
    nfe: int
    abs_trace: Tensor
    rel_trace: Tensor
    abs_slot_trace: Tensor
    rel_slot_trace: Tensor
    converged: Tensor
    image_status: tuple[Status, ...]
    status: Status
    image_rounds: Tensor
    best_residual: Tensor
    best_round: Tensor
    fallback_trace: Tensor
    window_trace: Tensor | None = None

    @property
    def fallbacks(self) -> int:
        """Total number of Anderson fallbacks (singular or non-finite mixing systems)."""
        return int(self.fallback_trace.sum())

    @property
    def trace(self) -> Tensor:
        """(rounds, B) the residual that was compared with ``tol`` (``rel_trace`` or ``abs_trace``)."""
        return self.rel_trace if self.stop_mode == "rel" else self.abs_trace

    def summary(self) -> dict[str, float | int | str]:
        """Plain Python scalars for loggers: status, rounds, nfe, fallbacks, worst final residual."""
        finite = self.best_residual[torch.isfinite(self.best_residual)]
        worst = float(finite.max()) if finite.numel() else float("inf")
        return {
            "solver": self.solver,
            "status": self.status,
            "rounds": self.rounds,
            "nfe": self.nfe,
            "fallbacks": self.fallbacks,
            "converged_fraction": float(self.converged.double().mean()) if self.converged.numel() else 1.0,
            "max_residual": worst,
        }


def overall_status(converged: Tensor, nonfinite: Tensor) -> tuple[tuple[Status, ...], Status]:
    """Per-image and overall status from (B,) bool masks (nonfinite wins over converged)."""
    per_image: tuple[Status, ...] = tuple(
        "nonfinite" if bad else ("converged" if ok else "max_iter")
        for ok, bad in zip(converged.tolist(), nonfinite.tolist())
    )
    if any(s == "nonfinite" for s in per_image):
        return per_image, "nonfinite"
    if all(s == "converged" for s in per_image):
        return per_image, "converged"
    return per_image, "max_iter"
