"""Benchmark of the ε-models: forward time and peak memory, real configs with random weights.

Grid: models x dtypes x sizes x batches (default: celeba_hq_ddpm and imagenet256_adm, float32 and bfloat16,
64² and 256², batch 1 / 8 / 25). Every cell of the grid appears in the output, measured or skipped with the
reason (not in --quick, over --cell-budget by estimate, out of memory, dtype not applicable).

Dtypes: ``float32``; ``bfloat16`` / ``float16`` = autocast around the fp32 weights (EpsModel ``dtype``);
``adm_fp16`` = the ADM reference fp16 torso (``use_fp16``, convert_to_fp16), ADM only.
Peak memory: CUDA ``max_memory_allocated``; CPU the process RSS high-water mark (reset per cell through
/proc/self/clear_refs on Linux; elsewhere ``ru_maxrss``, which cannot be reset, so only the maximum is exact).
"activation" memory is the peak minus what was held before the forward (the weights).

    python benchmarks/models.py --quick --json bench_results/models.json
    python benchmarks/models.py --device cuda --dtypes float32 bfloat16 adm_fp16 --json bench_results/models_gpu.json
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_json  # noqa: E402

from deqir.models import KNOWN_MODELS, load_eps_model, num_params

QUICK_CELLS = {("float32", 64, 1), ("float32", 64, 8), ("float32", 256, 1), ("bfloat16", 64, 1), ("bfloat16", 64, 8)}
DTYPES = ("float32", "bfloat16", "float16", "adm_fp16")


def _rss_mb(field: str) -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"{field}:\s+(\d+) kB", status)
    return int(found.group(1)) / 1024 if found else None


def _reset_peak(device: torch.device) -> float:
    """Reset the peak counter; return the memory held now (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return _rss_mb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, x: torch.Tensor, t: torch.Tensor, repeats: int, slow_s: float) -> dict:
    """One warm-up forward (its peak memory is reported), then ``repeats`` timed ones (1 if the warm-up was slow)."""
    device = x.device
    held = _reset_peak(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(x, t)
    _sync(device)
    warm = time.perf_counter() - t0
    peak = _peak(device)
    times = []
    for _ in range(1 if warm > slow_s else repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(x, t)
        _sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"ms": round(ms, 1), "warmup_ms": round(warm * 1e3, 1), "timed_runs": len(times),
            "images_per_s": round(x.shape[0] / (ms / 1e3), 2), "peak_mb": round(peak),
            "activation_mb": round(peak - held)}


def run(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[dict]]:
    rows, skipped = [], []
    started = time.perf_counter()
    for name in args.models:
        known = KNOWN_MODELS[name]
        config = dict(known["config"])
        if known["arch"] == "adm":
            config["use_fp16"] = False
        t0 = time.perf_counter()
        model = load_eps_model(known["arch"], config, "random", device=device)
        build_s = time.perf_counter() - t0
        base = {"model": name, "arch": known["arch"], "params": num_params(model.net), "build_s": round(build_s, 1)}
        dtypes = sorted(args.dtypes, key=lambda d: d == "adm_fp16")  # in-place fp16 conversion last
        for dtype in dtypes:
            cost_per_pixel = None  # seconds per (image x pixel), from the last measured cell of this dtype
            if dtype == "adm_fp16":
                if known["arch"] != "adm":
                    skipped += [{**base, "dtype": dtype, "size": s, "batch": b,
                                 "reason": "adm_fp16 applies to ADM only"} for s in args.sizes for b in args.batches]
                    continue
                model.net.convert_to_fp16()
                model.compute_dtype = torch.float32
            else:
                model.compute_dtype = getattr(torch, dtype)
            for size in args.sizes:
                for batch in sorted(args.batches):
                    cell = {**base, "dtype": dtype, "size": size, "batch": batch}
                    estimate = None if cost_per_pixel is None else cost_per_pixel * batch * size * size
                    reason = None
                    if args.quick and (dtype, size, batch) not in QUICK_CELLS:
                        reason = "not in the --quick preset"
                    elif estimate is not None and estimate * (1 + args.repeats) > args.cell_budget:
                        reason = (f"estimated {estimate:.0f} s per forward x {1 + args.repeats} runs > --cell-budget "
                                  f"{args.cell_budget:.0f} s")
                    elif time.perf_counter() - started > args.total_budget:
                        reason = f"--total-budget {args.total_budget:.0f} s used up"
                    if reason:
                        skipped.append({**cell, "reason": reason})
                        continue
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
                    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
                    try:
                        res = measure(model, x, t, args.repeats, args.slow_cell)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        skipped.append({**cell, "reason": "out of memory"})
                        continue
                    cost_per_pixel = res["ms"] / 1e3 / (batch * size * size)
                    rows.append({**cell, **res})
                    print(_fmt(rows[-1]), flush=True)
        del model
    return rows, skipped


def _fmt(r: dict) -> str:
    return (f"{r['model']:16s} {r['dtype']:9s} {r['size']:>5d} {r['batch']:>5d} {r['ms']:>11.1f} "
            f"{r['images_per_s']:>8.2f} {r['peak_mb']:>9d} {r['activation_mb']:>9d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", "--archs", nargs="+", default=["celeba_hq_ddpm", "imagenet256_adm"],
                        choices=sorted(KNOWN_MODELS), help="known model configs (random weights)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 25])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per cell after one warm-up")
    parser.add_argument("--quick", action="store_true",
                        help="only " + ", ".join(f"{d} {s}px b{b}" for d, s, b in sorted(QUICK_CELLS)))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--cell-budget", type=float, default=float("inf"),
                        help="skip cells whose estimated time (from the previous cell) exceeds this many seconds")
    parser.add_argument("--total-budget", type=float, default=float("inf"), help="stop measuring after this many s")
    parser.add_argument("--slow-cell", type=float, default=5.0, help="one timed run when the warm-up took longer")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    print(f"{'model':16s} {'dtype':9s} {'size':>5s} {'batch':>5s} {'ms/forward':>11s} {'img/s':>8s} "
          f"{'peak MB':>9s} {'act. MB':>9s}")
    rows, skipped = run(args, device)
    if skipped:
        print("\nskipped:")
        for s in skipped:
            print(f"  {s['model']} {s['dtype']} {s['size']}px batch {s['batch']}: {s['reason']}")
    result = {
        "config": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                   "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "repeats": args.repeats, "weights": "random (scaled init, seed 0); ADM built with use_fp16=False "
                   "except for adm_fp16 cells", "memory": "CUDA max_memory_allocated or process RSS high-water"},
        "rows": rows,
        "skipped": skipped,
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
