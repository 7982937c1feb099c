"""Benchmark: DEQ inversion (mode=invert, the image itself as target, the paper's Fig. 5) on the evaluation set.

Unconditional deterministic chain (etw = nw = 0, as ``optimize.invert_chain=deterministic``), T = 25, 128 px, the
embedded default model. Per image (data/eval/128, data/eval_set.py):

* ``starts``: the reconstruction PSNR of x0 = chain(x_T) for x_T from the DDIM inversion (approximate) and from
  the fixed-point inversion with k iterations per step (deqir.optim.inversion.fixed_point_invert), with seconds
  and model calls;
* ``gradients``: from one start, ``--steps`` Adam steps on ||x0 - x||^2 per gradient on the same budget --
  ``ift`` (exact: the sequential sweep with autograd, step form), ``phantom`` (k = 1, tau = 0.1) and ``unroll``
  (2 rounds), the latter two on the paper's cumsum form (on the step form no gradient of a loss on x0 reaches
  x_T through fewer than T steps) after a warm-started sequential solve (sliding window of one slot);
  the PSNR after every step, seconds and model calls (forward slot evaluations) per step.

Per-image results are appended to ``--out``/results.jsonl as they finish (re-running resumes). ``--report``
prints the tables (means, paired differences with 95 % t-intervals) and writes ``--png`` (PSNR against steps).

    OMP_NUM_THREADS=1 python benchmarks/inversion.py --phase starts --out benchmarks/results/inversion
    OMP_NUM_THREADS=1 python benchmarks/inversion.py --phase gradients --images 4 --steps 10 --start ddim \\
        --out benchmarks/results/inversion
    python benchmarks/inversion.py --report --out benchmarks/results/inversion --png docs/inversion_psnr.png
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import eval_images, print_table, write_json  # noqa: E402
from benchmarks.stats import paired  # noqa: E402
from benchmarks.deq_vs_sequential import load_model, psnr  # noqa: E402
from deqir.deq.grad import DEQGradientConfig  # noqa: E402
from deqir.diffusion.chain import make_chain  # noqa: E402
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid  # noqa: E402
from deqir.optim import SolveConfig, optimize_init  # noqa: E402
from deqir.optim.inversion import ddim_invert, fixed_point_invert  # noqa: E402
from deqir.samplers.sequential import sample_sequential  # noqa: E402
from deqir.utils.runtime import tune_allocator  # noqa: E402

GRADIENTS = {  # label -> (gradient, map form, solve)
    "ift": (DEQGradientConfig(mode="ift", adjoint_solver="back_substitution"), "step",
            SolveConfig(solver="picard", max_iter=1, tol=0.0, stop_mode="rel", sequential_sweep=True)),
    "phantom": (DEQGradientConfig(mode="phantom", phantom_steps=1, tau=0.1), "cumsum",
                SolveConfig(solver="sliding_window", max_iter=None, tol=1e-4, stop_mode="rel", options={"window": 1})),
    "unroll": (DEQGradientConfig(mode="unroll", unroll_rounds=2), "cumsum",
               SolveConfig(solver="sliding_window", max_iter=None, tol=1e-4, stop_mode="rel", options={"window": 1})),
}


def _done(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    return {(r["phase"], r["image"], r["config"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "trace"}, flush=True)


def start(model, co, x, label: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if label == "ddim":
        return ddim_invert(model, co, x, return_states=True)
    return fixed_point_invert(model, co, x, iters=int(label.split("k=")[1]), return_states=True)


def run_starts(args, model, co, names, xs, out: Path) -> None:
    done = _done(out)
    for name, x in zip(names, xs):
        for label in ["ddim", *(f"fixed_point k={k}" for k in args.iters)]:
            if ("starts", name, label) in done:
                continue
            t0 = time.perf_counter()
            with torch.no_grad():
                x_T, _ = start(model, co, x[None], label)
                t1 = time.perf_counter()
                x0, _ = sample_sequential(model, co, x_T)
            calls = (len(co) - 1) if label == "ddim" else len(co) * int(label.split("k=")[1])
            _append(out, {"phase": "starts", "image": name, "config": label, "psnr": psnr(x0, x[None]),
                          "invert_s": t1 - t0, "invert_calls": calls, "x_T_std": float(x_T.std())})


def run_gradients(args, model, co, names, xs, out: Path) -> None:
    done = _done(out)
    for name, x in list(zip(names, xs))[: args.images]:
        x = x[None]
        with torch.no_grad():
            x_T0, states0 = start(model, co, x, args.start)
        for label in args.gradients:
            cfg = f"{label} from {args.start}, lr {args.lr}"
            if ("gradients", name, cfg) in done:
                continue
            grad, form, solve = GRADIENTS[label]
            stamps, calls = [time.perf_counter()], []

            def on_step(info: dict) -> None:
                stamps.append(time.perf_counter())
                calls.append(info["nfe"])

            res = optimize_init(model, co, x_T0, losses={"reference": 1.0}, reference=x, ground_truth=x,
                                reference_kind="l2", steps=args.steps, lr=args.lr, solve=solve, gradient=grad,
                                init_states=states0, map_form=form, callback=on_step)
            trace = [h["psnr"][0] for h in res.history]
            secs = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
            _append(out, {"phase": "gradients", "image": name, "config": cfg, "gradient": label, "start": args.start,
                          "lr": args.lr, "steps": args.steps, "trace": trace, "psnr_start": trace[0],
                          "psnr_best": max(trace), "seconds": sum(secs), "s_per_step": statistics.median(secs),
                          "calls_per_step": statistics.median(calls)})


def report(args, out: Path) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines() if line]
    starts = [r for r in rows if r["phase"] == "starts"]
    per: dict[str, dict[str, dict]] = {}
    for r in starts:
        per.setdefault(r["config"], {})[r["image"]] = r
    table_rows = []
    if "ddim" in per:
        for cfg, by in per.items():
            common = sorted(set(by) & set(per["ddim"]))
            d = paired([by[i]["psnr"] for i in common], [per["ddim"][i]["psnr"] for i in common])
            table_rows.append({"start": cfg, "n": len(common), "psnr": statistics.fmean(by[i]["psnr"] for i in common),
                               "min": min(by[i]["psnr"] for i in common),
                               "ge35": sum(by[i]["psnr"] >= 35 for i in common),
                               "d": f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]",
                               "s": statistics.fmean(by[i]["invert_s"] for i in common),
                               "calls": by[common[0]]["invert_calls"]})
        print("\nInversion starts: reconstruction PSNR of x0 = chain(x_T) (T = 25, 128 px, deterministic chain)")
        start_table = print_table(table_rows, [
            ("start", "x_T from", ""), ("n", "images", "d"), ("psnr", "PSNR dB", ".2f"), ("min", "min", ".2f"),
            ("ge35", ">= 35 dB", "d"), ("d", "Δ vs DDIM [95 % CI]", ""), ("s", "s / image", ".1f"),
            ("calls", "model calls", "d")])
    else:
        start_table = ""
    grads = [r for r in rows if r["phase"] == "gradients"]
    by_cfg: dict[str, list[dict]] = {}
    for r in grads:
        by_cfg.setdefault(r["config"], []).append(r)
    g_rows = []
    for cfg, rs in by_cfg.items():
        g_rows.append({"config": cfg, "n": len(rs), "start": statistics.fmean(r["psnr_start"] for r in rs),
                       "final": statistics.fmean(r["trace"][-1] for r in rs),
                       "best": statistics.fmean(r["psnr_best"] for r in rs), "steps": rs[0]["steps"],
                       "calls": statistics.fmean(r["calls_per_step"] for r in rs),
                       "s_step": statistics.fmean(r["s_per_step"] for r in rs),
                       "s": statistics.fmean(r["seconds"] for r in rs)})
    grad_table = ""
    if g_rows:
        print("\nGradients on the same budget (PSNR of x0 after each Adam step; T = 25, 128 px)")
        grad_table = print_table(g_rows, [
            ("config", "gradient", ""), ("n", "images", "d"), ("start", "PSNR start", ".2f"),
            ("final", "PSNR last step", ".2f"), ("best", "PSNR best", ".2f"), ("steps", "steps", "d"),
            ("calls", "model calls / step", ".0f"), ("s_step", "s / step", ".1f"), ("s", "s / image", ".0f")])
        if args.png:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            for cfg, rs in by_cfg.items():
                L = min(len(r["trace"]) for r in rs)
                mean = [statistics.fmean(r["trace"][k] for r in rs) for k in range(L)]
                ax.plot(range(L), mean, marker="o", ms=3, label=f"{cfg} (n={len(rs)})")
            ax.axhline(35, color="gray", ls="--", lw=0.8)
            for cfg, by in per.items():  # the starts without any gradient step, for scale
                if cfg != "ddim":
                    ax.axhline(statistics.fmean(r["psnr"] for r in by.values()), color="black", ls=":", lw=1,
                               label=f"{cfg} start, no gradient (n={len(by)})")
            ax.set_xlabel("Adam steps")
            ax.set_ylabel("PSNR of x0 to the image (dB)")
            ax.set_title("DEQ inversion, T = 25, 128 px, CPU")
            ax.legend(fontsize=7)
            fig.tight_layout()
            Path(args.png).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.png, dpi=110)
            print(f"wrote {args.png}")
    write_json(args.json, {"benchmark": "inversion", "starts_table": start_table, "gradients_table": grad_table,
                           "rows": rows})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=["starts", "gradients"], default="starts")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inversion")
    ap.add_argument("--report", action="store_true", help="only print the tables from --out")
    ap.add_argument("--png", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--T", type=int, default=25)
    ap.add_argument("--n", type=int, default=None, help="first n evaluation images (default: all)")
    ap.add_argument("--iters", type=int, nargs="+", default=[1, 2, 3], help="fixed-point iterations per step")
    ap.add_argument("--images", type=int, default=4, help="gradients phase: first this many images")
    ap.add_argument("--gradients", nargs="+", default=list(GRADIENTS), choices=list(GRADIENTS))
    ap.add_argument("--start", default="ddim", help="gradients phase: ddim | 'fixed_point k=K'")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    if args.report:
        report(args, results)
        return
    torch.set_num_threads(args.threads)
    tune_allocator()
    model, _ = load_model(torch.device("cpu"), "float32")
    names, xs = eval_images(args.size, args.n)
    co = make_chain(NoiseSchedule.create(), SamplingGrid.create(args.T), etw=0.0, nw=0.0)
    (run_starts if args.phase == "starts" else run_gradients)(args, model, co, names, xs, results)


if __name__ == "__main__":
    main()
