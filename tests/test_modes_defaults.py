"""mode=optimize_init and mode=invert under the default solver (solver=auto), for every task the docs promise.

These modes differentiate through the equilibrium, so ``solver=auto`` must resolve to a fixed-point solve
(quasi_newton with the measured schedule) instead of the sequential sampler (deqir.lit.optimization).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_support import error_lines, read_csv, run_cli, run_inprocess

REPO = Path(__file__).resolve().parents[1]
#: debug=tiny, but with the default solver (auto) and the modes' own defaults otherwise
TINY_AUTO = ["debug=tiny", "dataset.limit=1", "sampler.timesteps=3", "optimize.steps=1"]
TASKS = sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml") if p.stem != "generate")


def _task_files(task: str, tmp_path: Path) -> list[str]:
    """Tasks that read a user's file get one (a kernel, a mask) at the test size."""
    if task == "deblur_kernel":
        k = np.outer(np.hanning(7), np.hanning(7))
        np.save(tmp_path / "k.npy", k / k.sum())
        return [f"task.params.kernel_path={tmp_path / 'k.npy'}"]
    if task == "inpaint_mask":
        m = np.full((32, 32), 255, np.uint8)
        m[8:20, 10:24] = 0
        Image.fromarray(m).save(tmp_path / "mask.png")
        return [f"task.params.mask_path={tmp_path / 'mask.png'}"]
    return []


@pytest.mark.parametrize("mode", ["optimize_init", "invert"])
def test_default_solver_runs_the_modes(mode, tmp_path, capsys):
    """README's `python invert.py mode=optimize_init task=denoise` / `mode=invert` under the default solver."""
    run = tmp_path / mode
    task = ["task=denoise"] if mode == "optimize_init" else []
    summary = run_inprocess([*TINY_AUTO, f"mode={mode}", *task], run)
    out = capsys.readouterr().out
    assert "solver=auto ->" in out and f"mode={mode} solves the equilibrium every step: quasi_newton" in out
    if summary["solver_choice"]["schedule"] == "sequential":  # a CPU: the sweep with autograd (docs/gradients.md)
        assert "one sweep gives the exact equilibrium" in out
    assert summary["n_images"] == 1 and summary["solver_choice"]["schedule"] in ("all_slots", "window", "sequential")
    row = read_csv(run / "per_image.csv")[0]
    assert int(row["rounds"]) >= 1 and row["status"] in ("converged", "max_iter")
    assert (run / "images").is_dir() and any((run / "images").glob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["optimize_init", "invert"])
@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs_in_both_modes(task, mode, tmp_path):
    """Every task x mode combination composes and runs with the defaults (tiny model, one step)."""
    run = tmp_path / "run"
    summary = run_inprocess([*TINY_AUTO, f"task={task}", f"mode={mode}", *_task_files(task, tmp_path)], run)
    assert summary["n_images"] == 1
    data = json.loads((run / "metrics.json").read_text())
    if data["solver"] == "auto":  # (a task may recommend its own solver)
        assert data["solver_choice"]["reason"]


def test_generate_cannot_be_inverted_or_optimised(tmp_path):
    for mode in ("invert", "optimize_init"):
        res = run_cli(["debug=tiny", "task=generate", f"mode={mode}", f"hydra.run.dir={tmp_path / mode}"])
        assert res.returncode == 2
        (line,) = error_lines(res.stderr)
        assert "task=generate" in line and "mode=restore" in line


def test_inversion_through_a_non_ddnm_chain_is_refused_in_one_line(tmp_path):
    """Unconditional inversion runs for every task (the chain plays no part); through the task's measurement it
    needs the DDNM chain, and says so."""
    res = run_cli(["debug=tiny", "task=cs2", "mode=invert", "optimize.invert_with_operator=true",
                   f"hydra.run.dir={tmp_path / 'r'}"])
    assert res.returncode == 2
    (line,) = error_lines(res.stderr)
    assert "chain=pigdm" in line and "chain=ddnm" in line
