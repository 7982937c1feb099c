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
    assert rows["colorize"]["solver"] == "quasi_newton" and rows["colorize"]["clip_x0"] is True  # the task's preset
    assert rows["colorize"]["psnr_deq_seq"] > 45  # quasi_newton reaches the clipped chain's fixed point
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
    # work: at most one evaluation per slot and round, plus the first round's probe (T // 3 = 1 level at T = 4)
    assert qn["rounds"] <= 4 and qn["work"] <= qn["rounds"] + 1 / 4 and "rounds_8bit" in qn and len(qn["curve"]) >= 1
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


def _photos(folder: Path, n: int = 3, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.uniform(0, 255, (size // 4, size // 4, 3)).astype(np.uint8)
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(folder / f"p{i}.png")
    return folder


@pytest.mark.slow
def test_defaults_benchmark_pairs_rows_and_applies_the_rule(tmp_path):
    """benchmarks/defaults.py: every row runs the app's configuration on the same photos, the paired differences
    are those of the per-image values in the cache, and the rule's decision is reported; resuming runs nothing."""
    photos = _photos(tmp_path / "photos")
    args = ["--tasks", "deblur", "--grid", "--configs", "skip_type=quad", "skip_type=karras,T=4",
            "--images", str(photos), "--limit", "3", "--batch", "2", "--cache", str(tmp_path / "c.jsonl"),
            "--override", "model=tiny_ddpm", "sampler.timesteps=3", "eval.lpips=null"]
    data = run_bench("defaults.py", args, tmp_path / "d.json")
    res = data["tasks"]["deblur"]
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"baseline", "default", "skip_type=quad", "skip_type=karras,T=4"}
    assert rows["default"]["work"] == 3 and rows["skip_type=karras,T=4"]["work"] == 4 and rows["baseline"]["work"] == 0
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    per = {(r["config"], r["image"]): r["psnr"] for r in lines}
    diff = sum(per[("skip_type=quad", f"p{i}")] - per[("default", f"p{i}")] for i in range(3)) / 3
    assert math.isclose(rows["skip_type=quad"]["d_psnr_default"], diff, rel_tol=1e-9, abs_tol=1e-12)
    lo, hi = rows["skip_type=quad"]["ci_psnr_default"]
    assert lo <= diff <= hi
    assert res["decision"]["winner"] in ("default", "skip_type=quad")  # karras,T=4 costs more: never chosen
    again = run_bench("defaults.py", args, tmp_path / "d2.json")
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == len(lines)  # cached: nothing re-ran
    assert again["tasks"]["deblur"]["rows"] == res["rows"]


def test_paired_interval_matches_the_t_distribution():
    sys.path.insert(0, str(ROOT))
    from benchmarks.stats import paired

    r = paired([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert r["mean"] == 2.5 and r["n"] == 4
    half = 3.182446305284263 * (5 / 3) ** 0.5 / 2  # t_{0.975, 3} * sd / sqrt(n)
    assert math.isclose(r["hi"] - r["mean"], half, rel_tol=1e-9)
    with pytest.raises(ValueError, match="equally long"):
        paired([1.0], [1.0, 2.0])


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
    assert [p["name"] for p in blur["per_image"]] == ["astronaut"] and math.isfinite(blur["per_image"][0]["psnr_restored"])
    # a folder of the user's choice (the evaluation set for claims), without the circular baseline
    import numpy as np
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "photos/a.png")
    data = run_bench("real_degradations.py", ["--folder", str(tmp_path / "photos"), "--images", "2", "--size", "16",
                                              "--width", "16", "--no-baseline", "--rows", "scipy reflect blur",
                                              "--override", *tiny], tmp_path / "r2.json")
    row = data["rows"][0]
    assert row["psnr_baseline"] is None and [p["name"] for p in row["per_image"]] == ["a"]


@pytest.mark.slow
def test_big_photo_benchmark(tmp_path):
    data = run_bench("big_photo.py", ["--width", "40", "--height", "30", "--memory-limit", "0.0001", "null",
                                      "--override", "model=tiny_ddpm", "model_dtype=model", "sampler.timesteps=4",
                                      "solver=anderson", "solver.max_iter=4"], tmp_path / "b.json")
    bounded, free = data["rows"]
    assert bounded["max_batch"] == 1 and free["max_batch"] is None  # the bound binds; no bound, no micro-batch
    assert bounded["psnr_restored"] == pytest.approx(free["psnr_restored"], abs=1e-6)  # results do not depend on it
    assert bounded["peak_mb"] >= 0 and bounded["seconds"] > 0


@pytest.mark.slow
def test_parallel_defaults_second_draw_skips_photos_and_keeps_the_seeds(tmp_path):
    """benchmarks/parallel_defaults.py --skip K: photos K+1... on the noise seeds of positions 0, 1, ... (a second
    draw of photo and noise), so photo p1 run with --skip 1 is photo p1 on the noise p0 had without it."""
    photos = _photos(tmp_path / "photos")
    common = ["--tasks", "deblur", "--T", "3", "--images", str(photos), "--batch", "1",
              "--override", "model=tiny_ddpm", "eval.lpips=null"]
    first = run_bench("parallel_defaults.py", [*common, "--limit", "2"], tmp_path / "a.json")
    second = run_bench("parallel_defaults.py", [*common, "--skip", "1", "--limit", "2"], tmp_path / "b.json")
    assert [p["name"] for p in first["rows"][0]["per_image"]] == ["p0", "p1"]
    per = second["rows"][0]["per_image"]
    assert [p["name"] for p in per] == ["p1", "p2"] and second["args"]["skip"] == 1
    assert all(p["rounds"] >= 1 and p["psnr_seq"] > 0 for p in per)
    assert per[0]["trace"] != first["rows"][0]["per_image"][1]["trace"]  # p1 on other noise: another solve
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parallel_defaults.py"), *common, "--skip", "5"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode != 0 and "--skip 5 leaves no photos" in res.stderr
