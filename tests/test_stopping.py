"""Stopping when asked (docs/app.md "Stopping and requeueing"): SIGTERM / SIGINT end a run within seconds with
its finished images kept; under SLURM the pre-emption signal requeues the job; a rerun resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl

from app_support import REPO, read_csv

# seconds per image on a CPU: long enough to signal between the first and the second image
SLOW_IMAGES = ["debug=tiny", "sampler=sequential", "sampler.timesteps=300", "dataset.limit=3"]


def _start(args: list[str], tmp_path: Path, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "stderr.txt"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    full_env.pop("DEQIR_TRACEBACK", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "invert.py"), *args], stdout=subprocess.PIPE,
                            stderr=open(log, "w"), text=True, env=full_env, cwd=str(REPO))
    return proc, log


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early: {log.read_text()[-2000:]}"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.05)


def _records(run: Path) -> list[Path]:
    return sorted((run / "records").glob("*.json")) if (run / "records").is_dir() else []


def _stop(proc: subprocess.Popen, signum: int) -> tuple[int, float]:
    sent = time.monotonic()
    proc.send_signal(signum)
    rc = proc.wait(timeout=60)
    return rc, time.monotonic() - sent


def _stop_line(log: Path) -> str:
    lines = [ln for ln in log.read_text().replace("\r", "\n").splitlines() if ln.startswith("stopped:")]
    assert len(lines) == 1, log.read_text()[-2000:]
    return lines[0]


@pytest.mark.slow
def test_sigterm_stops_between_images_keeps_them_and_a_rerun_completes(tmp_path):
    run = tmp_path / "run"
    proc, log = _start([*SLOW_IMAGES, f"hydra.run.dir={run}"], tmp_path)
    _wait_for(lambda: len(_records(run)) >= 1, proc, log)
    first = _records(run)[0].read_text()
    rc, seconds = _stop(proc, signal.SIGTERM)
    assert rc == 143 and seconds < 5, (rc, seconds, log.read_text()[-2000:])
    line = _stop_line(log)
    assert "SIGTERM" in line and "1 of 3 images finished" in line and f"hydra.run.dir={run}" in line
    assert len(_records(run)) == 1 and _records(run)[0].read_text() == first  # the finished record is intact
    name = json.loads(first)["name"]
    assert (run / "images" / f"{name}.png").is_file()
    assert [r["name"] for r in read_csv(run / "per_image.csv")] == [name]
    assert not (run / "metrics.json").exists()

    rerun = subprocess.run([sys.executable, str(REPO / "invert.py"), *SLOW_IMAGES, f"hydra.run.dir={run}"],
                           capture_output=True, text=True, timeout=600, cwd=str(REPO),
                           env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "3 images" in rerun.stdout and "2/2" in rerun.stderr  # only the two unfinished images ran
    assert len(_records(run)) == 3 and (run / "records" / _records(run)[0].name).read_text() == first


@pytest.mark.slow
def test_sigterm_stops_every_rank_of_a_local_ddp_run(tmp_path):
    """trainer=ddp: the signal reaches the rank Lightning started, every process ends, one stop line."""
    run = tmp_path / "run"
    proc, log = _start([*SLOW_IMAGES, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                        f"hydra.run.dir={run}"], tmp_path)
    _wait_for(lambda: len(_records(run)) >= 1, proc, log)
    time.sleep(0.5)  # both ranks' first images are done by now (they run side by side)
    done = len(_records(run))
    rc, seconds = _stop(proc, signal.SIGTERM)
    assert rc == 143 and seconds < 10, (rc, seconds, log.read_text()[-2000:])
    assert f"{done} of 3 images finished" in _stop_line(log)  # printed once, by rank 0
    assert "Traceback" not in log.read_text()
    assert len(_records(run)) == done


@pytest.mark.slow
def test_sigint_stops_inside_the_optimisation_loop(tmp_path):
    run = tmp_path / "run"
    proc, log = _start(["debug=tiny", "mode=optimize_init", "optimize.steps=100000", "solver=anderson",
                        f"hydra.run.dir={run}"], tmp_path)
    _wait_for(lambda: "step 3," in log.read_text(), proc, log)  # the progress bar: the first image's steps
    rc, seconds = _stop(proc, signal.SIGINT)
    assert rc == 130 and seconds < 5, (rc, seconds, log.read_text()[-2000:])
    assert "SIGINT received; 0 of 2 images finished" in _stop_line(log)
    assert _records(run) == []


@pytest.mark.slow
def test_slurm_preemption_signal_requeues_the_job(tmp_path):
    """SLURM's environment faked for one task; ``scontrol`` is a script on PATH that records its arguments,
    so the command the run issues is checked without a cluster."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "invert",
             "SLURM_NODELIST": "localhost", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "run"
    proc, log = _start([*SLOW_IMAGES, f"hydra.run.dir={run}"], tmp_path, env=slurm)
    _wait_for(lambda: len(_records(run)) >= 1, proc, log)
    rc, seconds = _stop(proc, signal.SIGUSR1)
    assert rc == 128 + signal.SIGUSR1 and seconds < 10, (rc, seconds, log.read_text()[-2000:])
    assert calls.read_text().split() == ["requeue", "4242"]
    line = _stop_line(log)
    assert "SIGUSR1" in line and "requeued SLURM job 4242 (scontrol requeue 4242)" in line
    assert len(_records(run)) == 1


class SignalAfterFirstImage(pl.Callback):
    """Sends this process a real signal once the first image is written (``+callbacks.sig._target_=...``)."""

    def __init__(self, signum: int = int(signal.SIGTERM)):
        self.signum, self.sent = signum, False

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def test_signal_inside_a_run_stops_it_in_process(tmp_path):
    """The same path in this process: the handler only sets the flag, the next check raises RunStopped."""
    from app_support import TINY, run_inprocess
    from deqir.lit.stopping import RunStopped

    run = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunStopped) as stop:
        run_inprocess([*TINY, "+callbacks.sig._target_=test_stopping.SignalAfterFirstImage"], run)
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143
    assert (stop.value.done, stop.value.total) == (1, 2) and len(_records(run)) == 1
    assert "SIGTERM received; 1 of 2 images finished" in stop.value.message()
    assert signal.getsignal(signal.SIGTERM) == previous  # the handlers are given back


def test_job_id_of_an_array_task_and_bad_ids():
    from deqir.lit.stopping import slurm_job_id

    assert slurm_job_id({"SLURM_JOB_ID": "17"}) == "17"
    assert slurm_job_id({"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "17", "SLURM_ARRAY_TASK_ID": "3"}) == "17_3"
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        slurm_job_id({"SLURM_JOB_ID": "17; rm -rf /"})


def test_submitit_keeps_the_preemption_signal(monkeypatch):
    from deqir.lit.stopping import owns_requeue_signal

    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "invert")
    assert owns_requeue_signal({}) and not owns_requeue_signal({"SUBMITIT_EXECUTOR": "slurm"})
    monkeypatch.delenv("SLURM_NTASKS")
    assert not owns_requeue_signal({})  # not under SLURM
