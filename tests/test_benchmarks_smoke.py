"""The benchmark scripts the README quotes still run (tiny settings) and write sane JSON."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, args: list[str], out: Path) -> dict:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--threads", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quality_benchmark_composes_task_presets(tmp_path):
    data = run_bench("quality.py", ["--tasks", "deblur", "colorize", "--size", "32", "--images", "1", "--T", "4"],
                     tmp_path / "q.json")
    rows = {r["task"]: r for r in data["rows"]}
    assert rows["deblur"]["solver"] == "quasi_newton" and rows["deblur"]["clip_x0"] is False  # solver=auto's
    assert rows["colorize"]["solver"] == "picard" and rows["colorize"]["clip_x0"] is True  # the task's preset
    assert rows["colorize"]["psnr_deq_seq"] > 60  # Picard is exact after T rounds
    for r in rows.values():
        assert all(math.isfinite(r[k]) for k in ("psnr_base", "psnr_seq", "psnr_deq"))


@pytest.mark.slow
def test_deq_vs_sequential_benchmark_windows(tmp_path):
    data = run_bench("deq_vs_sequential.py", ["--T", "4", "--tasks", "deblur", "--solvers", "picard", "sliding_window",
                                              "quasi_newton(w=4)", "--windows", "2", "--images", "1", "--size", "32",
                                              "--chains", "default"],
                     tmp_path / "d.json")
    rows = {r["solver"]: r for r in data["rows"]}
    assert set(rows) == {"picard", "sliding_window(w=2)", "quasi_newton(w=4)"}
    assert rows["picard"]["psnr_seq"] > 60 and rows["picard"]["work"] == pytest.approx(rows["picard"]["rounds"])
    assert rows["sliding_window(w=2)"]["work"] < rows["picard"]["work"]
    qn = rows["quasi_newton(w=4)"]
    assert qn["rounds"] <= 4 and qn["work"] <= qn["rounds"] and "rounds_8bit" in qn and len(qn["curve"]) >= 1
    assert data["pareto"]  # the rounds-vs-work front is written


@pytest.mark.slow
def test_init_opt_demo_keeps_the_measurement(tmp_path):
    data = run_bench("init_opt_demo.py", ["--size", "32", "--images", "1", "--T", "4", "--steps", "2",
                                          "--max-iter", "4", "--demos", "colorize", "--reference-kind", "l2"],
                     tmp_path / "i.json")
    (row,) = data["rows"]
    assert row["loss_after"] <= row["loss_before"]
    assert row["consistency_after"] < 1e-3  # only the null space (colour) moves


@pytest.mark.slow
def test_samples_generate_benchmark(tmp_path):
    data = run_bench("samples_generate.py", ["--tasks", "inpaint_random", "--K", "2", "--images", "1", "--T", "4",
                                             "--num-images", "2", "--size", "32", "--solvers", "sequential", "picard",
                                             "--override", "model=tiny_ddpm", "eval=fast", "model_dtype=model",
                                             "solver.max_iter=4", "solver.tol=0"],
                     tmp_path / "s.json")
    (div,) = data["diversity"]
    assert div["K"] == 2 and div["psnr_of_mean"] is not None and div["sample_std"] > 0 and div["nfe"] == 2 * 4
    gen = {r["sampler"]: r for r in data["generation"]}
    assert gen["sequential"]["psnr_to_seq"] == 100 and gen["picard"]["rounds"] == 4
    assert gen["picard"]["psnr_to_seq"] > 60  # Picard with T rounds is the sequential chain


@pytest.mark.slow
def test_real_degradations_benchmark(tmp_path):
    tiny = ["model=tiny_ddpm", "model_dtype=model", "sampler=sequential", "sampler.timesteps=4", "eval=fast"]
    data = run_bench("real_degradations.py", ["--images", "1", "--size", "16", "--width", "16", "--rows",
                                              "scipy reflect blur", "PIL bicubic x4 down", "deqir sr4 (simulated)",
                                              "--override", *tiny], tmp_path / "r.json")
    rows = {r["degradation"]: r for r in data["rows"]}
    assert set(rows) == {"scipy reflect blur", "PIL bicubic x4 down", "deqir sr4 (simulated)"}
    blur = rows["scipy reflect blur"]
    assert blur["psnr_baseline"] is not None and blur["sigma_y"] > 0 and blur["flagged"].endswith("/1")
    assert all(math.isfinite(r["psnr_restored"]) for r in rows.values())


@pytest.mark.slow
def test_big_photo_benchmark(tmp_path):
    data = run_bench("big_photo.py", ["--width", "40", "--height", "30", "--memory-limit", "0.0001", "null",
                                      "--override", "model=tiny_ddpm", "model_dtype=model", "sampler.timesteps=4",
                                      "solver=anderson", "solver.max_iter=4"], tmp_path / "b.json")
    bounded, free = data["rows"]
    assert bounded["max_batch"] == 1 and free["max_batch"] is None  # the bound binds; no bound, no micro-batch
    assert bounded["psnr_restored"] == pytest.approx(free["psnr_restored"], abs=1e-6)  # results do not depend on it
    assert bounded["peak_mb"] >= 0 and bounded["seconds"] > 0
