"""Initialization optimization per chain: where optimising x_T against the consistency loss has work to do.

DDNM's range correction projects every step onto A x = y, so the consistency objective ||A x0 - y||^2 with the
discrepancy-principle stop has nothing to do (README "Initialization optimization"). DDRM (eta_b < 1 or noisy y),
DiffPIR (a proximal step weighted by rho_j, not a projection), PiGDM and DPS (guidance steps; their gradients go
through the model VJP by double backward, 3-4x the cost of a DDRM step) do not project exactly. Per chain x task, with
the app's composed chain (``chain=<name>``, the task's presets, ``task.sigma_y``), the DEQ on the step form and
IFT gradients through the equilibrium: ||A x0 - y|| / noise, PSNR, LPIPS before (step 0 = the plain DEQ
restoration) and after (the best step), Adam steps taken and why it stopped (``stop_below``: the discrepancy
principle, mean squared residual <= (2 sigma_y)^2 on the [-1, 1] scale). No ground truth enters the objective
(it is passed only for the PSNR column).

    python benchmarks/init_opt_chains.py --chains ddrm diffpir ddnm --tasks sr4 inpaint_random deblur --T 10 \\
        --steps 8 --lr 0.1 --override sampler.etw=0 sampler.nw=0 --json bench_results/init_opt_chains.json
    python benchmarks/init_opt_chains.py --chains pigdm dps --tasks sr4 --T 10 --steps 2 --lr 0.1 \\
        --override sampler.etw=0 sampler.nw=0
"""
from __future__ import annotations

import argparse
from dataclasses import replace
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
from deqir.diffusion.chain import make_chain  # noqa: E402
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid  # noqa: E402
from deqir.samplers.sequential import draw_chain_noise  # noqa: E402
from deqir.lit.builders import chain_settings  # noqa: E402
from deqir.metrics import MetricSuite  # noqa: E402
from deqir.optim import SolveConfig, optimize_init  # noqa: E402
from deqir.utils.images import to_unit  # noqa: E402
from deqir.utils.runtime import tune_allocator  # noqa: E402


def problem(task: str, chain: str, x: torch.Tensor, T: int, sigma_y: float, overrides: list[str]):
    """(operator, y, coeffs, x_T, z, ChainSettings) as the app composes ``task=<task> chain=<chain>``."""
    B = x.shape[0]
    op, sy, cfg = task_operator(task, tuple(x.shape[1:]), [*overrides, f"chain={chain}", f"task.sigma_y={sigma_y}",
                                                          f"sampler.timesteps={T}"])
    st = chain_settings(cfg["sampler"], cfg["solver"], cfg.get("chain"))
    if st.solver == "auto":  # as benchmarks/quality.py: quasi_newton on all slots, step form
        st = replace(st, solver="quasi_newton", form="step",
                     solver_options={k: v for k, v in st.solver_options.items() if k != "knee_factor"})
    y = torch.cat([op.measure(x[b : b + 1], sy, torch.Generator().manual_seed(100 + b)) for b in range(B)])
    s = cfg["sampler"]
    coeffs = make_chain(NoiseSchedule.create(), SamplingGrid.create(T), etw=s["etw"], nw=s["nw"],
                        sigma_y_eff=2 * sy * (op.pinv_noise_gain() if sy > 0 else 1.0), noise_aware=s["noise_aware"])
    x_T, z = draw_chain_noise(x.shape, T, [torch.Generator().manual_seed(b) for b in range(B)],
                              per_step_noise=st.per_step_noise)
    return op, y, coeffs, x_T, z, st, sy


def run(args) -> tuple[list[dict], str]:
    model, note = load_model(torch.device("cpu"), "float32")
    x = sample_images(args.size, args.images)
    B, T = x.shape[0], args.T
    suite = MetricSuite(lpips_net=args.lpips, device=torch.device("cpu"))
    grad = DEQGradientConfig(mode="ift")
    rows = []
    for task in args.tasks:
        for chain in args.chains:
            try:
                op, y, coeffs, x_T, z, st, sy = problem(task, chain, x, T, args.sigma_y, list(args.override or []))
            except ValueError as err:
                print(f"skip {chain} / {task}: {err}", flush=True)
                continue
            noise = (2 * sy) ** 2  # discrepancy principle: the ground truth's mean squared residual
            solve = SolveConfig(solver=st.solver, max_iter=st.max_iter, tol=st.tol, stop_mode=st.stop_mode,
                                options=dict(st.solver_options))
            seen: dict[int, torch.Tensor] = {}

            def keep_first(info: dict) -> None:  # step 0 = the plain DEQ restoration (every image active)
                seen.setdefault(int(info["step"]), info["x0"])

            t0 = time.perf_counter()
            res = optimize_init(model, coeffs, x_T, losses={"consistency": 1.0}, operator=op, y=y, z=z,
                                ground_truth=x, steps=args.steps, lr=args.lr, stop_below=noise, solve=solve,
                                gradient=grad, map_form=st.form, clip_x0=st.clip_x0, chain=st.chain,
                                chain_params=st.chain_params, sigma_y=sy, callback=keep_first)
            secs = time.perf_counter() - t0
            first, summ = res.history[0], res.summary()
            row = {"chain": chain, "task": task, "sigma_y": sy, "seconds": secs,
                   "cons_before": sum(first["consistency"]) / B / noise,
                   "cons_after": sum(res.best_loss) / B / noise,
                   "psnr_before": sum(r["psnr_init"] for r in summ) / B,
                   "psnr_after": sum(r["psnr_best"] for r in summ) / B,
                   "steps": sum(r["evaluations"] - 1 for r in summ) / B,
                   "best_step": sum(r["best_step"] for r in summ) / B,
                   "status": ",".join(sorted(set(res.status))),
                   "adjoint_rounds": max((h["adjoint_rounds"] or 0) for h in res.history)}
            for label, img in (("before", seen[0]), ("after", res.x0_best)):
                row[f"lpips_{label}"] = float(suite.compute(to_unit(img), to_unit(x))["lpips"].mean())
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows, note


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", nargs="+", default=["ddnm", "ddrm", "diffpir"])
    ap.add_argument("--tasks", nargs="+", default=["deblur", "sr4", "inpaint_random"])
    ap.add_argument("--sigma-y", type=float, default=0.05, help="measurement noise std on [0, 1] (task.sigma_y)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--T", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--override", nargs="*", default=None, metavar="KEY=VALUE", help="invert.py overrides")
    ap.add_argument("--lpips", default="vgg")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    rows, note = run(args)
    print(f"\nmodel: {note}; {args.images} sample images at {args.size}^2, T={args.T}, σ_y={args.sigma_y}, "
          f"consistency loss, discrepancy stop, ≤{args.steps} Adam steps (lr {args.lr}), IFT gradients")
    table = print_table(rows, [
        ("chain", "chain", ""), ("task", "task", ""), ("cons_before", "‖Ax0−y‖²/noise before", ".2f"),
        ("cons_after", "after", ".2f"), ("psnr_before", "PSNR before", ".2f"), ("psnr_after", "PSNR after", ".2f"),
        ("lpips_before", "LPIPS before", ".3f"), ("lpips_after", "LPIPS after", ".3f"), ("steps", "steps", ".0f"),
        ("best_step", "best step", ".0f"), ("status", "stop", ""), ("seconds", "s", ".0f")])
    write_json(args.json, {"benchmark": "init_opt_chains", "model": note, "machine": machine_info(torch.device("cpu")),
                           "args": vars(args), "table": table, "rows": rows})


if __name__ == "__main__":
    main()
