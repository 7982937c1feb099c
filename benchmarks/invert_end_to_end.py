"""End-to-end throughput of ``invert.py``: images per minute for ``task=deblur`` on the sample images.

Runs the real CLI (a fresh process per configuration, like a user) with each sampler, on one process and
with ``trainer.devices=2`` on the CPU (images across ranks, and one image's timesteps across ranks).
Reports wall-clock images/minute (process start to exit, model loading included) and the solve-only
rate from ``metrics.json`` (mean seconds per image inside the sampler).

    python benchmarks/invert_end_to_end.py --json bench_results/invert_end_to_end.json
    python benchmarks/invert_end_to_end.py --size 64 --timesteps 10 --quick     # a smaller, faster variant

Without the packaged default weights (still being trained) the default model runs with random weights
(``model.ckpt_path=random``): same architecture and cost per evaluation, but the number of solver rounds
a trained prior needs may differ.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(overrides: list[str], threads: int, run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "invert.py"), *overrides, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"invert.py failed ({' '.join(overrides)}):\n{proc.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n = metrics["n_images"]
    return {
        "overrides": overrides, "n_images": n, "wall_s": round(wall, 2), "run_dir": str(run_dir),
        "solver_choice": metrics.get("solver_choice"),
        "images_per_min_wall": round(60 * n / wall, 3),
        "solve_s_per_image": round(metrics["seconds"], 3),
        "images_per_min_solve": round(60 / metrics["seconds"], 3) if metrics.get("seconds") else None,
        "rounds": metrics.get("rounds"), "nfe": metrics.get("nfe"), "psnr": metrics.get("psnr"),
        "summary": " | ".join(proc.stdout.strip().splitlines()[-2:]),
    }


def psnr_to(run_dir: Path, reference_dir: Path) -> float | None:
    """Mean PSNR (dB, 8-bit images) of a run's restorations against the same names in another run."""
    import numpy as np
    from PIL import Image

    vals = []
    for ref in sorted((reference_dir / "images").glob("*.png")):
        other = run_dir / "images" / ref.name
        a = np.asarray(Image.open(ref), dtype=np.float64) / 255
        b = np.asarray(Image.open(other), dtype=np.float64) / 255
        mse = float(((a - b) ** 2).mean())
        vals.append(100.0 if mse == 0 else 10 * np.log10(1 / mse))
    return round(float(np.mean(vals)), 2) if vals else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--timesteps", type=int, default=25)
    parser.add_argument("--model-dtype", default="model", help="model_dtype (model | float32 | bfloat16 | auto)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP threads of the single-process runs (the 2-process runs use 1 each)")
    parser.add_argument("--quick", action="store_true", help="skip the 2-process runs")
    parser.add_argument("--ckpt", help="model.ckpt_path (default: the packaged weights, else random init)")
    args = parser.parse_args()

    from deqir.models import packaged_default_path

    base = ["task=deblur", "trainer=cpu", "logger=none", "eval=fast", f"dataset.size={args.size}",
            f"sampler.timesteps={args.timesteps}", f"model_dtype={args.model_dtype}"]
    weights = args.ckpt or ("packaged" if packaged_default_path().is_file() else "random")
    if weights != "packaged":
        base.append(f"model.ckpt_path={weights}")
    cases = {
        "sequential, 1 process": ["sampler=sequential"],
        "deq default (solver=auto), 1 process": ["sampler=deq"],
        "deq solver=quasi_newton (all slots), 1 process": ["sampler=deq", "solver=quasi_newton"],
        "deq solver=anderson (the former default), 1 process": ["sampler=deq", "solver=anderson", "sampler.init=x_T"],
    }
    if not args.quick:
        ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
        cases |= {
            "deq, 2 processes (images)": ["sampler=deq", *ddp],
            "sequential, 2 processes (images)": ["sampler=sequential", *ddp],
            "deq, 2 processes (timesteps)": ["sampler=deq", *ddp, "parallel.timesteps=true"],
        }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, extra) in enumerate(cases.items()):
            threads = 1 if any("devices=2" in e for e in extra) else args.threads
            results[label] = run(base + extra, threads, Path(tmp) / f"run{i}")
        seq = results["sequential, 1 process"]
        for label, r in results.items():
            r["wall_vs_sequential"] = round(r["wall_s"] / seq["wall_s"], 3)
            r["psnr_to_sequential"] = psnr_to(Path(r["run_dir"]), Path(seq["run_dir"]))
            print(f"{label:52s} {r['images_per_min_wall']:7.2f} img/min wall ({r['wall_vs_sequential']:.2f}x seq)  "
                  f"{r['images_per_min_solve'] or 0:7.2f} img/min solve  PSNR to seq {r['psnr_to_sequential']} dB  "
                  f"({r['n_images']} images, {r['wall_s']:.1f} s, {r['rounds']} rounds)", flush=True)
    out = {"size": args.size, "timesteps": args.timesteps, "weights": weights, "model_dtype": args.model_dtype,
           "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
