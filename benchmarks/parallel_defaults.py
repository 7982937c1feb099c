"""The parallel solve of every task's default: rounds to 45 dB of its sequential result and work, at T = 25 and 100.

Each row runs invert.py's composed configuration for the task (plus ``--override``s, e.g. a grid) through the
app's RestorationModule with ``solver=quasi_newton`` on all slots (what ``solver=auto`` runs where batches are
nearly free, i.e. a GPU) and ``eval.compare_sequential=true``, which solves the same chain sequentially on the same
noise and records the PSNR of every round's x0 to it. Per image: rounds to 45 dB (the first round whose x0 is
within 45 dB of the sequential one), rounds and work (model evaluations / T) at the solver's own stop, and the
final PSNR to the sequential result (per image also its per-round trace, x0's dB to the sequential x0). Means
over the images; the solver's options can be varied with
``--solver-options`` (e.g. ``history_size=8``), so this is also the tuning bench of docs/solvers.md.

    python benchmarks/parallel_defaults.py --tasks deblur sr_avgpool4 inpaint_random --T 25 100 --limit 6
    python benchmarks/parallel_defaults.py --tasks generate --T 25
    python benchmarks/parallel_defaults.py --tasks sr4 inpaint_box --T 25 --skip 8 --limit 16   # a second draw
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from benchmarks.defaults import Runner, load_images  # noqa: E402

TASKS = ["deblur", "sr4", "sr_avgpool4", "inpaint_random", "inpaint_box", "inpaint_text", "denoise", "colorize", "cs2"]


def rounds_to(trace: list[float], level: float) -> float:
    """1-based first round whose PSNR to the sequential result reaches ``level`` (inf if none)."""
    return next((i + 1 for i, v in enumerate(trace) if v >= level), math.inf)


def run_task(task: str, T: int, overrides: list[str], names, images, args) -> dict:
    over = [*overrides, f"sampler.timesteps={T}", "solver=quasi_newton", "eval.compare_sequential=true",
            "eval.lpips=null", *[f"solver.{o}" for o in args.solver_options]]
    shape = tuple(images.shape[1:])
    if task == "generate":
        over += [f"dataset.size={shape[1]}"]
    runner = Runner(task, over, args.model_dtype, shape)
    module = runner.module
    per = []
    t0 = time.perf_counter()
    for start in range(0, len(names), args.batch):
        idx = list(range(start, min(len(names), start + args.batch)))
        batch = {"index": torch.tensor(idx), "name": [names[i] for i in idx]}
        if task != "generate":
            batch["image"] = images[idx]
        res = module.predict_step(batch)
        for row, tr in zip(res.rows, res.traces):
            trace = tr.get("psnr_to_sequential", [])
            per.append({"rounds_45": rounds_to(trace, 45.0), "rounds": float(row["rounds"]),
                        "work": float(row["nfe"]) / T, "psnr_seq": float(row["psnr_to_sequential"]),
                        "trace": [round(float(v), 2) for v in trace]})  # x0's dB to sequential, per round
    n = len(per)
    out = {"task": task, "T": T, "config": " ".join(overrides) or "default", "n": n,
           "seconds_per_img": (time.perf_counter() - t0) / n}
    for k in ("rounds_45", "rounds", "work", "psnr_seq"):  # "trace" stays per image
        vals = [p[k] for p in per]
        out[k] = sum(vals) / n
        out[f"{k}_max"] = max(vals)
    out["per_image"] = [{"name": nm, **p} for nm, p in zip(names, per)]  # for paired comparisons
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--T", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="invert.py overrides")
    ap.add_argument("--solver-options", nargs="*", default=[], metavar="KEY=VALUE",
                    help="quasi_newton options (solver.KEY=VALUE), e.g. history_size=4 tol=0.05")
    ap.add_argument("--images", default=str(ROOT / "data" / "eval" / "128"))
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first SKIP photos; the rest keep the seeds of positions 0, 1, ... (a second "
                         "draw of photo and noise: --skip 8 --limit 16 runs photos 9-24 on the first 16 photos' noise)")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--model-dtype", default="model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.skip < 0:
        raise SystemExit(f"error: --skip must be >= 0, got {args.skip}")
    names, images = load_images(Path(args.images), args.skip + args.limit)
    names, images = names[args.skip:], images[args.skip:]
    if not names:
        raise SystemExit(f"error: --skip {args.skip} leaves no photos in {args.images}")
    rows = []
    for T in args.T:
        for task in args.tasks:
            r = run_task(task, T, list(args.override), names, images, args)
            rows.append(r)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "per_image"}, flush=True)
    cols = [("task", "task", ""), ("T", "T", ""), ("config", "grid / overrides", ""), ("n", "images", ""),
            ("rounds_45", "rounds to 45 dB", ".1f"), ("rounds_45_max", "max", ".0f"), ("rounds", "rounds (stop)", ".1f"),
            ("work", "work", ".2f"), ("psnr_seq", "dB to seq at stop", ".1f")]
    print(f"\nquasi_newton on all slots ({' '.join(args.solver_options) or 'default options'}); "
          f"{args.limit} photos at {images.shape[-1]} px")
    table = print_table(rows, cols)
    write_json(args.json, {"benchmark": "parallel_defaults", "machine": machine_info(torch.device("cpu")),
                           "args": vars(args), "table": table, "rows": rows})


if __name__ == "__main__":
    main()
