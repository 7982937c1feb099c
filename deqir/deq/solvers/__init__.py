"""Generic fixed-point solvers for z = f(z) with state z of shape (B, S, *rest) (docs/solvers.md).

B independent problems (images), S slots (the T timesteps of the chain). One contract:

    solve(f, z0, *, max_iter, tol, stop_mode="rel" | "abs", callback=None, **solver_options) -> (z, stats)

* Every solver runs under ``torch.no_grad()`` (gradients are attached elsewhere), never prints, logs or
  times, and works in float32 / float64 on any device.
* Each solver has explicit keyword options; an unknown keyword is a ``TypeError``, an invalid value a
  ``ValueError`` naming the valid ones. :func:`solver_options` lists a solver's keywords so a config
  layer can pass only the relevant ones.
* ``stats`` is a :class:`SolverStats` value (residual traces per image and slot, nfe, status, ...).
* A map producing NaN/inf for an image freezes that image at its best finite iterate with status
  "nonfinite"; no exception escapes from the linear algebra.

Solvers: ``"anderson"`` (type-II Anderson, official DeqIR defaults), ``"picard"`` (fixed-point
iteration, exact after S rounds on triangular maps), ``"sliding_window"`` (ParaDiGMS-style window over
a :class:`~deqir.deq.protocols.TriangularMap`), ``"quasi_newton"`` (Newton-like sweeps over the slots of a
step-form chain map with a Gaussian-prior linearisation, secant updates, a frontier window and
noise-scaled per-slot tolerances; :mod:`deqir.deq.solvers.newton`).

Example:
    >>> import torch
    >>> solve = get_solver("anderson")
    >>> z, stats = solve(lambda z: 0.5 * z + 1.0, torch.zeros(2, 4, 3), max_iter=15, tol=1e-6, lam_mode="relative")
    >>> stats.status, bool(torch.allclose(z, torch.full_like(z, 2.0)))
    ('converged', True)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from torch import Tensor

from deqir.deq.solvers.anderson import LAM_MODES, MIXINGS, anderson, anderson_weights
from deqir.deq.solvers.newton import quasi_newton
from deqir.deq.solvers.picard import picard
from deqir.deq.solvers.sliding_window import sliding_window
from deqir.deq.solvers.stats import RESIDUAL_EPS, STATUSES, Residuals, SolverStats, residuals

__all__ = [
    "LAM_MODES",
    "MIXINGS",
    "RESIDUAL_EPS",
    "SOLVERS",
    "STATUSES",
    "Residuals",
    "Solver",
    "SolverStats",
    "anderson",
    "anderson_weights",
    "get_solver",
    "picard",
    "quasi_newton",
    "residuals",
    "sliding_window",
    "solver_options",
]


class Solver(Protocol):
    """solve(f, z0, *, max_iter, tol, stop_mode, callback, **options) -> (z, stats)."""

    def __call__(
        self,
        f: Callable[[Tensor], Tensor],
        z0: Tensor,
        *,
        max_iter: int = ...,
        tol: float = ...,
        stop_mode: str = ...,
        callback: Callable[[dict[str, Any]], None] | None = ...,
        **options: Any,
    ) -> tuple[Tensor, SolverStats]: ...


#: Registry: config name -> solver function (read-only).
SOLVERS: Mapping[str, Solver] = MappingProxyType(
    {"anderson": anderson, "picard": picard, "sliding_window": sliding_window, "quasi_newton": quasi_newton}
)


def get_solver(name: str) -> Solver:
    """The solver registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(map(repr, SOLVERS))}") from None


def solver_options(name: str) -> tuple[str, ...]:
    """Keyword options accepted by solver ``name`` (including max_iter, tol, stop_mode, callback).

    Example:
        >>> solver_options("picard")
        ('max_iter', 'tol', 'stop_mode', 'beta', 'return_value', 'select', 'callback')
    """
    params = inspect.signature(get_solver(name)).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
