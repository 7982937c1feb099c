"""Benchmark of the degradation operators: time of A and A_pinv at 256 x 256, batch 25, float32.

Also measures how far the legacy (official DDRM / DDNM / DeqIR) deblurring operator is from the true blur
(the numbers quoted in docs/operators.md), on skimage's astronaut image when scikit-image is installed and
on white noise.

    python benchmarks/operators.py --json bench_results/operators.json [--device cuda] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_json  # noqa: E402

from deqir.operators import GeneralLinearOperator, make_operator

CASES: list[tuple[str, str, dict]] = [
    ("sr_bicubic x4", "sr_bicubic", {"scale": 4}),
    ("sr_bicubic x16", "sr_bicubic", {"scale": 16}),
    ("sr_avgpool x4", "sr_avgpool", {"scale": 4}),
    ("deblur_gauss", "deblur_gauss", {}),
    ("deblur_gauss legacy_svd", "deblur_gauss", {"legacy_svd": True}),
    ("deblur_gauss boundary=zero", "deblur_gauss", {"boundary": "zero"}),
    ("deblur_uniform", "deblur_uniform", {}),
    ("deblur_uniform legacy_svd", "deblur_uniform", {"legacy_svd": True}),
    ("deblur_aniso", "deblur_aniso", {}),
    ("deblur_aniso legacy_svd", "deblur_aniso", {"legacy_svd": True}),
    ("deblur_kernel 15x15", "deblur_kernel", {"kernel": "gaussian", "kernel_size": 15, "sigma": 3.0}),
    ("inpaint text", "inpaint", {"mask_type": "text"}),
    ("colorize", "colorize", {}),
    ("cs_walsh_hadamard r4", "cs_walsh_hadamard", {"ratio": 4}),
    ("denoise", "denoise", {}),
    ("compose colorize+inpaint", "compose",
     {"operators": [{"name": "colorize"}, {"name": "inpaint", "mask_type": "text"}]}),
    ("general_cg (sr_bicubic x4, tol 1e-6)", "general", {}),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, arg, device: torch.device, repeats: int) -> float:
    """Median wall time (ms) of fn(arg) after one warm-up call."""
    fn(arg)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(device: torch.device, size: int, batch: int, repeats: int) -> list[dict]:
    shape = (3, size, size)
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(device)
    rows = []
    for label, name, params in CASES:
        t0 = time.perf_counter()
        if name == "general":
            inner = make_operator("sr_bicubic", shape, scale=4).to(device=device, dtype=torch.float32)
            op = GeneralLinearOperator(inner.A, shape, tol=1e-6, max_iter=200)
        else:
            op = make_operator(name, shape, **params).to(device=device, dtype=torch.float32)
        build_ms = (time.perf_counter() - t0) * 1e3
        y = op.A(x)
        row = {
            "operator": label,
            "build_ms": round(build_ms, 1),
            "A_ms": round(_time(op.A, x, device, repeats), 2),
            "A_pinv_ms": round(_time(op.A_pinv, y, device, repeats), 2),
            "measurement_shape": list(op.measurement_shape),
            "pinv_noise_gain": round(op.pinv_noise_gain(), 3),
            "consistency": float((op.A(op.A_pinv(y)) - y).norm() / y.norm()),  # float32 |A A+ y - y| / |y|
        }
        rows.append(row)
    return rows


def legacy_difference() -> dict:
    """|A_legacy x - A_true x| / |A_true x| (true = circular conv2d, zero_threshold 0), float64, 256 x 256."""
    images = {"white noise": torch.rand((1, 3, 256, 256), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64) * 2 - 1}
    try:
        from skimage import data, transform

        img = transform.resize(data.astronaut(), (256, 256), anti_aliasing=True)
        images["astronaut"] = torch.tensor(img).permute(2, 0, 1)[None].double() * 2 - 1
    except ImportError:  # scikit-image is an optional (dev / train) dependency
        pass
    out = {}
    for name in ("deblur_gauss", "deblur_uniform", "deblur_aniso"):
        legacy = make_operator(name, (3, 256, 256), legacy_svd=True)
        exact = make_operator(name, (3, 256, 256), zero_threshold=0.0)
        truncated = make_operator(name, (3, 256, 256))
        res = {}
        for label, x in images.items():
            ref = exact.A(x)
            leg = legacy.A(x)
            res[label] = {
                "legacy_vs_true_rel": round(float((leg - ref).norm() / ref.norm()), 4),
                "legacy_vs_true_psnr_db": round(float(10 * torch.log10(4 / (leg - ref).pow(2).mean())), 2),
                "true_default_threshold_vs_conv_rel": round(float((truncated.A(x) - ref).norm() / ref.norm()), 5),
            }
        out[name] = res
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, and cuda too when available)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-legacy-difference", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = {
        "config": {"size": args.size, "batch": args.batch, "dtype": "float32", "repeats": args.repeats,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
                   or platform.machine()},
        "timings": {},
    }
    for dev in devices:
        device = torch.device(dev)
        if device.type == "cuda":
            result["config"]["gpu"] = torch.cuda.get_device_name(device)
        rows = bench(device, args.size, args.batch, args.repeats)
        result["timings"][dev] = rows
        print(f"\n{dev}: {args.size}x{args.size}, batch {args.batch}, float32 (median of {args.repeats}, ms)")
        print(f"{'operator':40s} {'A':>9s} {'A_pinv':>9s} {'build':>8s} {'gain':>8s} {'|AA+y-y|/|y|':>13s}")
        for r in rows:
            print(f"{r['operator']:40s} {r['A_ms']:9.2f} {r['A_pinv_ms']:9.2f} {r['build_ms']:8.1f} "
                  f"{r['pinv_noise_gain']:8.3f} {r['consistency']:13.1e}")
    if not args.skip_legacy_difference:
        result["legacy_difference"] = legacy_difference()
        print("\nlegacy_svd vs true blur (256x256):")
        print(json.dumps(result["legacy_difference"], indent=1))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
