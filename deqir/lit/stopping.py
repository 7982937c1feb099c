"""Stopping when asked: SIGTERM and SIGINT end a run within seconds; SLURM's pre-emption signal requeues it.

``kill PID``, ``timeout`` and a cluster's time limit send SIGTERM, Ctrl+C sends SIGINT. While images are
restored (``Trainer.predict``) the handlers only set a flag (:class:`StopRequest`); the application checks it at
cheap points it owns (docs/app.md "Stopping and requeueing"):

* before every batch (:class:`StopOnSignal`, a Lightning callback),
* at every ε-model call of a restoration (the module's evaluator: DEQ rounds and sequential steps alike),
* at every optimisation step of ``mode=optimize_init`` / ``invert`` (the step callback).

A set flag raises :class:`RunStopped` there, which unwinds the Trainer. Images finished before it are on disk
(their record is written last), the image in flight is dropped, and a rerun into the same run directory
resumes. ``invert.py`` ends with one ``stopped: ...`` line and exit status 128 + the signal (143 for SIGTERM).

Under SLURM (and not under submitit, which owns that signal: conf/trainer/slurm.yaml) the pre-emption signal
(``sbatch --signal=USR1@90``, Lightning's ``SLURMEnvironment.requeue_signal``) stops the run the same way and
global rank 0 requeues the job (``scontrol requeue <job id>``, as Lightning's SLURM connector does), so the
requeued job picks up where this one stopped. The numerics never see a signal.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl

#: the pre-emption signal SLURM sends before a time limit or pre-emption (Lightning's default requeue signal)
REQUEUE_SIGNAL = signal.SIGUSR1


class RunStopped(Exception):
    """The run was asked to stop (a signal); finished images are kept. ``exit_code`` = 128 + the signal."""

    def __init__(self, signum: int, requeue: bool = False):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.requeue = int(signum), requeue
        self.note = ""  # what the application did about it (e.g. the requeue), for the one-line message
        self.done: int | None = None  # images finished (the application fills these in)
        self.total: int | None = None
        self.run_dir: Any = None
        self.rank = 0  # global rank (only rank 0 prints the line)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        """The one line ``invert.py`` prints."""
        name, run_dir = signal.Signals(self.signum).name, self.run_dir
        text = (f"stopped: {name} received; {self.done} of {self.total} images finished and kept in {run_dir} "
                f"(an image in flight is redone); rerun with hydra.run.dir={run_dir} to resume")
        return text + (f"; {self.note}" if self.note else "")


@dataclass
class StopRequest:
    """The flag the signal handlers set; calling it is the cheap check (raises :class:`RunStopped` once set)."""

    signum: int | None = None
    requeue: bool = False
    forward: list[Callable[[int], None]] = field(default_factory=list)  # e.g. to DDP child processes

    def __call__(self) -> None:
        if self.signum is not None:
            raise RunStopped(self.signum, self.requeue)

    def handle(self, signum: int, frame: Any = None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: do not wait for the next check
        if self.signum is None:
            self.signum = int(signum)
            self.requeue = signum == REQUEUE_SIGNAL
            for fn in self.forward:
                fn(signum)


def owns_requeue_signal(environ: dict[str, str] | None = None) -> bool:
    """Under SLURM without submitit (whose job process owns the pre-emption signal and requeues itself)."""
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    env = os.environ if environ is None else environ
    return SLURMEnvironment.detect() and not env.get("SUBMITIT_EXECUTOR") and not env.get("SUBMITIT_FOLDER")


def slurm_job_id(environ: dict[str, str] | None = None) -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    env = os.environ if environ is None else environ
    array = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{env['SLURM_ARRAY_TASK_ID']}" if array else env.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"cannot requeue: SLURM_JOB_ID {job!r} is not a SLURM job id")
    return job


def requeue_job(environ: dict[str, str] | None = None) -> str:
    """``scontrol requeue <job id>`` (``scontrol`` found on ``PATH``); returns a note for the stop line."""
    cmd = ["scontrol", "requeue", slurm_job_id(environ)]
    try:
        rc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"requeue failed ({' '.join(cmd)}: {err})"
    if rc.returncode != 0:
        return f"requeue failed ({' '.join(cmd)} exited {rc.returncode}: {rc.stderr.strip()[:200]})"
    return f"requeued SLURM job {cmd[-1]} ({' '.join(cmd)}): the requeued job resumes from here"


@contextmanager
def stop_on_signals(stop: StopRequest, requeue: bool) -> Iterator[StopRequest]:
    """Route SIGTERM, SIGINT (and, with ``requeue``, the pre-emption signal) to ``stop`` while the block runs;
    the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield stop
        return
    signums = [signal.SIGTERM, signal.SIGINT] + ([REQUEUE_SIGNAL] if requeue else [])
    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, stop.handle)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class StopOnSignal(pl.Callback):
    """Takes SIGTERM back from Lightning (whose predict loop ignores it) and checks the flag between batches.

    Lightning installs its own SIGTERM handler when ``predict`` starts (and restores ours at teardown); this
    puts :meth:`StopRequest.handle` back and forwards the signal to the ranks Lightning's launcher started.
    """

    def __init__(self, stop: StopRequest, requeue: bool):
        self.stop, self.requeue = stop, requeue

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None and hasattr(launcher, "kill") and not self.stop.forward:
            self.stop.forward.append(launcher.kill)  # the subprocess launcher's children (trainer=ddp locally)
        if threading.current_thread() is threading.main_thread():
            for s in [signal.SIGTERM, signal.SIGINT] + ([REQUEUE_SIGNAL] if self.requeue else []):
                signal.signal(s, self.stop.handle)
        pl_module.stop_check = self.stop

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.stop()
