"""The work behind ``invert.py``: build, predict, gather, report (docs/app.md).

``run_invert(cfg)`` is the only function that sees the Hydra config; it converts it to plain values once
and hands those to :mod:`deqir.lit.builders`. Restored images are written by the prediction writer as soon
as each batch is done; rank 0 writes the tables, plots and the summary line at the end.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from deqir.lit import builders, report, sizing
from deqir.datasets.generation import GeneratedIndices
from deqir.lit.autotune import AutoChoice
from deqir.lit.datamodule import RestorationDataModule
from deqir.lit.instantiate import build_callbacks, instantiate_strict
from deqir.lit.live_log import PerImageLogger
from deqir.lit.optimization import InitOptimizationModule, InversionModule
from deqir.lit.progress import ImageProgressBar
from deqir.lit.restoration import RestorationError, RestorationModule
from deqir.lit.samples import check_num_samples
from deqir.lit.search import Objective
from deqir.lit.stopping import RunStopped, StopOnSignal, StopRequest, owns_requeue_signal, requeue_job, stop_on_signals
from deqir.lit.writer import RestorationWriter, RunStore
from deqir.metrics import MetricUnavailableWarning
from deqir.utils.runtime import tune_allocator

#: ``mode`` -> LightningModule class; every class takes RestorationModule's constructor arguments.
MODES: dict[str, type[RestorationModule]] = {
    "restore": RestorationModule, "optimize_init": InitOptimizationModule, "invert": InversionModule,
}
#: Hydra's run log (``<run dir>/invert.log``, file only: conf/invert.yaml): the summary line and the warnings.
RUN_LOG = logging.getLogger("deqir.runlog")
#: Errors the CLI reports as one line (``error: ...``, exit status 2) instead of a traceback.
USER_ERRORS = (ValueError, OSError, RestorationError, ImportError)


def run_invert(cfg: DictConfig) -> dict[str, Any] | None:
    """Restore every image of ``cfg.dataset``; returns the summary on rank 0 (None on other ranks)."""
    tune_allocator()
    _quiet(bool(cfg.get("verbose", False)))
    plain = plain_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    store = RunStore(run_dir)
    pl.seed_everything(int(plain["seed"]), workers=True, verbose=False)

    task = plain["task"]
    model = builders.build_model(plain["model"])
    if _real(plain):  # the user's own photos: each restored at its own size, grouped by shape and sigma_y
        from deqir.lit.real import real_jobs

        dataset, jobs = real_jobs(plain, store, RUN_LOG)
        task = plain["task"]
    else:
        dataset, op, shape = _data_and_shape(plain, model)
        jobs = [(plain, op, shape, None)]
    reference = None
    if _generating(plain):  # the dataset's images are only FID's reference set (and dataset.size=null's size)
        reference, dataset = dataset, GeneratedIndices(task.get("num_images"))
    store.num_samples = int(plain.get("num_samples", 1))
    timestep_parallel = bool((plain.get("parallel") or {}).get("timesteps", False))
    store.prepare(dataset.paths, batch_size=int(plain.get("batch_size", 1)))  # inputs outside the run dir, hashes
    if rank_zero_only.rank == 0:
        store.check_signature(builders.signature(plain), resume=bool(plain.get("resume", True)))
    writer = RestorationWriter(store, rank_zero_only=timestep_parallel)
    task_label = "invert" if _unconditional(plain) else _choice("task", str(task["name"]))

    done = store.done_indices(dataset.names)  # once: each group's images are written by that group only

    def datamodule(indices):
        return RestorationDataModule(dataset, batch_size=int(plain.get("batch_size", 1)),
                                     num_workers=int(plain.get("num_workers", 0)),
                                     done=lambda: done, sharded=not timestep_parallel, indices=indices)

    todo = [i for *_, indices in jobs for i in datamodule(indices).compute_todo()]
    trainer, logger = None, None
    if todo:
        logger = build_logger(plain.get("logger"), run_dir)
        if logger:
            rank_zero_only(logger.log_hyperparams)(plain)
        bar = _progress_bar(store, todo, task_label)
    stop, requeue = StopRequest(), bool(plain.get("slurm_requeue", True)) and owns_requeue_signal()
    with stop_on_signals(stop, requeue):
        try:
            for job_plain, op, shape, indices in jobs:
                dm = datamodule(indices)
                if not dm.compute_todo():
                    continue
                op = op if op is not None else builders.build_operator(job_plain["task"], shape)  # one group's
                module = build_module(job_plain, op, model, shape, timestep_parallel=timestep_parallel,
                                      any_size=indices is not None)
                _share_auto_choice(module, run_dir / "solver_choice.json")
                if hasattr(module, "auto_batch_images"):
                    module.auto_batch_images = int(plain.get("batch_size", 1)) * int(plain.get("num_samples", 1))
                trainer = build_trainer(plain["trainer"], run_dir, logger, timestep_parallel,
                                        callbacks=[StopOnSignal(stop, requeue), writer, bar, PerImageLogger(),
                                                   *build_callbacks(plain.get("callbacks"))])
                trainer.predict(module, datamodule=dm, return_predictions=False)
                del module, op
        except Exception as err:  # finished images are on disk; say so, requeue on SLURM's signal
            if stop.signum is None:
                raise
            # RunStopped, or a collective that failed because another rank stopped first
            stopped = err if isinstance(err, RunStopped) else RunStopped(stop.signum, stop.requeue)
            stopped.rank = rank_zero_only.rank
            if stopped.requeue and stopped.rank == 0:
                stopped.note = requeue_job()
            stopped.done, stopped.total = len(store.done_indices(dataset.names)), len(dataset.names)
            stopped.run_dir = run_dir
            if stopped is err:
                raise
            raise stopped from err
    if rank_zero_only.rank != 0 or (trainer is not None and not trainer.is_global_zero):
        return None
    return finalize(plain, store, writer, trainer, task_label, dataset.names, reference=reference)


def _share_auto_choice(module, choice_file: Path) -> None:
    """solver=auto: a resumed run (and every later group of photos) reuses the run's first measurement, kept in
    ``solver_choice.json`` as soon as it is made (kill -9 safe)."""
    if not hasattr(module, "auto_choice"):
        return
    if choice_file.is_file():
        module.auto_choice = load_auto_choice(choice_file)
    elif rank_zero_only.rank == 0:
        module.on_auto_choice = lambda c: choice_file.write_text(json.dumps(c.as_dict(), indent=2))


def load_auto_choice(choice_file: Path) -> AutoChoice:
    """The solver=auto choice kept in a run directory; a corrupt file is a one-line error naming it."""
    try:
        return AutoChoice.from_dict(json.loads(choice_file.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{choice_file} is corrupt ({reason}); delete it to measure the solver choice again "
                         f"(the restored images are kept)") from None


def _data_and_shape(plain: dict[str, Any], model: torch.nn.Module):
    """Dataset, operator and image shape of clean images; ``dataset.size=null`` = the images' own size (cut to
    the model's stride). Says (one ``note:`` line) when images are resized."""
    task, data = plain["task"], plain["dataset"]
    native = data.get("size") is None
    shape = (3, 1, 1) if native else builders.image_shape(data)
    op = None if native else builders.build_operator(task, shape)
    dataset = builders.build_dataset(data, shape, op)
    if native:
        dataset, size, note = sizing.native(dataset, dataset.paths, bool(data.get("crop", True)),
                                            builders.model_stride(model))
        data["size"] = list(size)  # the resume signature records the size used
        shape = (3, *size)
        op = builders.build_operator(task, shape)
    else:
        note = sizing.resize_note(dataset.paths, shape, bool(data.get("crop", True)))
    if _generating(plain):
        note = f"note: generating {task.get('num_images')} images at {shape[1]}x{shape[2]} (dataset.size)"
    if note and rank_zero_only.rank == 0:
        print(note, flush=True)
        RUN_LOG.info(note)
    return dataset, op, shape


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain values, with ``model.dtype`` resolved and ``mode`` checked."""
    plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    plain["model"]["dtype"] = builders.resolve_model_dtype(str(plain["model_dtype"]), plain["model"],
                                                           str(plain["trainer"].get("accelerator", "auto")))
    mode = str(plain["mode"])
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    check_num_samples(plain.get("num_samples", 1), mode, str(plain["task"]["name"]))
    if _generating(plain) and plain["sampler"].get("t_start") is not None:
        raise ValueError("task=generate has no measurement to start from: sampler.t_start must be null (pure noise)")
    if plain.get("objective"):
        Objective.from_config(plain["objective"])  # a bad objective fails before the first image
    if _generating(plain) and mode != "restore":
        raise ValueError(f"task=generate has no measurement to optimise x_T against: use mode=restore "
                         f"(got mode={mode})")
    if mode != "restore" and bool(plain["trainer"].get("inference_mode", False)):
        raise ValueError(f"mode={mode} optimises through the sampler and needs gradients: set "
                         f"trainer.inference_mode=false (Lightning's inference mode disables autograd)")
    return plain


def build_module(plain: dict[str, Any], op, model: torch.nn.Module, shape: tuple[int, int, int], *,
                 timestep_parallel: bool = False, any_size: bool = False) -> RestorationModule:
    """The LightningModule of ``plain["mode"]`` for images of ``shape`` (shared by invert.py and deqir.api).

    ``any_size``: sides the UNet's downsampling does not divide are padded for the network only
    (:class:`~deqir.models.adapters.StridePadded`); else they are an error."""
    task, sampler = plain["task"], plain["sampler"]
    mode = str(plain["mode"])
    if mode == "invert":
        sampler = invert_sampler(sampler, plain["optimize"])
    stride = builders.model_stride(model)
    if any_size and (shape[1] % stride or shape[2] % stride):
        from deqir.models.adapters import StridePadded

        model = StridePadded(model, stride)
    else:
        builders.check_size(shape, model)
    from deqir.lit.memory import bounded_sampler

    sampler = bounded_sampler(plain, sampler, shape, stride)
    sigma_y = float(task["sigma_y"])
    coeffs = builders.build_chain(sampler, model.schedule, op, sigma_y)
    has_target = plain["dataset"].get("name") != "real" and not _generating(plain)
    return MODES[mode](
        model, op, coeffs, sigma_y=sigma_y, seed=int(plain["seed"]),
        chain=builders.chain_settings(sampler, plain["solver"], plain.get("chain")),
        evaluation=builders.eval_settings(plain["eval"], task, has_target=has_target),
        timestep_parallel=timestep_parallel, num_samples=int(plain.get("num_samples", 1)),
        **builders.optimization_kwargs(mode, plain, shape),
    )


def invert_sampler(sampler: dict[str, Any], optimize: dict[str, Any]) -> dict[str, Any]:
    """mode=invert's chain: ``optimize.invert_chain`` = deterministic (etw = nw = 0, one shared z; the default,
    it reproduces images far better than the stochastic restoration chain) or ``sampler`` (as configured).
    Unconditional inversion (no operator) inverts the whole chain to pure noise: a task's measurement start
    (``sampler.t_start``) does not apply."""
    kind = str(optimize.get("invert_chain", "sampler"))
    if kind not in ("deterministic", "sampler"):
        raise ValueError(f"optimize.invert_chain must be deterministic or sampler, got {kind!r}")
    if not optimize.get("invert_with_operator"):  # unconditional: the whole generative chain, from pure noise
        sampler = {**sampler, "t_start": None}
    if kind == "sampler":
        return sampler
    return {**sampler, "etw": 0.0, "nw": 0.0, "per_step_noise": False}


def finalize(plain: dict[str, Any], store: RunStore, writer: RestorationWriter, trainer: pl.Trainer | None,
             task_label: str, names: list[str], reference=None) -> dict[str, Any]:
    """Rank 0: merge rows (this run's, gathered across ranks, and earlier runs' from disk), write the reports.
    ``reference``: task=generate's reference images (the dataset), FID's real side."""
    merged = {int(r["index"]): r for r in store.load_records()}
    merged.update({int(r["index"]): r for r in writer.gathered})
    records = [merged[k] for k in sorted(merged) if k < len(names) and merged[k]["name"] == names[k]]
    store.write_table(records)
    summary = report.summarize(records)
    ev = plain["eval"]
    fid = None
    if ev.get("fid") and reference is not None:
        fid = report.fid_generated(store, records, reference, ev.get("fid_weights"), device=_device(trainer))
        if fid is not None:
            summary["fid"] = fid
    elif ev.get("fid") and plain["dataset"].get("name") != "real":
        fid = report.fid_from_files(store, records, ev.get("fid_weights"), device=_device(trainer))
        if fid is not None:
            summary["fid"] = fid
    sampler = str(plain["sampler"].get("name", "deq"))
    operator = str(plain["task"]["name"])
    if _unconditional(plain):
        operator = "none (unconditional inversion)"
    elif _generating(plain):
        operator = "none (unconditional generation)"
    deq = sampler != "sequential"
    summary.update(task=task_label, operator=operator, sampler=sampler,
                   solver=str(plain["solver"]["name"]) if deq else None,
                   max_iter=builders.chain_settings(plain["sampler"], plain["solver"]).max_iter if deq else None,
                   timesteps=int(plain["sampler"]["timesteps"]), model=str(plain["model"].get("name")),
                   lpips_net=ev.get("lpips") if "lpips" in summary else None)
    choice = getattr(getattr(trainer, "lightning_module", None), "auto_choice", None) if deq else None
    if choice is None and deq and (store.root / "solver_choice.json").is_file():
        choice = load_auto_choice(store.root / "solver_choice.json")
    if choice is not None:  # solver=auto: what the start-up measurement chose, and why (deqir.lit.autotune)
        summary["solver_choice"] = choice.as_dict()
    label = sampler
    if choice is not None and choice.schedule == "sequential" and plain["mode"] == "restore":
        # the images came from the sequential chain (RestorationModule.resolve_auto): say so, not "[deq]"
        label = "sequential, chosen by solver=auto"
        summary.update(sampler="sequential", max_iter=None)
    summary["run_label"] = label
    if plain.get("objective"):  # what invert.py returns to a sweeper (deqir.lit.search)
        summary["objective"] = Objective.from_config(plain["objective"]).value(summary)
    report.write_metrics(store, summary)
    report.write_grid(store, records)
    conv = report.write_convergence(store, records, stop_mode=str(plain["solver"]["stop_mode"]),
                                   tol=float(plain["solver"]["tol"]) if plain["mode"] == "restore" else None)
    if trainer is not None and trainer.logger:
        log_results(trainer.logger, store, records, summary, conv)
    line = report.summary_line(task_label, label, summary, store.root, fid)
    if choice is not None:
        line += f"\nsolver=auto -> {choice.schedule} (window {choice.window}, max_batch {choice.max_batch}): {choice.reason}"
        if plain["mode"] != "restore":  # these modes differentiate through the equilibrium: always a fixed-point solve
            window = "all slots" if choice.schedule == "all_slots" else f"a frontier window of {choice.window or 1}"
            line += (f"\nmode={plain['mode']} solves the equilibrium every step: quasi_newton with {window} "
                     f"per round (deqir.lit.optimization)")
            module = getattr(trainer, "lightning_module", None)
            if hasattr(module, "solve_config"):
                g = module.gradient_config()
                if module.solve_config().sequential_sweep:
                    line += ("; that is the sequential schedule, run with autograd: one sweep gives the exact "
                             "equilibrium and backprop the exact back-substitution adjoint")
                elif g.mode == "ift":
                    line += f"; IFT adjoint: {g.adjoint_solver}"
    print(line, flush=True)
    RUN_LOG.info(line)
    return summary


# ------------------------------------------------------------------------------------------------ pieces
def build_trainer(tr: dict[str, Any], run_dir: Path, logger, timestep_parallel: bool, callbacks: list) -> pl.Trainer:
    """A predict-only Trainer instantiated from ``trainer/`` (``_target_``); unknown keys are an error.

    The app owns the logger, callbacks, progress bar, checkpointing (off) and the distributed sampler; under
    SLURM it adds Lightning's SLURMEnvironment with requeueing off (submitit owns the signal).
    """
    cfg = dict(tr)
    plugins = [instantiate_strict("trainer.plugins", p) for p in (cfg.pop("plugins", None) or [])]
    if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate_strict(
        "trainer", cfg, logger=logger or False, callbacks=callbacks, enable_progress_bar=True,
        enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=not timestep_parallel,
        default_root_dir=str(run_dir), plugins=plugins or None,
    )


def build_logger(logger_cfg: dict[str, Any] | None, run_dir: Path):
    """Instantiate ``logger/`` (None/empty = no logger). W&B runs keep their id in the run directory."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return None
    cfg = dict(logger_cfg)
    is_wandb = cfg["_target_"].endswith("WandbLogger")
    if is_wandb and os.environ.get("WANDB_MODE", "").lower() in ("online", "run"):
        cfg["offline"] = False  # the logger would otherwise force WANDB_MODE=dryrun
    if is_wandb and cfg.get("group") is None and (search := _multirun()) is not None:
        cfg["group"], job = search  # a sweep's trials are one W&B group: the sweep directory's name
        cfg["name"] = cfg.get("name") or f"{cfg['group']}/{job}"
    if is_wandb and not os.environ.get("WANDB_RUN_ID") and cfg.get("id") is None:
        id_file = run_dir / "wandb_id.txt"
        if id_file.is_file():
            cfg["id"] = id_file.read_text().strip()
        elif rank_zero_only.rank == 0:
            cfg["id"] = secrets.token_hex(4)
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(cfg["id"])
        cfg.setdefault("resume", "allow")
    return instantiate_strict("logger", cfg)


def log_results(logger, store: RunStore, records: list[dict[str, Any]], summary: dict[str, Any],
                convergence: Path | None) -> None:
    """Aggregate metrics to any logger; for W&B also the per-image table with images and the plot."""
    keys = (*report.MEAN_COLUMNS, "n_images", "converged_fraction", "fid", "objective")
    numbers = {f"metrics/{k}": float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}
    logger.log_metrics(numbers)
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        cols = [c for c in ("name", "index", "psnr", "ssim", "lpips", "cons", "consistency", "rounds", "nfe",
                            "residual", "seconds", "psnr_to_sequential") if any(c in r for r in records)]

        def image(folder: Path, name: str):
            path = folder / f"{name}.png"
            return wandb.Image(str(path)) if path.is_file() else None

        restored = store.images if store.num_samples == 1 else store.mean  # K > 1: the samples' mean
        data = [[r.get(c) for c in cols] + [image(store.inputs, r["name"]), image(restored, r["name"]),
                                            image(store.targets, r["name"])] for r in records]
        logger.log_table(key="per_image", columns=[*cols, "input", "restored", "target"], data=data)
        if convergence is not None:
            logger.log_image(key="convergence", images=[str(convergence)])
        wandb.finish()
    else:
        logger.save()


def _progress_bar(store: RunStore, todo: list[int], desc: str) -> ImageProgressBar:
    """Rank 0's bar counts every rank's finished images (records written, the last file of an image) against
    the global total, so a 2-process run shows 2/2, not 1/1."""
    def records() -> int:
        return sum(1 for _ in store.records_dir.glob("*.json")) if store.records_dir.is_dir() else 0

    before = records()
    return ImageProgressBar(lambda rank, world: len(todo), desc=desc, done=lambda: records() - before)


def _real(plain: dict[str, Any]) -> bool:
    """dataset=real: the user's own degraded photos (no ground truth)."""
    return plain["dataset"].get("name") == "real"


def _generating(plain: dict[str, Any]) -> bool:
    """task=generate: unconditional generation (nothing measured, no ground truth)."""
    return str(plain["task"]["name"]) == "generate"


def _unconditional(plain: dict[str, Any]) -> bool:
    """mode=invert without the operator: the task's operator and measurement play no part."""
    return plain["mode"] == "invert" and not (plain.get("optimize") or {}).get("invert_with_operator")


def _multirun() -> tuple[str, str] | None:
    """(sweep directory name, job number) inside a ``-m`` job; None otherwise."""
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hc.sweep.dir)).name, str(hc.job.get("num", ""))


def _choice(group: str, default: str) -> str:
    try:
        return str(HydraConfig.get().runtime.choices.get(group) or default)
    except ValueError:
        return default


def _device(trainer: pl.Trainer | None) -> torch.device:
    return trainer.strategy.root_device if trainer is not None else torch.device("cpu")


def _quiet(verbose: bool) -> None:
    """Lightning's info lines off (unless verbose); one-line metric-availability warnings."""
    if not verbose:
        for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*`srun` command is available.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pytorch_lightning\.trainer\.connectors.*")
    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if issubclass(category, MetricUnavailableWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    if not getattr(warnings.showwarning, "_deqir_logs", False):
        show = warnings.showwarning

        def show_and_log(message, category, filename, lineno, file=None, line=None):
            show(message, category, filename, lineno, file, line)
            RUN_LOG.warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

        show_and_log._deqir_logs = True  # type: ignore[attr-defined]
        warnings.showwarning = show_and_log
