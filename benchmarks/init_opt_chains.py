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

``--eval N`` runs on the first N photos of the evaluation set (data/eval/128, data/eval_set.py) one image at a time,
appends every image's result to ``--out``/results.jsonl as it finishes (re-running resumes) and reports means with
the paired per-image differences after - before and their 95 % t-intervals. ``--objective`` picks what is optimised
(no ground truth enters any of them; it is used only for the PSNR / LPIPS columns):

* ``consistency``: ||A x0 - y||^2 with the discrepancy stop, for the chains that do not project exactly;
* ``reference``: LPIPS to a reference photo (``task=colorize``: colours steered by the reference; the reference is
  the ground truth mirrored left-right: the right colours, not the right pixels);
* ``perceptual``: LPIPS to another restorer's output (``--peer`` chain, e.g. DiffPIR, restoring the same y).

    python benchmarks/init_opt_chains.py --eval 24 --objective consistency --chains ddrm diffpir --tasks sr4 \\
        --T 10 --steps 4 --lr 0.05 --override chain.eta_b=0.5 --out benchmarks/results/init_opt
    python benchmarks/init_opt_chains.py --eval 24 --report --out benchmarks/results/init_opt
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

from benchmarks.common import eval_images, machine_info, print_table, write_json  # noqa: E402
from benchmarks.stats import paired  # noqa: E402
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


def _solve(st) -> SolveConfig:
    """The app's forward solve on this CPU (solver=auto: the sequential schedule, solved with autograd)."""
    return SolveConfig(solver=st.solver, max_iter=st.max_iter, tol=st.tol, stop_mode=st.stop_mode,
                       options=dict(st.solver_options), sequential_sweep=st.form == "step")


def run_eval(args) -> None:
    """--eval N: one image at a time, resumable (module docstring)."""
    import json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = set()
    if path.is_file():
        done = {(r["objective"], r["chain"], r["task"], r["image"], json.dumps(r["override"]), r["lr"])
                for r in map(json.loads, path.read_text().splitlines())}
    model, _ = load_model(torch.device("cpu"), "float32")
    names, xs = eval_images(args.size, args.eval)
    suite = MetricSuite(lpips_net=args.lpips, device=torch.device("cpu"))
    from deqir.metrics import LPIPSLoss

    lpips_loss = LPIPSLoss(net=args.lpips, reduction="none") if args.objective != "consistency" else None
    grad = DEQGradientConfig(mode="ift", adjoint_solver="back_substitution")
    for task in args.tasks:
        for chain in args.chains:
            for name, x in zip(names, xs):
                key = (args.objective, chain, task, name, json.dumps(args.override), args.lr)
                if key in done:
                    continue
                x = x[None]
                op, y, coeffs, x_T, z, st, sy = problem(task, chain, x, args.T, args.sigma_y, list(args.override or []))
                common = dict(operator=op, y=y, z=z, ground_truth=x, solve=_solve(st), gradient=grad, map_form=st.form,
                              clip_x0=st.clip_x0, chain=st.chain, chain_params=st.chain_params, sigma_y=sy)
                reference, stop, losses = None, None, {"consistency": 1.0}
                if args.objective == "consistency":
                    stop = (2 * sy) ** 2  # the discrepancy principle
                elif args.objective == "reference":
                    reference, losses = torch.flip(x, dims=[-1]), {"reference": 1.0}
                else:  # perceptual: the peer chain's restoration of the same y (its DEQ = sequential result)
                    pop, py, pco, px_T, pz, pst, psy = problem(task, args.peer, x, args.T, args.sigma_y,
                                                               list(args.peer_override or []))
                    peer = optimize_init(model, pco, px_T, losses={"consistency": 1.0}, operator=pop, y=y, z=pz,
                                         steps=0, lr=1.0, solve=_solve(pst), gradient=grad, map_form=pst.form,
                                         clip_x0=pst.clip_x0, chain=pst.chain, chain_params=pst.chain_params,
                                         sigma_y=psy)
                    reference, losses = peer.x0_best, {"reference": 1.0}
                seen: dict[int, torch.Tensor] = {}
                t0 = time.perf_counter()
                res = optimize_init(model, coeffs, x_T, losses=losses, reference=reference, reference_kind="lpips",
                                    lpips_net=args.lpips, lpips_loss=lpips_loss, steps=args.steps, lr=args.lr,
                                    stop_below=stop, callback=lambda info: seen.setdefault(int(info["step"]), info["x0"]),
                                    **common)
                secs = time.perf_counter() - t0
                row = {"objective": args.objective, "chain": chain, "task": task, "image": name, "sigma_y": sy,
                       "T": args.T, "steps_max": args.steps, "lr": args.lr, "seconds": secs,
                       "loss_before": res.history[0]["loss"][0], "loss_after": res.best_loss[0],
                       "best_step": res.best_step[0], "status": res.status[0], "override": args.override}
                if args.objective == "perceptual":
                    row["peer"] = args.peer
                    m = suite.compute(to_unit(reference), to_unit(x))
                    row["psnr_peer"], row["lpips_peer"] = float(m["psnr"][0]), float(m["lpips"][0])
                for label, img in (("before", seen[0]), ("after", res.x0_best)):
                    m = suite.compute(to_unit(img), to_unit(x))
                    row[f"psnr_{label}"], row[f"lpips_{label}"] = float(m["psnr"][0]), float(m["lpips"][0])
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)


def report_eval(args) -> str:
    """Tables from --out/results.jsonl: per (objective, chain, task) means and paired differences after - before."""
    import json
    import statistics

    rows = [json.loads(line) for line in (Path(args.out) / "results.jsonl").read_text().splitlines() if line]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["objective"], r["chain"], r["task"], r.get("peer", ""), " ".join(r["override"] or []),
                           r["lr"]), []).append(r)
    table = []
    for (obj, chain, task, peer, over, lr), rs in groups.items():
        dp = paired([r["psnr_after"] for r in rs], [r["psnr_before"] for r in rs])
        dl = paired([r["lpips_after"] for r in rs], [r["lpips_before"] for r in rs])
        table.append({"objective": obj + (f" (to {peer})" if peer else ""), "chain": chain + (f" ({over})" if over else ""),
                      "task": task, "lr": lr, "n": len(rs),
                      "psnr_before": statistics.fmean(r["psnr_before"] for r in rs),
                      "psnr_after": statistics.fmean(r["psnr_after"] for r in rs),
                      "d_psnr": f"{dp['mean']:+.2f} [{dp['lo']:+.2f}, {dp['hi']:+.2f}]",
                      "lpips_before": statistics.fmean(r["lpips_before"] for r in rs),
                      "lpips_after": statistics.fmean(r["lpips_after"] for r in rs),
                      "d_lpips": f"{dl['mean']:+.3f} [{dl['lo']:+.3f}, {dl['hi']:+.3f}]",
                      "moved": sum(r["best_step"] > 0 for r in rs),
                      "s": statistics.fmean(r["seconds"] for r in rs)})
    return print_table(table, [
        ("objective", "objective", ""), ("chain", "chain", ""), ("task", "task", ""), ("lr", "Adam lr", ""),
        ("n", "images", "d"),
        ("psnr_before", "PSNR before", ".2f"), ("psnr_after", "after", ".2f"), ("d_psnr", "Δ PSNR [95 % CI]", ""),
        ("lpips_before", "LPIPS before", ".3f"), ("lpips_after", "after", ".3f"), ("d_lpips", "Δ LPIPS [95 % CI]", ""),
        ("moved", "objective lowered (images)", "d"), ("s", "s / image", ".0f")])


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
    ap.add_argument("--eval", type=int, default=None, metavar="N", help="the first N photos of data/eval/<size>")
    ap.add_argument("--objective", choices=["consistency", "reference", "perceptual"], default="consistency")
    ap.add_argument("--peer", default="diffpir", help="perceptual: the chain whose restoration is the target")
    ap.add_argument("--peer-override", nargs="*", default=None, metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/init_opt"))
    ap.add_argument("--report", action="store_true", help="--eval: only print the tables from --out")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    if args.eval is not None:
        if args.report:
            table = report_eval(args)
            write_json(args.json, {"benchmark": "init_opt_chains --eval", "table": table})
        else:
            run_eval(args)
        return
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
