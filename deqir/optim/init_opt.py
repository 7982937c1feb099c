"""Initialization optimization: optimise the initial noise x_T through the DEQ equilibrium (docs/gradients.md).

Per step (docs/gradients.md, generalised):

1. build the joint map F(.; x_T) (:class:`~deqir.deq.joint_map.ChainMap`) with x_T differentiable;
2. solve X* = F(X*) without autograd, warm-started from the previous step's states (the official code
   reuses them as the Anderson initialisation; x_T moves little per step, so few rounds are needed);
3. attach the gradient (:mod:`deqir.deq.grad`: ``ift`` | ``phantom`` | ``unroll``), x0 = last slot;
4. per-image objective total_b = sum_k w_k L_k(x0_b, x_T_b) (:class:`~deqir.optim.losses.LossTerms`);
5. Adam on sum_b total_b (gradients do not mix between images; Adam is elementwise).

Every image has its own best step (lowest total, evaluated before each update, step 0 = the initial
x_T, so the result is never worse than the start), its own early stopping (``stop_below``: the official
``loss < 0.1`` rule; ``patience`` evaluations without an improvement larger than ``min_improvement``) and
is removed from the batch once stopped, so a batch gives the same result as optimising each image alone.
Pure numerics: progress goes to ``callback``; nothing is printed, logged, timed or written.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deqir.chains import make_step
from deqir.diffusion.chain import ChainCoefficients
from deqir.diffusion.protocols import EpsModel, LinearOperator
from deqir.deq.grad import DEQGradientConfig, resolve_adjoint_solver, sequential_with_gradient
from deqir.deq.joint_map import ChainMap, EpsEvaluator
from deqir.deq.solvers import get_solver, solver_options
from deqir.optim.losses import LossTerms, ReferenceKind

__all__ = ["SolveConfig", "InitOptResult", "optimize_init", "STOP_REASONS", "OPTIMIZABLE_CHAINS",
           "check_optimizable"]

#: Chains whose equilibrium x_T can be optimised through (every chain of deqir.chains). PiGDM and DPS take a VJP
#: through the model inside their step; with x differentiable it is taken with create_graph (double backward,
#: deqir.chains.base.eps_and_vjp), so IFT gradients include the model's second-order term (docs/gradients.md).
OPTIMIZABLE_CHAINS = ("ddnm", "ddrm", "diffpir", "pigdm", "dps")


def check_optimizable(chain: str) -> None:
    """ValueError unless x_T can be optimised through ``chain`` (:data:`OPTIMIZABLE_CHAINS`)."""
    if chain not in OPTIMIZABLE_CHAINS:
        raise ValueError(
            f"optimising x_T through chain {chain!r} is not supported; supported: {', '.join(OPTIMIZABLE_CHAINS)}")


#: Per-image ``InitOptResult.status`` values.
STOP_REASONS = ("max_steps", "stop_below", "patience", "nonfinite")


@dataclass(frozen=True)
class SolveConfig:
    """Forward solve of every optimisation step (plain values).

    Attributes:
        solver: ``"anderson"`` | ``"picard"`` | ``"sliding_window"``.
        max_iter, tol, stop_mode: stopping rule of one solve.
        options: extra solver keywords (e.g. ``history_size``, ``beta``).
        warm_start: start each solve from the previous step's states (official behaviour).
        sequential_sweep: solve each step's equilibrium by the sequential schedule *with* autograd
            (:func:`~deqir.deq.grad.sequential_with_gradient`: one sweep of T single-slot calls, exact) instead
            of a no-grad solve plus the gradient attachment; with the IFT gradient this is the exact
            back-substitution adjoint (docs/gradients.md) at T forward + T backward slot evaluations. Needs the
            step form and ``gradient.mode="ift"`` with ``adjoint_solver`` auto or back_substitution; the
            solver fields are then unused. The app sets it where solver=auto chose the sequential schedule.
    """

    solver: str
    max_iter: int
    tol: float
    stop_mode: str
    options: Mapping[str, Any] = field(default_factory=dict)
    warm_start: bool = True
    sequential_sweep: bool = False

    def __post_init__(self) -> None:
        valid = set(solver_options(self.solver)) - {"max_iter", "tol", "stop_mode", "callback"}
        unknown = set(self.options) - valid
        if unknown:
            raise ValueError(f"solver {self.solver!r} has no option(s) {sorted(unknown)}; "
                             f"valid: {', '.join(sorted(valid))}")


@dataclass
class InitOptResult:
    """Outcome of :func:`optimize_init` / :func:`~deqir.optim.inversion.invert_image` (all tensors detached).

    Attributes:
        x_T_best: (B, C, H, W) per image the x_T with the lowest objective.
        x0_best: (B, C, H, W) the restored image of that x_T (last slot of the equilibrium).
        states: (B, T, C, H, W) the equilibrium states at the best step (warm start for re-sampling).
        x_T_init: (B, C, H, W) the starting x_T.
        history: one dict per evaluation (step 0 = x_T_init), plain Python values, per-image lists (NaN for
            images that had stopped): ``step``, ``loss`` (total), each term (``consistency``, ``reference``,
            ``oracle``, ``prior``), ``psnr`` (vs ``ground_truth``, when given), ``active``,
            ``solver_rounds`` (of the batch solve), ``solver_residual``, ``solver_converged`` (the solver's own
            per-image verdict, 1.0 / 0.0), ``nfe`` (batch model image-evaluations
            of the solve and the gradient attachment), ``image_nfe`` (the same per image),
            ``adjoint_rounds`` (IFT; None when no backward ran), ``uses_oracle``.
        best_step: per image the step of ``x_T_best``.
        best_loss: per image the lowest objective.
        status: per image why it stopped (:data:`STOP_REASONS`).
        uses_oracle: the objective used the ground truth (``oracle`` term): analysis only.
        loss_weights: the positive weights used.
    """

    x_T_best: Tensor
    x0_best: Tensor
    states: Tensor
    x_T_init: Tensor
    history: list[dict[str, Any]]
    best_step: list[int]
    best_loss: list[float]
    status: list[str]
    uses_oracle: bool
    loss_weights: dict[str, float]

    @property
    def psnr_trace(self) -> list[list[float]]:
        """PSNR per evaluation and image (empty without ground truth)."""
        return [h["psnr"] for h in self.history if "psnr" in h]

    def summary(self) -> list[dict[str, Any]]:
        """One row of plain values per image: best step/loss, status, evaluations, forward model
        image-evaluations (solves + gradient attachments, backward passes not counted), oracle flag."""
        rows = []
        for b in range(len(self.best_step)):
            evals = [h for h in self.history if h["active"][b]]
            rows.append({
                "best_step": self.best_step[b], "best_loss": self.best_loss[b], "status": self.status[b],
                "evaluations": len(evals), "nfe": int(sum(h["image_nfe"][b] for h in evals)),
                "uses_oracle": self.uses_oracle,
                **({"psnr_init": evals[0]["psnr"][b], "psnr_best": self.history[self.best_step[b]]["psnr"][b]}
                   if evals and "psnr" in evals[0] else {}),
            })
        return rows


def _psnr(x0: Tensor, target: Tensor) -> list[float]:
    """PSNR in dB of [-1, 1] images on the [0, 1] scale (clamped, not quantised), per image."""
    from deqir.metrics.fidelity import psnr

    p = ((x0.detach().double() + 1) / 2).clamp(0, 1)
    t = ((target.detach().double().to(p.device) + 1) / 2).clamp(0, 1)
    return [float(v) for v in psnr(p, t, quantized=False).tolist()]


def _scatter(values: Tensor, index: Tensor, B: int) -> list[float]:
    """(B',) values of the active images -> length-B list with NaN elsewhere."""
    out = [math.nan] * B
    for i, v in zip(index.tolist(), values.detach().double().cpu().tolist()):
        out[i] = v
    return out


def optimize_init(
    model: EpsModel,
    coeffs: ChainCoefficients,
    x_T0: Tensor,
    *,
    losses: Mapping[str, float],
    operator: LinearOperator | None = None,
    y: Tensor | None = None,
    z: Tensor | None = None,
    reference: Tensor | None = None,
    ground_truth: Tensor | None = None,
    reference_kind: ReferenceKind = "lpips",
    lpips_net: str = "vgg",
    lpips_loss: nn.Module | None = None,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    patience: int | None = None,
    min_improvement: float = 0.0,
    stop_below: float | None = None,
    solve: SolveConfig,
    gradient: DEQGradientConfig | None = None,
    init_states: Tensor | None = None,
    max_batch: int | None = None,
    eps_evaluator: EpsEvaluator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    map_form: str,
    clip_x0: bool = False,
    chain: str = "ddnm",
    chain_params: Mapping[str, Any] | None = None,
    sigma_y: float = 0.0,
) -> InitOptResult:
    """Optimise x_T per image through the DEQ equilibrium against a weighted per-image objective.

    Args:
        model, coeffs: eps-model and chain coefficients (T steps).
        x_T0: (B, C, H, W) starting noise (not modified).
        losses: {term: weight} over ``consistency``, ``reference``, ``oracle``, ``prior``
            (:mod:`deqir.optim.losses`); terms with weight 0 are skipped.
        operator, y, z: degradation, measurements (B, ...) and chain noise, as
            :class:`~deqir.deq.joint_map.ChainMap`.
        reference: (B, C, H, W) reference image on [-1, 1] (``reference`` term).
        ground_truth: (B, C, H, W) on [-1, 1]: the ``oracle`` term and the ``psnr`` history column.
        reference_kind, lpips_net, lpips_loss: ``"lpips"`` | ``"l2"``; LPIPS backbone; a prebuilt LPIPS
            module returning per-image values (reuse it across calls).
        steps: maximum number of Adam updates (``steps + 1`` evaluations).
        lr, betas: Adam hyper-parameters (elementwise, so images stay independent).
        patience: stop an image after this many evaluations without a decrease of its best objective
            by more than ``min_improvement`` (None: never).
        stop_below: stop an image once its objective is below this value (official: 0.1 with LPIPS).
        solve: forward solver settings (:class:`SolveConfig`; `deqir.lit` builds it from `solver/`).
        gradient: gradient attachment (default IFT, :class:`~deqir.deq.grad.DEQGradientConfig`).
        init_states: (B, T, C, H, W) states for the first solve (default: every slot = x_T).
        max_batch, eps_evaluator: model micro-batching / replacement evaluator, as ``ChainMap``.
        map_form, clip_x0: the joint map's form (``cumsum`` | ``step``) and x0 clipping, as ``ChainMap``.
        chain, chain_params, sigma_y: the restoration chain (:data:`OPTIMIZABLE_CHAINS`; pigdm / dps are
            differentiated through their model VJP: double backward), its parameters and the measurement noise
            std on [0, 1]; chains other than ddnm are solved in the step form (docs/chains.md).
        callback: called after every evaluation with the history entry plus ``"x0"`` ((B', C, H, W) of the
            active images) and ``"index"`` (their batch indices).

    Returns:
        :class:`InitOptResult`.

    Raises:
        ValueError: invalid arguments (unknown loss names, missing inputs, bad shapes).
        RuntimeError: called under ``torch.inference_mode()``.
    """
    gradient = gradient or DEQGradientConfig()
    B, T = x_T0.shape[0], len(coeffs)
    _check_arguments(x_T0, T, steps=steps, patience=patience, lr=lr, init_states=init_states, reference=reference,
                     ground_truth=ground_truth, chain=chain, map_form=map_form, solve=solve, gradient=gradient)
    terms = LossTerms(losses, operator=operator, y=y, reference=reference, ground_truth=ground_truth,
                      reference_kind=reference_kind, lpips_net=lpips_net, lpips_loss=lpips_loss)
    solver_fn = get_solver(solve.solver)

    x_T = x_T0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x_T], lr=lr, betas=betas)
    prev = None if init_states is None else init_states.detach().to(x_T.dtype)
    best = _BestSoFar(x_T0)
    history: list[dict[str, Any]] = []

    for step in range(steps + 1):
        idx = best.active.nonzero().squeeze(1)
        everyone = bool(best.active.all())
        sub = (lambda t: t) if everyone else (lambda t: None if t is None else t[idx.to(t.device)])
        info: dict[str, Any] = {}
        with torch.enable_grad():
            xa = sub(x_T)
            # 1. the map, differentiable in x_T (its constants hold the x_T graph)
            step_fn = None if chain == "ddnm" else make_step(
                chain, coeffs, operator=operator, y=sub(y), z=sub(z), sigma_y=sigma_y,
                **{"clip_x0": clip_x0, **dict(chain_params or {})})
            fmap = ChainMap(model, coeffs, xa, operator=operator, y=sub(y), z=sub(z), max_batch=max_batch,
                            eps_evaluator=eps_evaluator, form=map_form, clip_x0=clip_x0, step_fn=step_fn)
            if solve.sequential_sweep:  # 2.+3. one sweep with autograd: exact equilibrium and IFT gradient
                states = sequential_with_gradient(fmap)
                stats = _SweepStats.of(states)
            else:
                # 2. forward solve without autograd, warm-started
                z0 = sub(prev) if prev is not None else fmap.initial_state()
                z_star, stats = solver_fn(fmap, z0, max_iter=solve.max_iter, tol=solve.tol,
                                          stop_mode=solve.stop_mode, **dict(solve.options))
                # 3. gradient attachment; x0 = last slot
                states = gradient.attach(fmap, z_star, on_backward=info.update)
            x0 = states[:, -1]
            # 4. per-image objective
            vals = terms(x0, xa, None if everyone else idx)
        total = vals["total"].detach().double().cpu()
        entry = _history_entry(step, idx, B, T, total, vals, terms, best.active, stats,
                               0 if solve.sequential_sweep else _attach_evals(gradient))
        if ground_truth is not None:
            entry["psnr"] = _scatter(torch.tensor(_psnr(x0, sub(ground_truth)), dtype=torch.float64), idx, B)
        history.append(entry)

        # 5. per-image best, early stopping (decided on this evaluation, before the update)
        best.update(step, idx, total, x_T, states, min_improvement=min_improvement, stop_below=stop_below,
                    patience=patience)

        if step == steps or not bool(best.active.any()):
            if callback is not None:
                callback({**entry, "x0": x0.detach(), "index": idx})
            break
        # 6. Adam step on the images still active
        _adam_step(opt, x_T, vals["total"], best.active, idx)
        entry["adjoint_rounds"] = info.get("adjoint_rounds")
        if callback is not None:
            callback({**entry, "x0": x0.detach(), "index": idx})
        if solve.warm_start:  # next solve starts from these states (step 0 always covers the whole batch)
            new = states.detach()
            prev = new if prev is None or len(idx) == B else prev.index_copy(0, idx.to(prev.device), new)
        del fmap, states, x0, vals

    return InitOptResult(
        x_T_best=best.x_T, x0_best=best.x0, states=best.states, x_T_init=x_T0.detach().clone(), history=history,
        best_step=best.step, best_loss=best.loss.tolist(), status=best.status, uses_oracle=terms.uses_oracle,
        loss_weights=dict(terms.weights),
    )


def _check_arguments(x_T0: Tensor, T: int, *, steps: int, patience: int | None, lr: float,
                     init_states: Tensor | None, reference: Tensor | None, ground_truth: Tensor | None, chain: str,
                     map_form: str, solve: SolveConfig, gradient: DEQGradientConfig) -> None:
    """RuntimeError under inference mode; ValueError (one line) for an invalid argument."""
    if torch.is_inference_mode_enabled() or x_T0.is_inference():
        raise RuntimeError("optimize_init needs autograd: call it outside torch.inference_mode() "
                           "(with Lightning: Trainer(inference_mode=False)).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be an integer >= 1 or None, got {patience!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    shape = (x_T0.shape[0], T, *x_T0.shape[1:])
    if init_states is not None and tuple(init_states.shape) != shape:
        raise ValueError(f"init_states must have shape {shape}, got {tuple(init_states.shape)}")
    for name, t in (("reference", reference), ("ground_truth", ground_truth)):
        if t is not None and tuple(t.shape) != tuple(x_T0.shape):
            raise ValueError(f"{name} must have the shape of x_T0 {tuple(x_T0.shape)}, got {tuple(t.shape)}")
    check_optimizable(chain)
    if chain != "ddnm" and map_form != "step":
        raise ValueError(f"chain {chain!r} is solved in the map's step form: pass map_form='step'")
    if solve.sequential_sweep:
        if map_form != "step":
            raise ValueError("solve.sequential_sweep needs the map's step form: pass map_form='step'")
        if gradient.mode != "ift" or resolve_adjoint_solver(gradient.adjoint_solver, map_form) != "back_substitution":
            raise ValueError("solve.sequential_sweep gives the IFT gradient with the back-substitution adjoint: "
                             "use gradient mode 'ift' with adjoint_solver auto or back_substitution, or turn "
                             "the sweep off")


def _history_entry(step: int, idx: Tensor, B: int, T: int, total: Tensor, vals: dict[str, Tensor],
                   terms: LossTerms, active: Tensor, stats, attach_evals: int) -> dict[str, Any]:
    """One evaluation's :attr:`InitOptResult.history` entry (per-image lists, NaN for stopped images)."""
    return {
        "step": step,
        "loss": _scatter(total, idx, B),
        **{n: _scatter(vals[n], idx, B) for n in terms.names},
        "active": active.tolist(),
        "solver_rounds": int(stats.rounds),
        "solver_residual": _scatter(stats.best_residual, idx, B),
        "solver_converged": _scatter(stats.converged.double(), idx, B),
        "nfe": int(stats.nfe) + attach_evals * len(idx) * T,
        "image_nfe": _scatter((stats.image_rounds.cpu() + attach_evals) * T, idx, B),
        "adjoint_rounds": None,
        "uses_oracle": terms.uses_oracle,
    }


def _attach_evals(gradient: DEQGradientConfig) -> int:
    """Map evaluations (rounds of T slots) of the gradient attachment."""
    return {"ift": 1, "phantom": gradient.phantom_steps, "unroll": gradient.unroll_rounds}[gradient.mode]


@dataclass(frozen=True)
class _SweepStats:
    """The solver facts of a sequential sweep (exact: one evaluation of every slot, residual 0)."""

    rounds: int
    nfe: int
    best_residual: Tensor
    converged: Tensor
    image_rounds: Tensor

    @classmethod
    def of(cls, states: Tensor) -> "_SweepStats":
        B, T = states.shape[:2]
        finite = torch.isfinite(states.detach()).flatten(1).all(1).cpu()
        return cls(rounds=T, nfe=B * T, best_residual=torch.where(finite, 0.0, math.inf).double(),
                   converged=finite, image_rounds=torch.ones(B, dtype=torch.long))


class _BestSoFar:
    """Per image: the lowest objective so far with its step, x_T, states and x0; early-stopping state."""

    def __init__(self, x_T0: Tensor):
        B = x_T0.shape[0]
        self.loss = torch.full((B,), math.inf, dtype=torch.float64)
        self.step = [0] * B
        self.wait = torch.zeros(B, dtype=torch.long)
        self.active = torch.ones(B, dtype=torch.bool)
        self.status = ["max_steps"] * B
        self.x_T, self.x0, self.states = x_T0.detach().clone(), None, None

    @torch.no_grad()
    def update(self, step: int, idx: Tensor, total: Tensor, x_T: Tensor, states: Tensor, *, min_improvement: float,
               stop_below: float | None, patience: int | None) -> None:
        """Record evaluation ``step`` of the active images ``idx`` (objective ``total``, their ``states``)."""
        if step == 0:  # every image is active at step 0
            self.states = states.detach().clone()
            self.x0 = self.states[:, -1].clone()
        for k, i in enumerate(idx.tolist()):
            v = float(total[k])
            if not math.isfinite(v):
                self.active[i], self.status[i] = False, "nonfinite"
                continue
            self.wait[i] = 0 if v < float(self.loss[i]) - min_improvement else self.wait[i] + 1
            if v < float(self.loss[i]):
                self.loss[i], self.step[i] = v, step
                self.x_T[i] = x_T[i].detach()
                self.states[i] = states[k].detach()
                self.x0[i] = states[k, -1].detach()
            if stop_below is not None and v < stop_below:
                self.active[i], self.status[i] = False, "stop_below"
            elif patience is not None and int(self.wait[i]) >= patience:
                self.active[i], self.status[i] = False, "patience"


def _adam_step(opt: torch.optim.Optimizer, x_T: Tensor, total: Tensor, active: Tensor, idx: Tensor) -> None:
    """One Adam update of the images still active; images that stopped are restored afterwards (Adam's
    momentum would still move them)."""
    keep = active[idx].to(total.device)
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():  # also when the caller runs under torch.no_grad()
        torch.where(keep, total, torch.zeros_like(total)).sum().backward()
    frozen = x_T.detach().clone()
    opt.step()
    with torch.no_grad():
        x_T.copy_(torch.where(active.to(x_T.device).view(-1, *[1] * (x_T.ndim - 1)), x_T, frozen))
