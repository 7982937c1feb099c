"""The summary line and metrics.json name the chain that actually ran (solver=auto may pick the sequential one)."""
from __future__ import annotations

import json

import pytest

from app_support import TINY, read_csv, run_inprocess

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

AUTO = [*TINY, "dataset.limit=1", "solver=auto", "solver.max_iter=null"]


def _seed_choice(run, schedule: str, window: int | None) -> None:
    """The choice solver=auto keeps in the run directory (a resumed run reuses it instead of measuring)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "solver_choice.json").write_text(json.dumps({
        "schedule": schedule, "window": window, "max_batch": None, "knee": 1, "batch_cost_s": {"1": 0.01},
        "reason": f"test: {schedule}"}))


def _summary_line(out: str) -> str:
    return next(ln for ln in out.splitlines() if " images |" in ln)


def test_auto_choosing_sequential_says_so(tmp_path, capsys):
    run = tmp_path / "seq"
    _seed_choice(run, "sequential", 1)
    summary = run_inprocess(AUTO, run)
    line = _summary_line(capsys.readouterr().out)
    assert line.startswith("deblur [sequential, chosen by solver=auto] | 1 images")
    assert "rounds" not in line and "[deq]" not in line and "4 NFE" in line
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sampler"] == "sequential" and metrics["run_label"] == "sequential, chosen by solver=auto"
    assert metrics["solver"] == "auto" and metrics["solver_choice"]["schedule"] == "sequential"
    assert metrics["max_iter"] is None and summary["sampler"] == "sequential"
    assert read_csv(run / "per_image.csv")[0]["nfe"] == "4"  # T model calls: the sequential chain
    assert not (run / "convergence.png").exists()  # no solver rounds, no residual curve


def test_auto_choosing_all_slots_stays_deq(tmp_path, capsys):
    run = tmp_path / "all"
    _seed_choice(run, "all_slots", None)
    run_inprocess(AUTO, run)
    line = _summary_line(capsys.readouterr().out)
    assert line.startswith("deblur [deq] | 1 images") and " rounds |" in line
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sampler"] == "deq" and metrics["run_label"] == "deq" and metrics["max_iter"] == 4
    assert (run / "convergence.png").is_file()


def test_explicit_sequential_sampler_shows_no_rounds(tmp_path, capsys):
    run_inprocess([*TINY, "dataset.limit=1", "sampler=sequential"], tmp_path / "s")
    line = _summary_line(capsys.readouterr().out)
    assert line.startswith("deblur [sequential] | 1 images") and "rounds" not in line


def test_optimize_init_with_solver_auto_runs_quasi_newton(tmp_path, capsys):
    """The default solver=auto is quasi_newton when optimising x_T through the equilibrium."""
    run = tmp_path / "oi"
    run_inprocess([*TINY, "dataset.limit=1", "solver=auto", "mode=optimize_init", "optimize.steps=1"], run)
    line = _summary_line(capsys.readouterr().out)
    assert line.startswith("deblur [deq] | 1 images") and "PSNR before optimisation" in line
    assert (run / "solver_choice.json").exists()  # the measured schedule of the fixed-point solve (window or all)
