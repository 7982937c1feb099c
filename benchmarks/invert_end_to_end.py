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


def run(overrides: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "invert.py"), *overrides, f"hydra.run.dir={tmp}/run"],
                              capture_output=True, text=True, env=env, cwd=str(REPO))
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"invert.py failed ({' '.join(overrides)}):\n{proc.stderr[-2000:]}")
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    n = metrics["n_images"]
    return {
        "overrides": overrides, "n_images": n, "wall_s": round(wall, 2),
        "images_per_min_wall": round(60 * n / wall, 3),
        "solve_s_per_image": round(metrics["seconds"], 3),
        "images_per_min_solve": round(60 / metrics["seconds"], 3) if metrics.get("seconds") else None,
        "rounds": metrics.get("rounds"), "nfe": metrics.get("nfe"), "psnr": metrics.get("psnr"),
        "summary": proc.stdout.strip().splitlines()[-1],
    }


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
        "deq, 1 process": ["sampler=deq"],
        "sequential, 1 process": ["sampler=sequential"],
    }
    if not args.quick:
        ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
        cases |= {
            "deq, 2 processes (images)": ["sampler=deq", *ddp],
            "sequential, 2 processes (images)": ["sampler=sequential", *ddp],
            "deq, 2 processes (timesteps)": ["sampler=deq", *ddp, "parallel.timesteps=true"],
        }
    results = {}
    for label, extra in cases.items():
        threads = 1 if any("devices=2" in e for e in extra) else args.threads
        results[label] = run(base + extra, threads)
        r = results[label]
        print(f"{label:36s} {r['images_per_min_wall']:7.2f} img/min wall  {r['images_per_min_solve'] or 0:7.2f} "
              f"img/min solve  ({r['n_images']} images, {r['wall_s']:.1f} s, {r['rounds']} rounds)", flush=True)
    out = {"size": args.size, "timesteps": args.timesteps, "weights": weights, "model_dtype": args.model_dtype,
           "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
