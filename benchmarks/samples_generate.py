"""Sample diversity (``num_samples``) and unconditional generation (``task=generate``), default model.

1. Diversity: K restorations per demo image (sequential chain by default), through the Python API
   (``invert.py``'s configuration): the mean PSNR / LPIPS of one sample, of the per-pixel mean, the mean
   pairwise LPIPS among the samples (diversity) and the mean per-pixel std, per task.
2. Generation: the same images (same seeds) from the sequential DDIM chain and from the DEQ sampler with
   each solver: rounds (serial model calls), work (model evaluations / T) and PSNR to the sequential images.

    python benchmarks/samples_generate.py --json bench_results/samples_generate.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from deqir.metrics.fidelity import psnr  # noqa: E402

GEN_SOLVERS = {"sequential": ["sampler=sequential"], "quasi_newton": ["solver=quasi_newton"],
               "anderson": ["solver=anderson"], "picard": ["solver=picard"]}


def diversity(args) -> list[dict]:
    import deqir
    from deqir.lit.builders import samples_dir

    paths = sorted(p for p in samples_dir().iterdir() if p.suffix == ".png")[: args.images]
    from deqir.datasets.images import center_crop_resize, read_image, to_tensor

    x = torch.stack([to_tensor(center_crop_resize(read_image(p), args.size, True)) for p in paths])
    rows = []
    for task in args.tasks:
        over = [f"sampler.timesteps={args.T}", f"num_samples={args.K}", f"sampler={args.diversity_sampler}",
                *args.override]
        start = time.perf_counter()
        res = deqir.evaluate(x, task=task, overrides=over)
        sec = time.perf_counter() - start
        st = res.stats
        mean = lambda k: sum(float(r[k]) for r in st) / len(st) if all(k in r for r in st) else None  # noqa: E731
        rows.append({"task": task, "K": args.K, "images": len(st), "psnr_sample": mean("psnr"),
                     "psnr_of_mean": mean("psnr_of_mean"), "lpips_sample": mean("lpips"),
                     "lpips_of_mean": mean("lpips_of_mean"), "diversity_lpips": mean("diversity_lpips"),
                     "sample_std": mean("sample_std"), "rounds": mean("rounds"), "nfe": mean("nfe"),
                     "seconds": sec})
    return rows


def generation(args) -> list[dict]:
    import deqir

    rows, ref = [], None
    for name, over in GEN_SOLVERS.items():
        if name not in args.solvers:
            continue
        start = time.perf_counter()
        res = deqir.generate(args.num_images, overrides=[f"dataset.size={args.size}", f"sampler.timesteps={args.T}",
                                                         *over, *args.override])
        sec = time.perf_counter() - start
        if ref is None and name == "sequential":
            ref = res.images
        st = res.stats
        rows.append({"sampler": name, "images": len(st), "rounds": sum(r["rounds"] for r in st) / len(st),
                     "work": sum(r["nfe"] for r in st) / len(st) / args.T,
                     "status": ",".join(sorted({r["status"] for r in st})),
                     "psnr_to_seq": float(psnr(res.images, ref, quantized=False).clamp(max=100).mean())
                     if ref is not None else None, "seconds": sec})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["diversity", "generation"], choices=["diversity", "generation"])
    p.add_argument("--tasks", nargs="+", default=["inpaint_random", "inpaint_box", "sr4", "deblur"])
    p.add_argument("--K", type=int, default=4, help="samples per image")
    p.add_argument("--diversity-sampler", default="sequential", choices=["sequential", "deq"],
                   help="sampler of the diversity part (the DEQ's fixed point is the sequential chain; "
                        "deq with solver=auto depends on the machine's timing)")
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--num-images", type=int, default=4, help="generated images")
    p.add_argument("--solvers", nargs="+", default=list(GEN_SOLVERS))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--T", type=int, default=25)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="invert.py overrides")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"machine": machine_info(torch.device("cpu")), "args": vars(args)}
    if "diversity" in args.parts:
        out["diversity"] = diversity(args)
        print(f"\nDiversity: K = {args.K} samples per image, {args.images} demo images, {args.size} px, T = {args.T}")
        print_table(out["diversity"], [("task", "task", ""), ("psnr_sample", "PSNR sample", ".2f"),
                                       ("psnr_of_mean", "PSNR mean", ".2f"), ("lpips_sample", "LPIPS sample", ".3f"),
                                       ("lpips_of_mean", "LPIPS mean", ".3f"),
                                       ("diversity_lpips", "diversity LPIPS", ".3f"),
                                       ("sample_std", "pixel std", ".4f"), ("nfe", "NFE / image", ".0f")])
    if "generation" in args.parts:
        out["generation"] = generation(args)
        print(f"\nGeneration: {args.num_images} images, {args.size} px, T = {args.T} (deterministic DDIM)")
        print_table(out["generation"], [("sampler", "sampler / solver", ""), ("rounds", "rounds", ".1f"),
                                        ("work", "work (NFE / T)", ".2f"), ("psnr_to_seq", "PSNR to seq (dB)", ".1f"),
                                        ("status", "status", ""), ("seconds", "seconds", ".1f")])
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
