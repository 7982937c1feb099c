"""What a researcher reads after a run: invert.log, labelled statuses, the round-cap note, the plots."""
from __future__ import annotations

import csv
import json

import pytest

from app_support import REPO, TINY, run_cli


def test_invert_log_summary_and_live_per_image_logging(tmp_path):
    proc = run_cli([*TINY, "logger=csv", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = [ln for ln in proc.stdout.splitlines() if " | 2 images | " in ln]
    assert len(summary) == 1 and "stopped at the round cap (solver.max_iter=4)" in summary[0]
    assert summary[0] in (tmp_path / "invert.log").read_text()
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "convergence.png").stat().st_size > 0
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    live = [r for r in rows if r.get("image/psnr")]
    assert [int(r["step"]) for r in live] == [0, 1]  # one row per image as it finished (PerImageLogger)
    assert any(r.get("metrics/psnr") for r in rows)  # and the run's means at the end


@pytest.mark.slow
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


def test_folder_dataset_keeps_the_images_own_size(tmp_path, capsys):
    from app_support import pixels, run_inprocess, sample_folder

    folder = sample_folder(tmp_path / "in", n=2, size=43)  # tiny_ddpm downsamples 2x: 43 -> 42 (centre crop)
    run = tmp_path / "run"
    summary = run_inprocess([*TINY, "dataset=folder", f"dataset.path={folder}", "dataset.size=null"], run)
    assert summary["n_images"] == 2
    assert pixels(run / "images" / "img0.png").shape[:2] == (42, 42)
    assert pixels(run / "targets" / "img0.png").shape[:2] == (42, 42)
    assert "note: restoring at 42x42, the images' own size (cropped to a multiple of 2" in capsys.readouterr().out
    import yaml

    assert yaml.safe_load((REPO / "conf" / "dataset" / "folder.yaml").read_text())["size"] is None

