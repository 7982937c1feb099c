"""Initialization optimization with the embedded default model: two measured demonstrations (docs/gradients.md).

1. ``denoise`` / noisy ``sr4``: optimise x_T against the measurement-consistency loss ||A x0 - y||^2 with the
   discrepancy principle as the stopping rule (stop once the mean squared residual reaches the noise level
   (2 sigma_y)^2, i.e. what the ground truth itself would give); PSNR before / after. No ground truth is
   used. The ``oracle`` variant (L2 to the ground truth, the paper's Fig. 5 top row) is reported beside it
   and marked as such.
2. ``colorize`` steered by a reference image (LPIPS-VGG to a reference photo, the paper's Fig. 5 bottom
   row): distance of the result's colours to the reference before / after, and ||A x0 - y|| (stays ~0:
   only the null space — colour — moves).

    python benchmarks/init_opt_demo.py --json bench_results/init_opt_demo.json
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
from benchmarks.deq_vs_sequential import load_model, sample_images  # noqa: E402
from benchmarks.quality import task_operator  # noqa: E402
from deqir.deq.grad import DEQGradientConfig  # noqa: E402
from deqir.samplers.deq import sample_deq  # noqa: E402
from deqir.diffusion.chain import make_chain  # noqa: E402
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid  # noqa: E402
from deqir.samplers.sequential import draw_chain_noise  # noqa: E402
from deqir.optim import SolveConfig, optimize_init  # noqa: E402
from deqir.utils.runtime import tune_allocator  # noqa: E402


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel colour without brightness: x - mean over channels, (B, 3, H, W) on [-1, 1]."""
    return x - x.mean(dim=1, keepdim=True)


def mean_colour_dist(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Distance between the images' average colours (chroma averaged over pixels; content-independent)."""
    return float((chroma(x.clamp(-1, 1)).mean(dim=(2, 3)) - chroma(ref).mean(dim=(2, 3))).norm(dim=1).mean())


def run(args) -> tuple[list[dict], str]:
    model, note = load_model(torch.device("cpu"), "float32")
    sched = NoiseSchedule.create()
    x = sample_images(args.size, args.images)
    B, T = x.shape[0], args.T
    x_T, _ = draw_chain_noise(x.shape, T, [torch.Generator().manual_seed(b) for b in range(B)], per_step_noise=False)
    solve = SolveConfig(solver="anderson", max_iter=args.max_iter, tol=1e-3, stop_mode="rel", options={"beta": 0.5})
    grad = DEQGradientConfig(mode=args.gradient)
    rows = []
    for task, sigma_y in (("denoise", 0.1), ("sr4", 0.05)) if "restore" in args.demos else ():
        op, _, _ = task_operator(task, tuple(x.shape[1:]))
        y = torch.cat([op.measure(x[b : b + 1], sigma_y, torch.Generator().manual_seed(100 + b)) for b in range(B)])
        coeffs = make_chain(sched, SamplingGrid.create(T), etw=0.0, nw=0.0,
                            sigma_y_eff=2 * sigma_y * op.pinv_noise_gain())
        for label, losses, stop in (("consistency + discrepancy stop", {"consistency": 1.0}, (2 * sigma_y) ** 2),
                                    ("oracle (uses ground truth)", {"oracle": 1.0}, None)):
            t0 = time.perf_counter()
            res = optimize_init(model, coeffs, x_T, losses=losses, operator=op, y=y, ground_truth=x,
                                steps=args.steps, lr=args.lr, stop_below=stop, solve=solve, gradient=grad,
                                map_form="cumsum")
            s = res.summary()
            cons0 = sum(res.history[0]["consistency"]) / B if "consistency" in res.history[0] else float("nan")
            rows.append({"demo": f"{task} σ_y={sigma_y}", "objective": label,
                         "cons_over_noise": cons0 / (2 * sigma_y) ** 2,
                         "psnr_before": sum(r["psnr_init"] for r in s) / B, "psnr_after": sum(r["psnr_best"] for r in s) / B,
                         "steps": sum(r["best_step"] for r in s) / B, "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
    if "colorize" in args.demos:
        rows.append(colorize_demo(args, model, sched, x, x_T, grad))
    return rows, note


def colorize_demo(args, model, sched, x, x_T, grad) -> dict:
    """Colorization steered by a reference photo, with the colorize task's recommended chain (deterministic,
    x0 clipped to [-1, 1] every step, step form, Picard: exact after T rounds), so x0 stays in range."""
    B, T = x.shape[0], args.T
    op, _, _ = task_operator("colorize", tuple(x.shape[1:]))
    y = op.A(x)
    coeffs = make_chain(sched, SamplingGrid.create(T), etw=0.0, nw=0.0)
    solve = SolveConfig(solver="picard", max_iter=T, tol=1e-3, stop_mode="rel")
    ref = sample_images(args.size, 3)[[2, 0, 1]][:B]  # another image's colours as the reference
    x0_before = sample_deq(model, coeffs, x_T, operator=op, y=y, solver="picard", max_iter=T, tol=1e-3,
                           stop_mode="rel", init="x_T", form="step", clip_x0=True).x0  # the unsteered restoration
    t0 = time.perf_counter()
    res = optimize_init(model, coeffs, x_T, losses={"reference": 1.0}, operator=op, y=y, reference=ref,
                        reference_kind=args.reference_kind, steps=args.steps, lr=args.lr, solve=solve, gradient=grad,
                        map_form="step", clip_x0=True)
    first = res.history[0]
    s = res.summary()
    row = {"demo": "colorize + reference", "objective": f"{args.reference_kind} to reference",
           "loss_before": sum(first["loss"]) / B, "loss_after": sum(res.best_loss) / B,
           "consistency_after": float((op.A(res.x0_best) - y).flatten(1).norm(dim=1).mean()),
           "chroma_dist_before": float((chroma(x0_before.clamp(-1, 1)) - chroma(ref)).square().mean()),
           "chroma_dist_after": float((chroma(res.x0_best.clamp(-1, 1)) - chroma(ref)).square().mean()),
           "mean_colour_dist_before": mean_colour_dist(x0_before, ref),
           "mean_colour_dist_after": mean_colour_dist(res.x0_best, ref),
           "steps": sum(r["best_step"] for r in s) / B, "seconds": time.perf_counter() - t0}
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--T", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--gradient", default="ift", choices=["ift", "phantom", "unroll"])
    ap.add_argument("--reference-kind", default="lpips", choices=["lpips", "l2"])
    ap.add_argument("--demos", nargs="+", default=["restore", "colorize"], choices=["restore", "colorize"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    rows, note = run(args)
    print(f"\nmodel: {note}; {args.images} sample images at {args.size}^2, T={args.T}, {args.steps} Adam steps, "
          f"lr {args.lr}, gradient {args.gradient}")
    table = print_table(rows, [("demo", "demo", ""), ("objective", "objective", ""),
                               ("cons_over_noise", "‖Ax0−y‖² / noise at step 0", ".2f"),
                               ("psnr_before", "PSNR before", ".2f"), ("psnr_after", "PSNR after", ".2f"),
                               ("loss_before", "loss before", ".4f"), ("loss_after", "loss after", ".4f"),
                               ("consistency_after", "‖Ax0−y‖ after", ".2e"),
                               ("chroma_dist_before", "colour dist. before", ".4f"),
                               ("chroma_dist_after", "colour dist. after", ".4f"),
                               ("mean_colour_dist_before", "mean-colour dist. before", ".4f"),
                               ("mean_colour_dist_after", "mean-colour dist. after", ".4f"), ("steps", "best step", ".1f"),
                               ("seconds", "s", ".0f")])
    write_json(args.json, {"benchmark": "init_opt_demo", "model": note, "machine": machine_info(torch.device("cpu")),
                           "args": vars(args), "table": table, "rows": rows})


if __name__ == "__main__":
    main()
