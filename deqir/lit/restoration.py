"""``RestorationModule``: zero-shot restoration of a batch of images, driven by ``Trainer.predict``.

One ``predict_step`` = (1) build the problem: the measurement y and the chain noise from per-image
generators, (2) :meth:`RestorationModule.restore` it (the one method subclasses override, e.g. for
initialisation optimisation), (3) score it. The step returns a :class:`BatchResult` that the prediction
writer saves; nothing is logged from here (``self.log`` is not allowed in predict hooks).

Per-image randomness (docs/app.md): image ``index`` of the dataset draws from two CPU generators,
``(seed * 1_000_003 + index) mod 2**32`` for the chain (x_T first, then z) and that XOR ``0x9E3779B9`` for
the measurement noise, so results never depend on the batch size, the rank, the GPU count or on which images
a resumed run still has to do.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from deqir.chains import ChainStep, make_step
from deqir.deq.joint_map import evaluate_in_chunks
from deqir.samplers.deq import sample_deq
from deqir.diffusion.chain import ChainCoefficients
from deqir.samplers.sequential import chain_start, draw_chain_noise, sample_sequential
from deqir.lit.distributed import TimestepParallelEvaluator
from deqir.lit.samples import expand, sample_seed, summarize_samples
from deqir.metrics import MetricSuite, colorization_consistency, consistency
from deqir.metrics.consistency import consistency_rms_limit
from deqir.metrics.fidelity import psnr
from deqir.operators import Operator
from deqir.utils.images import quantize, to_unit

SEED_STRIDE = 1_000_003
MEASUREMENT_STREAM = 0x9E3779B9  # XOR-ed into the seed of the measurement-noise stream
PSNR_CAP = 100.0  # dB, for identical images in psnr_to_sequential


class RestorationError(RuntimeError):
    """A restoration cannot produce a valid image (e.g. the ε-model returned NaN)."""


def image_seed(seed: int, index: int, stream: int = 0) -> int:
    """Seed of image ``index``'s stream: ``(seed * 1_000_003 + index) mod 2**32`` for the chain noise (x_T, z),
    XOR ``0x9E3779B9`` for the measurement noise (stream 1). Reduced to 32 bits because the CPU generator
    (mt19937) only uses the low 32 bits of a seed."""
    base = (int(seed) * SEED_STRIDE + int(index)) % 2**32
    return base ^ MEASUREMENT_STREAM if stream == 1 else base


def image_generator(seed: int, index: int, stream: int = 0, sample: int = 0) -> torch.Generator:
    """CPU generator of image ``index``: stream 0 = chain noise (x_T, z), 1 = measurement noise; ``sample`` k
    of a ``num_samples`` run draws its chain noise from its own seed (:func:`deqir.lit.samples.sample_seed`)."""
    seed_ = image_seed(seed, index, stream)
    return torch.Generator().manual_seed(sample_seed(seed_, sample) if sample else seed_)


@dataclass(frozen=True)
class ChainSettings:
    """How the chain is solved (plain values from ``sampler/`` and ``solver/``; the defaults live there only)."""

    sampler: str  # "deq" | "sequential"
    solver: str
    max_iter: int
    tol: float
    stop_mode: str
    solver_options: dict[str, Any]
    init: str
    coarse_steps: int
    max_batch: int | None
    per_step_noise: bool
    form: str  # map form: step | cumsum (the paper's)
    clip_x0: bool
    chain: str = "ddnm"  # the restoration chain (chain/): ddnm | ddrm | pigdm | diffpir | dps
    chain_params: dict[str, Any] = field(default_factory=dict)  # its parameters (chain/<name>.yaml)


@dataclass(frozen=True)
class EvalSettings:
    """What is measured per image (plain values from ``eval/``)."""

    crop_border: int = 0
    channel: str = "rgb"
    lpips_net: str | None = "vgg"
    lpips_weights: str | None = None
    compare_sequential: bool = False
    colorization: bool = False


@dataclass
class Problem:
    """One batch to restore. Tensors on the module's device, images on [-1, 1].

    Attributes:
        index: (B,) dataset indices. names: output names.
        y: (B, *measurement_shape) measurements. x_T: (B, C, H, W). z: (B, T or 1, C, H, W).
        target: (B, C, H, W) ground truth, None for real (already degraded) inputs.
    """

    index: list[int]
    names: list[str]
    y: Tensor
    x_T: Tensor
    z: Tensor
    target: Tensor | None
    num_samples: int = 1  # K > 1: every row above is repeated K times (sample k of image b at b * K + k)
    image_names: list[str] | None = None  # K > 1: the B images' own names (``names`` holds "<name>_<k>")


@dataclass
class Restored:
    """Output of :meth:`RestorationModule.restore`: x0 (B, C, H, W) on [-1, 1] plus per-image solver facts.

    ``round_x0`` (optional) holds one (B, C, H, W) candidate per solver round (the solver callback's
    ``last_slot``), used for the PSNR-to-sequential curve.
    """

    x0: Tensor
    rounds: list[int]
    nfe: list[int]
    residual: list[float]
    status: list[str]
    residual_trace: list[list[float]]
    round_x0: list[Tensor] | None = None
    extra: list[dict[str, Any]] | None = None  # per-image extra CSV columns (e.g. optimisation results)
    trace_key: str = "residual"  # what residual_trace holds: solver residual per round, or "loss" per step


@dataclass
class BatchResult:
    """What the writer saves: CSV rows, [0, 1] CPU images and per-round traces, one entry per image."""

    rows: list[dict[str, Any]]
    restored: Tensor
    inputs: Tensor | None  # None when nothing is measured (task=generate)
    targets: Tensor | None
    traces: list[dict[str, list[float]]]
    samples: Tensor | None = None  # num_samples K > 1: (B, K, C, H, W) on [0, 1]; ``restored`` is their mean
    std: Tensor | None = None  # K > 1: the per-pixel standard deviation map (B, C, H, W), see deqir.lit.samples


class RestorationModule(pl.LightningModule):
    """Restore batches of images with the DEQ (or sequential) DDIM/DDNM chain.

    Args:
        model: ε-model, ``eps = model(x, t)``.
        operator: degradation operator built for the dataset's image shape.
        coeffs: chain coefficients (T steps).
        sigma_y: measurement noise std on the [0, 1] scale.
        seed: base seed of the per-image generators.
        chain: sampler/solver settings. evaluation: metric settings.
        timestep_parallel: split each round's T slots across the ranks (every rank gets the same images).
        num_samples: restorations per image with independent chain noise, solved as one batch (docs/app.md).
    """

    def __init__(self, model: torch.nn.Module, operator: Operator, coeffs: ChainCoefficients, *, sigma_y: float = 0.0,
                 seed: int = 0, chain: ChainSettings, evaluation: EvalSettings = EvalSettings(),
                 timestep_parallel: bool = False, num_samples: int = 1):
        super().__init__()
        self.num_samples = int(num_samples)
        self.model, self.operator, self.coeffs = model, operator, coeffs
        self.sigma_y, self.seed = float(sigma_y), int(seed)
        self.chain, self.evaluation, self.timestep_parallel = chain, evaluation, timestep_parallel
        self.suite: MetricSuite | None = None
        self.round_hook: Callable[[int, float], None] | None = None
        self.progress_labels = ("round", "residual")  # what round_hook reports (the progress bar's words)
        self._evaluator: Callable[[Tensor, Tensor], Tensor] | None = None
        self.auto_choice = None  # solver=auto: deqir.lit.autotune.AutoChoice, set on the first batch
        self.on_auto_choice: Callable | None = None  # called once with it (the app keeps it in the run directory)
        self.auto_batch_images = 1  # images per batch, for solver=auto's slots-per-round (the app sets batch_size)
        self.stop_check: Callable[[], None] | None = None  # raises when the run is asked to stop (deqir.lit.stopping)

    # ------------------------------------------------------------------ Lightning hooks
    def on_predict_start(self) -> None:
        ev = self.evaluation
        if self.timestep_parallel:
            self._evaluator = TimestepParallelEvaluator(self.model, self.chain.max_batch)
        else:
            self._evaluator = lambda x, t: evaluate_in_chunks(self.model, x, t, self.chain.max_batch)
        if self.stop_check is not None:  # checked before every ε-model call: a stop request ends the image
            evaluate, check = self._evaluator, self.stop_check

            def checked(x: Tensor, t: Tensor) -> Tensor:
                check()
                return evaluate(x, t)

            self._evaluator = checked
        self.prepare_auto()
        if self.suite is None:
            self.suite = MetricSuite(crop_border=ev.crop_border, channel=ev.channel, lpips_net=ev.lpips_net,
                                     lpips_weights=ev.lpips_weights, device=self.device)

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> BatchResult:
        problem = self.make_problem(batch)
        start = time.perf_counter()
        restored = self.restore(problem)
        seconds = (time.perf_counter() - start) / len(batch["name"])
        bad = [n for n, s in zip(problem.names, restored.status) if s == "nonfinite"]
        if bad or not bool(torch.isfinite(restored.x0).all()):
            which = ", ".join(bad) or problem.names[0]
            raise RestorationError(f"the ε-model returned NaN/inf while restoring {which}; check the checkpoint "
                                   f"(model.ckpt_path) and model.dtype / model_dtype")
        with torch.no_grad():
            return self.evaluate(problem, restored, seconds)

    # ------------------------------------------------------------------ the three stages
    def make_problem(self, batch: dict) -> Problem:
        """Measurements and chain noise of a batch, from the per-image generators (K > 1 samples: each image's
        rows repeated K times, one measurement per image, noise from each sample's own generator)."""
        index = [int(i) for i in batch["index"].tolist()]
        names, K = list(batch["name"]), self.num_samples
        op = self.operator
        with torch.no_grad():
            if "image" in batch:
                target = batch["image"].to(self.device, torch.float32) * 2 - 1
                op.check_image(target)
                y = torch.cat([op.measure(target[k : k + 1], self.sigma_y, image_generator(self.seed, i, 1))
                               for k, i in enumerate(index)])
                shape = target.shape
            elif "y" not in batch:  # unconditional generation: nothing measured
                target, shape = None, (len(index), *op.image_shape)
                y = op.A(torch.zeros(shape, device=self.device))
            else:  # real inputs: y given on the [0, 1] scale
                target = None
                y = batch["y"].to(self.device, torch.float32) * 2 - 1
                op.check_measurement(y)
                y = op.observed(y)  # inpainting: a hole's contents are not measurements
                shape = (len(index), *op.image_shape)
        gens = [image_generator(self.seed, i, 0, k) for i in index for k in range(K)]
        shape = (len(gens), *shape[1:])
        x_T, z = draw_chain_noise(shape, len(self.coeffs), gens, self.chain.per_step_noise, device=self.device)
        if K > 1:
            names = [f"{n}_{k}" for n in batch["name"] for k in range(K)]
            y = y.repeat_interleave(K, dim=0)
            target = target.repeat_interleave(K, dim=0) if target is not None else None
        x_T = chain_start(self.coeffs, x_T, operator=op, y=y)  # a truncated grid starts from A^+ y
        return Problem(index=expand(index, K), names=names, y=y, x_T=x_T, z=z, target=target, num_samples=K,
                       image_names=list(batch["name"]))

    def restore(self, problem: Problem) -> Restored:
        """Restore one batch (override this in subclasses). Runs the sampler without autograd."""
        p = problem
        ch, T = self.resolve_auto(p), len(self.coeffs)
        B = p.x_T.shape[0]
        evaluator = self._evaluator or (lambda x, t: evaluate_in_chunks(self.model, x, t, ch.max_batch))
        step_fn = self.chain_step(p)
        with torch.no_grad():
            if ch.sampler == "sequential":
                def on_step(info: dict) -> None:  # the progress bar's "step k" (NaN: no residual)
                    if self.round_hook is not None:
                        self.round_hook(int(info["j"]) + 1, math.nan)

                x0, _ = sample_sequential(evaluator, self.coeffs, p.x_T, operator=self.operator, y=p.y, z=p.z,
                                          clip_x0=ch.clip_x0, step_fn=step_fn, callback=on_step)
                ok = bool(torch.isfinite(x0).all())
                return Restored(x0=x0, rounds=[T] * B, nfe=[T] * B, residual=[math.nan] * B,
                                status=["converged" if ok else "nonfinite"] * B, residual_trace=[[] for _ in range(B)])
            record = self.evaluation.compare_sequential
            round_x0: list[Tensor] = []

            def on_round(info: dict) -> None:
                if self.round_hook is not None:
                    res = info["rel_residual"] if ch.stop_mode == "rel" else info["abs_residual"]
                    finite = res[torch.isfinite(res)]
                    self.round_hook(int(info["round"]) + 1, float(finite.max()) if finite.numel() else math.nan)
                if record:  # this round's candidate for x0 (the solver's "last_slot")
                    last = info.get("last_slot")
                    round_x0.append(last.detach().clone() if last is not None else torch.full_like(p.x_T, math.nan))

            result = sample_deq(self.model, self.coeffs, p.x_T, operator=self.operator, y=p.y, z=p.z,
                                solver=ch.solver, max_iter=ch.max_iter, tol=ch.tol, stop_mode=ch.stop_mode,
                                options=ch.solver_options, init=ch.init, coarse_steps=ch.coarse_steps,
                                eps_evaluator=evaluator, callback=on_round, form=ch.form, clip_x0=ch.clip_x0,
                                step_fn=step_fn)
        st = result.stats
        per_round = st.nfe / max(1, B * st.rounds)
        init_nfe = result.init_nfe // B
        trace = st.trace.detach().cpu()
        return Restored(
            x0=result.x0,
            rounds=[int(r) for r in st.image_rounds.tolist()],
            nfe=[init_nfe + round(int(r) * per_round) for r in st.image_rounds.tolist()],
            residual=[float(r) for r in st.best_residual.tolist()],
            status=list(st.image_status),
            residual_trace=[[float(v) for v in trace[:, b] if math.isfinite(float(v))] for b in range(B)],
            round_x0=round_x0 if record else None,
        )

    def prepare_auto(self, batch_images: int | None = None) -> None:
        """``solver=auto``: time batched model calls once (rank 0) and share the choice with every rank, so all
        ranks run the same schedule. Uses the operator's image shape; ``auto_batch_images`` images per batch."""
        ch = self.chain
        if ch.sampler != "deq" or ch.solver != "auto" or self.auto_choice is not None:
            return
        from deqir.lit.autotune import choose_schedule, measure_batch_costs

        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        knee_factor = float(ch.solver_options.get("knee_factor", 1.5))
        T, B = len(self.coeffs), int(batch_images or self.auto_batch_images)
        choice = None
        if not dist or torch.distributed.get_rank() == 0:
            x = torch.randn(1, *self.operator.image_shape, generator=torch.Generator().manual_seed(0)).to(self.device)
            cap = B * T if ch.max_batch is None else min(B * T, int(ch.max_batch))  # never above the memory bound
            costs = measure_batch_costs(lambda x, t: self.model(x, t), x, int(self.coeffs.t[0]), max_size=cap,
                                        knee_factor=knee_factor)
            choice = choose_schedule(costs, T, B, knee_factor)
        if dist:
            box = [choice]
            torch.distributed.broadcast_object_list(box, src=0)
            choice = box[0]
        self.auto_choice = choice
        if self.on_auto_choice is not None:
            self.on_auto_choice(choice)

    def resolve_auto(self, problem: Problem) -> ChainSettings:
        """The settings to run: ``solver=auto`` is resolved once, on the first batch, by measuring the cost of
        batched model calls on this device and image size (:mod:`deqir.lit.autotune`); ``auto_choice`` keeps
        what was chosen and why."""
        ch = self.chain
        if ch.sampler != "deq" or ch.solver != "auto":
            return ch
        if self.auto_choice is None:  # outside a Lightning run (e.g. the Python API): measure now
            self.prepare_auto(problem.x_T.shape[0])
        c = self.auto_choice
        opts = {k: v for k, v in ch.solver_options.items() if k != "knee_factor"}
        if c.schedule == "sequential":
            return replace(ch, sampler="sequential", solver="quasi_newton", solver_options=opts)
        # quasi_newton solves the step form: the same chain and fixed point as the cumsum form
        return replace(ch, solver="quasi_newton", solver_options={**opts, "window": c.window}, form="step",
                       max_batch=ch.max_batch if ch.max_batch is not None else c.max_batch)

    def chain_step(self, problem: Problem) -> ChainStep | None:
        """The chain's step bound to this batch (deqir.chains); None for ``ddnm`` (the built-in DDNM chain)."""
        ch = self.chain
        if ch.chain == "ddnm":
            return None
        step = make_step(ch.chain, self.coeffs, operator=self.operator, y=problem.y, z=problem.z,
                         sigma_y=self.sigma_y, **{"clip_x0": ch.clip_x0, **ch.chain_params})
        if step.needs_vjp and self.timestep_parallel:
            raise ValueError(f"chain={ch.chain} differentiates through the model and cannot split timesteps across "
                             f"ranks: set parallel.timesteps=false (images are still split across ranks)")
        return step

    def evaluate(self, problem: Problem, restored: Restored, seconds: float) -> BatchResult:
        """Per-image metrics and the [0, 1] images to save."""
        p, r, op = problem, restored, self.operator
        full = to_unit(r.x0.float())  # the whole image the chain restored (op.image_shape)
        x0 = op.restored_view(full)  # what is saved: the photo's own grid for the valid-boundary blur
        B = x0.shape[0]
        rows: list[dict[str, Any]] = [{"name": n, "index": i} for n, i in zip(p.names, p.index)]
        cols: dict[str, Tensor] = {}
        target = op.restored_view(to_unit(p.target)) if p.target is not None else None
        if target is not None and self.suite is not None:
            cols.update(self.suite.compute(x0, target))
        measured = math.prod(op.measurement_shape) > 0  # False for unconditional generation
        if measured:  # ||A x0 - y|| on the [0, 1] scale: (A(2q - 1) - y) / 2 for a linear A.
            cols["consistency"] = consistency(lambda x: op.A(2 * x - 1) / 2, quantize(full), p.y / 2)
        if self.evaluation.colorization:
            cols["cons"] = colorization_consistency(quantize(full), (p.y + 1) / 2,
                                                    A=lambda x: (op.A(2 * x - 1) + 1) / 2)
        traces: list[dict[str, list[float]]] = [{r.trace_key: t} for t in r.residual_trace]
        if self.evaluation.compare_sequential and self.chain.sampler != "sequential":
            evaluator = self._evaluator or (lambda x, t: evaluate_in_chunks(self.model, x, t, self.chain.max_batch))
            seq, _ = sample_sequential(evaluator, self.coeffs, p.x_T, operator=op, y=p.y, z=p.z,
                                       clip_x0=self.chain.clip_x0, step_fn=self.chain_step(p))
            seq = op.restored_view(to_unit(seq.float()))
            cols["psnr_to_sequential"] = _psnr(x0, seq)
            if r.round_x0:
                per_round = torch.stack([_psnr(op.restored_view(to_unit(c.float())), seq) for c in r.round_x0],
                                        dim=1)  # (B, rounds)
                for b in range(B):
                    traces[b]["psnr_to_sequential"] = [float(v) for v in per_round[b, : r.rounds[b]]]
        numel = math.prod(op.measurement_shape)
        for b, row in enumerate(rows):
            for k, v in cols.items():
                row[k] = float(v[b])
            row.update(rounds=r.rounds[b], nfe=r.nfe[b], residual=r.residual[b], seconds=seconds, status=r.status[b])
            if r.extra is not None:
                row.update(r.extra[b])
            if target is None and measured:  # real inputs: is the restoration consistent with the photo?
                row["sigma_y"] = self.sigma_y
                warning = inconsistency_warning(row["consistency"], numel, self.sigma_y)
                if warning is not None:
                    row["warning"] = warning
        inputs = op.restored_view(to_unit(op.y_to_image(p.y).float())).cpu() if measured else None
        K = p.num_samples
        if K == 1:
            return BatchResult(rows=rows, restored=x0.cpu(), inputs=inputs,
                               targets=target.cpu() if target is not None else None, traces=traces)
        base = p.image_names or p.names[::K]
        one = slice(None, None, K)  # the first sample's row of every image
        target = target[one] if target is not None else None
        rows, mean, std = summarize_samples(rows, x0, target, K, self.suite, base)
        return BatchResult(rows=rows, restored=mean.cpu(), inputs=inputs[one] if inputs is not None else None,
                           targets=target.cpu() if target is not None else None, traces=traces[one],
                           samples=x0.reshape(len(base), K, *x0.shape[1:]).cpu(), std=std.cpu())


def inconsistency_warning(norm: float, numel: int, sigma_y: float) -> str | None:
    """The warning for a restoration whose ||A x0 - y|| (on [0, 1]) is far above the photo's noise, or None.

    Consistent means RMS(A x0 - y) <= 3 sigma_y + 2/255 (noise plus the saved image's 8-bit rounding through A,
    docs/app.md "Your own photos")."""
    rms = float(norm) / math.sqrt(max(1, numel))
    limit = consistency_rms_limit(sigma_y)
    if not rms > limit:
        return None
    return (f"inconsistent with the input: RMS |Ax - y| {rms:.3g} > {limit:.3g} (3 sigma_y + 2/255); the photo was "
            f"likely degraded by another operator than the task's (kernel, scale or boundary: dataset.boundary) "
            f"or sigma_y is too low (task.sigma_y)")


def _psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR (dB) of [0, 1] images (not quantised), capped at PSNR_CAP; (B,) float64 on the CPU."""
    return torch.clamp(psnr(a, b, quantized=False).cpu(), max=PSNR_CAP)
