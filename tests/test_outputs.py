"""What a researcher reads after a run: invert.log, labelled statuses, the round-cap note, the plots."""
from __future__ import annotations

import csv
import json

from app_support import TINY, run_cli


def test_invert_log_has_the_summary_line(tmp_path):
    proc = run_cli([*TINY, f"hydra.run.dir={tmp_path}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = [ln for ln in proc.stdout.splitlines() if " | 2 images | " in ln]
    assert len(summary) == 1 and "stopped at the round cap (solver.max_iter=4)" in summary[0]
    assert summary[0] in (tmp_path / "invert.log").read_text()
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "convergence.png").stat().st_size > 0


def test_unconditional_inversion_reports_honestly(tmp_path):
    proc = run_cli([*TINY, "mode=invert", "optimize.steps=1", "dataset.limit=1", f"hydra.run.dir={tmp_path}"],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 1, loss" in proc.stderr  # the bar shows optimisation steps and the loss, not rounds/residuals
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["operator"] == "none (unconditional inversion)" and metrics["task"] == "invert"
    assert "consistency" not in metrics  # no measurement to be consistent with
    with open(tmp_path / "per_image.csv") as fh:
        row = next(csv.DictReader(fh))
    # status is the solver's (residual vs solver.tol), optimize_status the optimiser's
    assert row["status"] == ("converged" if float(row["residual"]) <= 1e-3 else "max_iter")
    assert row["optimize_status"] in ("max_steps", "patience", "stop_below", "converged")
    record = json.loads(next((tmp_path / "records").glob("*.json")).read_text())
    assert "loss" in record["trace"] and "residual" not in record["trace"]
