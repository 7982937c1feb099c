"""``mode=optimize_init`` and ``mode=invert``: per-image optimisation of x_T through the DEQ equilibrium.

Both subclass :class:`~deqir.lit.restoration.RestorationModule` and override only ``restore``. x_T is a
local tensor of the step with a local Adam (inside :func:`deqir.optim.optimize_init`) — never an
``nn.Parameter`` of the module, so nothing is all-reduced across ranks (different ranks hold different
images). Gradients need ``Trainer(inference_mode=False)`` (every ``trainer/`` config sets it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from deqir.deq.grad import DEQGradientConfig
from deqir.lit.restoration import Problem, RestorationModule, Restored
from deqir.optim import InitOptResult, SolveConfig, invert_image, optimize_init


@dataclass(frozen=True)
class OptimizationSettings:
    """Plain values of ``optimize/``; the defaults live in conf/optimize/default.yaml only."""

    steps: int
    lr: float
    losses: dict[str, float]
    reference_kind: str
    lpips_net: str
    patience: int | None
    min_improvement: float
    stop_below: float | None
    invert_init: str
    invert_init_iters: int
    invert_with_operator: bool
    prior_weight: float

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "OptimizationSettings":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(cfg) - known - {"reference_path", "invert_chain"}  # read by the app's builders
        if unknown:
            raise ValueError(f"unknown optimize.* key(s) {sorted(unknown)}; valid: {', '.join(sorted(known))}, "
                             f"reference_path, invert_chain")
        vals = {k: v for k, v in cfg.items() if k in known}
        missing = sorted(known - set(vals))
        if missing:
            raise ValueError(f"optimize.* lacks {', '.join(missing)} (compose it from conf/optimize/)")
        if "losses" in vals:
            vals["losses"] = {str(k): float(v) for k, v in (vals["losses"] or {}).items()}
        return cls(**vals)


class InitOptimizationModule(RestorationModule):
    """Restore, then optimise each image's x_T against the ``optimize.losses`` objective (docs/gradients.md).

    Extra args: ``optimization`` settings, the ``gradient`` config and an optional ``reference`` image
    (1, C, H, W) on [-1, 1] (the ``reference`` loss, e.g. colours of a reference photo).
    """

    def __init__(self, *args, optimization: OptimizationSettings, gradient: DEQGradientConfig,
                 reference: Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.optimization, self.gradient = optimization, gradient
        self.reference = reference
        self.lpips_loss = None
        self._log_step = 0
        self.progress_labels = ("step", "loss")  # round_hook reports optimisation steps, not solver rounds

    def on_predict_start(self) -> None:
        super().on_predict_start()
        opt = self.optimization
        if opt.losses.get("reference", 0.0) > 0:
            if self.reference is None:
                raise ValueError("the reference loss needs an image: set optimize.reference_path=FILE")
            if opt.reference_kind == "lpips" and self.lpips_loss is None:
                from deqir.metrics import LPIPSLoss

                self.lpips_loss = LPIPSLoss(net=opt.lpips_net, reduction="none").to(self.device)

    def solve_config(self) -> SolveConfig:
        """The forward solve of every optimisation step. ``solver=auto`` resolves to ``quasi_newton`` with the
        schedule the start-up measurement chose (:mod:`deqir.lit.autotune`): these modes need the equilibrium
        itself (the gradient is taken through it), so where restoration would run the sequential sampler they
        run quasi_newton with a frontier window of one slot -- the sequential schedule, solved as a fixed point."""
        ch = self.chain
        if ch.sampler == "deq" and ch.solver == "auto":
            if self.auto_choice is None:  # outside a Lightning run: measure now
                self.prepare_auto()
            c = self.auto_choice
            opts = {k: v for k, v in ch.solver_options.items() if k != "knee_factor"}
            opts["window"] = None if c.schedule == "all_slots" else int(c.window or 1)
            # the sequential schedule solved with autograd: the exact equilibrium and, by backpropagation, the
            # exact back-substitution adjoint in one sweep (T forward + T backward slot evaluations)
            g = self.gradient_config()
            sweep = (opts["window"] == 1 and ch.form == "step" and g.mode == "ift"
                     and g.adjoint_solver == "back_substitution")
            return SolveConfig(solver="quasi_newton", max_iter=ch.max_iter, tol=ch.tol, stop_mode=ch.stop_mode,
                               options=opts, sequential_sweep=sweep)
        return SolveConfig(solver=ch.solver, max_iter=ch.max_iter, tol=ch.tol, stop_mode=ch.stop_mode,
                           options=dict(ch.solver_options))

    def gradient_config(self) -> DEQGradientConfig:
        """``gradient/`` with ``adjoint_solver=auto`` resolved: picard (the parallel schedule of the adjoint) where
        solver=auto chose all slots per round, back_substitution (the sequential schedule, exact) on the step
        form otherwise (docs/gradients.md)."""
        g, ch = self.gradient, self.chain
        if g.adjoint_solver != "auto":
            return g
        all_slots = (ch.sampler == "deq" and ch.solver == "auto" and self.auto_choice is not None
                     and self.auto_choice.schedule == "all_slots")
        return replace(g, adjoint_solver="picard" if all_slots or ch.form != "step" else "back_substitution")

    def max_batch(self) -> int | None:
        """The model's micro-batch: ``sampler.max_batch``, else the knee solver=auto measured (window schedule)."""
        ch = self.chain
        if ch.max_batch is None and ch.solver == "auto" and self.auto_choice is not None:
            return self.auto_choice.max_batch
        return ch.max_batch

    def restore(self, problem: Problem) -> Restored:
        p, opt = problem, self.optimization
        B = p.x_T.shape[0]
        reference = None
        if self.reference is not None:
            reference = self.reference.to(self.device, p.x_T.dtype).expand(B, -1, -1, -1)
        res = optimize_init(
            self.model, self.coeffs, p.x_T, losses=opt.losses, operator=self.operator, y=p.y, z=p.z,
            reference=reference, ground_truth=p.target, reference_kind=opt.reference_kind,
            lpips_net=opt.lpips_net, lpips_loss=self.lpips_loss, steps=opt.steps, lr=opt.lr,
            patience=opt.patience, min_improvement=opt.min_improvement, stop_below=opt.stop_below,
            solve=self.solve_config(), gradient=self.gradient_config(), max_batch=self.max_batch(),
            callback=self._progress(p), map_form=self.chain.form, clip_x0=self.chain.clip_x0,
            chain=self.chain.chain, chain_params=self.chain.chain_params, sigma_y=self.sigma_y,
        )
        return self.to_restored(res)

    # ------------------------------------------------------------------ helpers
    def _progress(self, p: Problem):
        """Per-step loss (and PSNR) curves to the logger; the progress bar shows the step."""

        def on_step(info: dict[str, Any]) -> None:
            if self.stop_check is not None:  # a stop request ends the optimisation at the next step
                self.stop_check()
            if self.round_hook is not None:
                losses = [v for v in info["loss"] if math.isfinite(v)]
                self.round_hook(int(info["step"]), max(losses) if losses else math.nan)
            logger = self.logger
            if logger is None:
                return
            metrics = {}
            for b, name in enumerate(p.names):
                for key in ("loss", "psnr"):
                    if key in info and math.isfinite(info[key][b]):
                        metrics[f"optimize/{name}/{key}"] = float(info[key][b])
            if metrics:
                logger.log_metrics(metrics, step=self._log_step)
            self._log_step += 1

        return on_step

    def to_restored(self, res: InitOptResult) -> Restored:
        B = res.x0_best.shape[0]
        summary = res.summary()
        hist = res.history
        extra = []
        traces: list[list[float]] = []
        for b in range(B):
            row = {"best_step": res.best_step[b], "loss_init": hist[0]["loss"][b], "loss_best": res.best_loss[b],
                   "optimize_status": res.status[b], "uses_oracle": res.uses_oracle}
            if "psnr_init" in summary[b]:
                row["psnr_init"] = summary[b]["psnr_init"]
            extra.append(row)
            traces.append([h["loss"][b] for h in hist if math.isfinite(h["loss"][b])])
        best_hist = [hist[s] for s in res.best_step]
        # the solver's facts at the kept step
        residuals = [float(h["solver_residual"][b]) if isinstance(h["solver_residual"], list)
                     else float(h["solver_residual"]) for b, h in enumerate(best_hist)]
        return Restored(
            x0=res.x0_best,
            rounds=[int(h["solver_rounds"]) for h in best_hist],
            nfe=[int(s["nfe"]) for s in summary],
            residual=residuals,
            residual_trace=traces, trace_key="loss", extra=extra,
            # the solver's own verdict at the kept step (each solver has its own stopping rule)
            status=["nonfinite" if s == "nonfinite" else ("converged" if h["solver_converged"][b] == 1.0 else "max_iter")
                    for b, (s, h) in enumerate(zip(res.status, best_hist))],
        )


class InversionModule(InitOptimizationModule):
    """Find x_T whose DEQ restoration reproduces the (clean) dataset image (docs/gradients.md).

    Unconditional by default (``optimize.invert_with_operator=false``); with the operator, the chain is
    the task's restoration chain and y = A x. The restored image is the reconstruction; its PSNR to the
    ground truth is the reconstruction PSNR, and the per-step PSNR curve goes to the logger.
    """

    def restore(self, problem: Problem) -> Restored:
        p, opt = problem, self.optimization
        if p.target is None:
            raise ValueError("mode=invert needs clean images (it reproduces them); dataset=real has none")
        with_op = opt.invert_with_operator
        res = invert_image(
            self.model, self.coeffs, p.target, operator=self.operator if with_op else None,
            y=p.y if with_op else None, z=p.z, init=opt.invert_init if opt.invert_init != "noise" else p.x_T,
            init_iters=opt.invert_init_iters,
            steps=opt.steps, lr=opt.lr, prior_weight=opt.prior_weight, patience=opt.patience,
            min_improvement=opt.min_improvement, stop_below=opt.stop_below, solve=self.solve_config(),
            gradient=self.gradient_config(), max_batch=self.max_batch(), callback=self._progress(p),
            map_form=self.chain.form, clip_x0=self.chain.clip_x0,
        )
        return self.to_restored(res)

    def evaluate(self, problem: Problem, restored: Restored, seconds: float):
        out = super().evaluate(problem, restored, seconds)
        if not self.optimization.invert_with_operator:  # unconditional: there is no measurement to agree with
            for row in out.rows:
                row.pop("consistency", None)
                row.pop("cons", None)
        return out
