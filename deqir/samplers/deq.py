"""DeqIR parallel sampling: solve the whole chain as one fixed point X = F(X) (DeqIR, Cao et al. 2024; docs/solvers.md)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deqir.diffusion.chain import ChainCoefficients
from deqir.diffusion.protocols import EpsModel, LinearOperator
from deqir.diffusion.schedule import SamplingGrid
from deqir.samplers.sequential import sample_sequential
from deqir.deq.joint_map import ChainMap, EpsEvaluator
from deqir.deq.linearize import SpectralGaussianPrior
from deqir.deq.solvers import SolverStats, get_solver, solver_options

INITS = ("x_T", "coarse", "extrapolate", "surrogate")


@dataclass
class DEQResult:
    """Outcome of :func:`sample_deq`.

    Attributes:
        x0: (B, C, H, W) restored images on [-1, 1] (last slot of the returned state).
        states: (B, T, C, H, W) the whole chain at the returned iterate.
        stats: the solver's statistics.
        init_nfe: model image-evaluations spent on the warm start (0 for ``x_T``).
    """

    x0: Tensor
    states: Tensor
    stats: SolverStats
    init_nfe: int

    @property
    def nfe(self) -> int:
        """Total model image-evaluations (warm start + solver)."""
        return self.init_nfe + int(self.stats.nfe)


@torch.no_grad()
def coarse_warm_start(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x_T: Tensor,
    num_steps: int,
    *,
    operator: LinearOperator | None = None,
    y: Tensor | None = None,
) -> Tensor:
    """A cheap initial chain: a ``num_steps``-step deterministic DDIM/DDNM pass on a subset of the grid,
    re-noised onto every fine slot as X_j = sqrt(a'_j) x0_c + sqrt(1 - a'_j) eps_c (DDIM eq. 12) from the
    last coarse step c that starts at or above t'_j. Costs B * num_steps evaluations. (B, T, C, H, W).
    """
    T = len(coeffs)
    if not 1 <= num_steps <= T:
        raise ValueError(f"coarse warm start needs 1 <= steps <= T = {T}, got {num_steps}")
    idx = sorted({round(i * (T - 1) / max(1, num_steps - 1)) for i in range(num_steps)}) if num_steps > 1 else [0]
    t_c = tuple(int(coeffs.t[i]) for i in idx)
    grid = SamplingGrid(t=t_c, t_next=t_c[1:] + (-1,))
    a = coeffs.a[idx]
    a_next = torch.cat([coeffs.a[idx[1:]], torch.ones(1, dtype=a.dtype)])
    coarse = ChainCoefficients(t=torch.tensor(grid.t), a=a, a_next=a_next, c1=torch.zeros_like(a),
                               c2=torch.sqrt(1 - a_next), lam=coeffs.lam[idx])
    record: list[tuple[Tensor, Tensor]] = []

    def keep(info: dict) -> None:
        record.append((info["x0_tilde"], info["eps"]))

    sample_sequential(model, coarse, x_T, operator=operator, y=y, callback=keep)
    states = []
    for j in range(T):
        t_next = -1 if j == T - 1 else int(coeffs.t[j + 1])
        c = max(k for k, t in enumerate(t_c) if t >= t_next) if t_next >= 0 else len(t_c) - 1
        x0_c, eps_c = record[c]
        an = float(coeffs.a_next[j])
        states.append(an**0.5 * x0_c + (1 - an) ** 0.5 * eps_c)
    return torch.stack(states, dim=1).to(x_T.dtype)


def sample_deq(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x_T: Tensor,
    *,
    operator: LinearOperator | None = None,
    y: Tensor | None = None,
    z: Tensor | None = None,
    solver: str,
    max_iter: int,
    tol: float,
    stop_mode: str,
    options: dict[str, Any] | None = None,
    init: str | Tensor,
    coarse_steps: int | None = None,
    max_batch: int | None = None,
    eps_evaluator: EpsEvaluator | None = None,
    callback: Callable[[dict], None] | None = None,
    form: str,
    clip_x0: bool = False,
    step_fn=None,
) -> DEQResult:
    """Restore by solving the joint fixed point of the T-step chain (all timesteps in one batch per round).

    The settings that ``conf/`` holds (solver, stopping rule, init, form) have no defaults here (docs/api.md).

    Args:
        model, coeffs, x_T, operator, y, z: as :class:`~deqir.deq.joint_map.ChainMap`.
        solver: ``anderson`` | ``picard`` | ``sliding_window`` | ``quasi_newton``; ``options`` its extra keywords
            (e.g. ``history_size``, ``lam``, ``beta``, ``mixing``, ``window``).
        max_iter, tol, stop_mode: stopping rule (rounds, relative/absolute residual).
        init: ``x_T`` (every slot = x_T, the paper), ``extrapolate`` (every step taken with the eps consistent
            with x0 = A^+ y, no model call: :meth:`~deqir.deq.joint_map.ChainMap.extrapolated_state`),
            ``surrogate`` (the chain run with a Gaussian prior's denoiser in place of the model, no model call:
            :meth:`~deqir.deq.joint_map.ChainMap.surrogate_state`; the prior is the solver's ``prior_slope`` /
            ``prior_variance`` when it has them),
            ``coarse`` (:func:`coarse_warm_start` with ``min(coarse_steps, T)`` steps; ``coarse_steps`` is
            required then and unused otherwise) or a (B, T, C, H, W)
            tensor of initial states (e.g. a neighbouring image's converged chain).
        max_batch: micro-batch size of the model calls (memory bound; results do not depend on it).
        eps_evaluator: replaces the model call (e.g. timestep-parallel evaluation across ranks).
        callback: called once per round with the solver's info dict.
        form, clip_x0: the map's form (``cumsum``, the paper's, or ``step``) and x0 clipping (step form only);
            see :mod:`deqir.deq.joint_map`.
        step_fn: the chain's step (:mod:`deqir.chains`, bound to this problem) for the step form; None = DDNM.
    """
    fmap = ChainMap(model, coeffs, x_T, operator=operator, y=y, z=z, max_batch=max_batch,
                    eps_evaluator=eps_evaluator, form=form, clip_x0=clip_x0, step_fn=step_fn)
    init_nfe = 0
    if isinstance(init, Tensor):
        if init.shape != (x_T.shape[0], len(coeffs), *x_T.shape[1:]):
            raise ValueError(f"init states must have shape (B, T, C, H, W), got {tuple(init.shape)}")
        z0 = init.to(x_T.dtype)
    elif init == "x_T":
        z0 = fmap.initial_state()
    elif init == "extrapolate":
        z0 = fmap.extrapolated_state()
    elif init == "surrogate":
        o = options or {}  # the solver's prior when it has one (quasi_newton), else the prior's defaults
        z0 = fmap.surrogate_state(SpectralGaussianPrior(**{k[6:]: o[k] for k in ("prior_slope", "prior_variance")
                                                            if o.get(k) is not None}))
    elif init == "coarse":
        # the warm start runs the model directly; route it through the evaluator when one is given
        m = model if eps_evaluator is None else eps_evaluator
        if coarse_steps is None:
            raise ValueError("init='coarse' needs coarse_steps (the warm start's number of steps)")
        steps = min(int(coarse_steps), len(coeffs))  # a warm start never needs more steps than the chain
        z0 = coarse_warm_start(m, coeffs, x_T, steps, operator=operator, y=y)
        init_nfe = x_T.shape[0] * steps
    else:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)} or a tensor of states")
    solve = get_solver(solver)
    opts = dict(options or {})
    unknown = set(opts) - set(solver_options(solver))
    if unknown:
        raise ValueError(f"solver {solver!r} has no option(s) {sorted(unknown)}; valid: "
                         f"{', '.join(o for o in solver_options(solver) if o != 'callback')}")
    states, stats = solve(fmap, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, callback=callback, **opts)
    return DEQResult(x0=states[:, -1], states=states, stats=stats, init_nfe=init_nfe)
