"""Benchmark: the cost of one optimisation step of mode=invert / mode=optimize_init against one restoration.

One step is what :func:`deqir.optim.optimize_init` does per iteration: the forward solve warm-started from the
previous step's states, the gradient attachment, the loss on x0, backward, Adam. It is timed inside the real loop
(the interval between consecutive step callbacks; median over ``--steps`` steps after the first evaluation) and
compared with one restoration by the sequential chain (T model calls, no autograd) on the same process, image and
chain. Configurations (docs/gradients.md):

* ``ift sweep``: the sequential schedule solved with autograd (``SolveConfig.sequential_sweep``), backprop = the
  exact back-substitution adjoint; what ``solver=auto`` runs on a device where a batch costs its size (CPU);
* ``ift back_substitution``: warm-started no-grad solve (quasi_newton, frontier window 1), then eq. (2);
* ``ift picard``: the same solve, then the Picard adjoint over all slots (the former default; ~T^2 slot-VJPs);
* ``phantom``: k = 1, tau = 0.1; ``unroll``: 2 Picard rounds backpropagated (both after the same solve).

Columns: seconds per step, the ratio to one restoration (target <= 3), model calls per step (forward slot
evaluations of the solve and the attachment; backward passes not counted), the peak memory of the run above its
start (RSS, sampled), and the gradient's cosine with the exact one (backprop through the sequential chain at the
first step's x_T).

    OMP_NUM_THREADS=1 python benchmarks/optimization_step.py --json benchmarks/results/optimization_step.json
    python benchmarks/optimization_step.py --size 64 --T 10 --configs "ift sweep" phantom     # quick
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, peak_memory, print_table, write_json  # noqa: E402
from benchmarks.deq_vs_sequential import load_model, sample_images  # noqa: E402
from deqir.deq.grad import DEQGradientConfig  # noqa: E402
from deqir.diffusion.chain import make_chain  # noqa: E402
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid  # noqa: E402
from deqir.samplers.sequential import draw_chain_noise, sample_sequential, sample_sequential_with_grad  # noqa: E402
from deqir.operators import make_operator  # noqa: E402
from deqir.optim import SolveConfig, optimize_init  # noqa: E402
from deqir.optim.inversion import ddim_invert  # noqa: E402
from deqir.utils.runtime import tune_allocator  # noqa: E402

CONFIGS = {  # label -> (gradient config, sequential sweep)
    "ift sweep": (DEQGradientConfig(mode="ift", adjoint_solver="back_substitution"), True),
    "ift back_substitution": (DEQGradientConfig(mode="ift", adjoint_solver="back_substitution"), False),
    "ift picard": (DEQGradientConfig(mode="ift", adjoint_solver="picard"), False),
    "phantom": (DEQGradientConfig(mode="phantom", phantom_steps=1, tau=0.1), False),
    "unroll": (DEQGradientConfig(mode="unroll", unroll_rounds=2), False),
}
QN = {"window": 1, "history_size": 2, "output_tol": 0.5, "prior_slope": 3.0, "prior_variance": 0.5,
      "deterministic_tol": 0.002}


def problem(mode: str, x: torch.Tensor, T: int, model):
    """Keyword arguments of optimize_init and of the sequential chain for ``mode`` on images x."""
    B = x.shape[0]
    if mode == "invert":  # unconditional deterministic chain, L2 to the image, DDIM-inversion start
        co = make_chain(NoiseSchedule.create(), SamplingGrid.create(T), etw=0.0, nw=0.0)
        x_T = ddim_invert(model, co, x)
        return co, x_T, {"losses": {"reference": 1.0}, "reference": x, "reference_kind": "l2"}, {}
    # optimize_init: sr4 (bicubic), noisy y (sigma 0.05), the default stochastic chain, consistency loss
    op = make_operator("sr_bicubic", tuple(x.shape[1:]), scale=4)
    y = torch.cat([op.measure(x[b : b + 1], 0.05, torch.Generator().manual_seed(100 + b)) for b in range(B)])
    co = make_chain(NoiseSchedule.create(), SamplingGrid.create(T), etw=1.0, nw=1.0,
                    sigma_y_eff=2 * 0.05 * op.pinv_noise_gain())
    x_T, z = draw_chain_noise(x.shape, T, [torch.Generator().manual_seed(b) for b in range(B)], per_step_noise=True)
    kw = {"losses": {"consistency": 1.0}, "operator": op, "y": y, "z": z, "sigma_y": 0.05}
    return co, x_T, kw, {"operator": op, "y": y, "z": z}


def measure(mode: str, label: str, model, x, T: int, steps: int, lr: float) -> dict:
    co, x_T, kw, seq_kw = problem(mode, x, T, model)
    with torch.no_grad():
        t0 = time.perf_counter()
        sample_sequential(model, co, x_T, **seq_kw)
        t_restore = time.perf_counter() - t0
    grad, sweep = CONFIGS[label]
    solve = SolveConfig(solver="quasi_newton", max_iter=T, tol=0.02, stop_mode="noise", options=QN,
                        sequential_sweep=sweep)
    stamps, nfe = [], []

    def on_step(info: dict) -> None:
        stamps.append(time.perf_counter())
        nfe.append(info["nfe"])

    extra = {k: v for k, v in kw.items() if k in ("operator", "y", "z", "sigma_y")}
    with peak_memory(torch.device("cpu")) as mem:
        res = optimize_init(model, co, x_T, losses=kw["losses"], reference=kw.get("reference"),
                            reference_kind=kw.get("reference_kind", "lpips"), steps=steps, lr=lr, solve=solve,
                            gradient=grad, map_form="step", callback=on_step, **extra)
    per_step = [b - a for a, b in zip(stamps[:-1], stamps[1:])]  # the last interval has no backward
    step_s = statistics.median(per_step[:-1] or per_step)
    return {"mode": mode, "gradient": label, "T": T, "size": x.shape[-1], "images": x.shape[0],
            "restore_s": t_restore, "step_s": step_s, "ratio": step_s / t_restore,
            "calls_per_step": statistics.median(nfe[1:-1] or nfe) / x.shape[0], "peak_mb": mem["peak_mb"],
            "loss_first": res.history[0]["loss"], "loss_best": res.best_loss}


def cosine(mode: str, label: str, model, x, T: int) -> float:
    """Cosine of the configuration's gradient at the start x_T with the exact gradient."""
    co, x_T, kw, seq_kw = problem(mode, x, T, model)
    from deqir.deq.joint_map import ChainMap
    from deqir.deq.solvers import get_solver
    from deqir.optim.losses import LossTerms

    terms = LossTerms(kw["losses"], operator=kw.get("operator"), y=kw.get("y"), reference=kw.get("reference"),
                      reference_kind=kw.get("reference_kind", "lpips"))
    xr = x_T.clone().requires_grad_(True)
    x0, _ = sample_sequential_with_grad(model, co, xr, **seq_kw)
    terms(x0, xr)["total"].sum().backward()
    exact = xr.grad.flatten().double()
    grad, sweep = CONFIGS[label]
    xg = x_T.clone().requires_grad_(True)
    fmap = ChainMap(model, co, xg, operator=kw.get("operator"), y=kw.get("y"), z=kw.get("z"), form="step")
    if sweep:
        from deqir.deq.grad import sequential_with_gradient
        states = sequential_with_gradient(fmap)
    else:
        z_star, _ = get_solver("quasi_newton")(fmap, fmap.initial_state(), max_iter=T, tol=0.02, stop_mode="noise",
                                               **QN)
        states = grad.attach(fmap, z_star)
    terms(states[:, -1], xg)["total"].sum().backward()
    if float(exact.norm()) == 0.0:
        return math.nan  # the exact gradient itself is 0 (in float32: a chain that forgets x_T)
    if xg.grad is None or float(xg.grad.norm()) == 0.0:
        return 0.0  # no gradient reaches x_T (phantom / unroll with k < T rounds on the step form)
    g = xg.grad.flatten().double()
    return float(g @ exact / (g.norm() * exact.norm()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=["invert", "optimize_init"], choices=["invert", "optimize_init"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--T", type=int, default=25)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="Adam steps per configuration (timed: all but the last)")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--no-cosine", dest="cos", action="store_false")
    ap.add_argument("--picard-steps", type=int, default=1,
                    help="timed steps of the (slow) 'ift picard' configuration; its cosine is not measured")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_allocator()
    model, note = load_model(torch.device("cpu"), "float32")
    x = sample_images(args.size, args.images)
    rows = []
    for mode in args.modes:
        for label in args.configs:
            picard = label == "ift picard"
            r = measure(mode, label, model, x, args.T, args.picard_steps + 1 if picard else args.steps, args.lr)
            if args.cos and not picard:
                r["cosine"] = cosine(mode, label, model, x[:1], args.T)
            rows.append(r)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    print(f"\nmodel: {note}; {args.images} image(s) at {args.size}^2, T={args.T}, CPU, {args.threads} thread(s)")
    table = print_table(rows, [("mode", "mode", ""), ("gradient", "gradient", ""), ("restore_s", "restore s", ".2f"),
                               ("step_s", "step s", ".2f"), ("ratio", "step / restore", ".2f"),
                               ("calls_per_step", "model calls / step", ".0f"), ("peak_mb", "peak MB", ".0f"),
                               ("cosine", "cos vs exact", ".4f")])
    write_json(args.json, {"benchmark": "optimization_step", "model": note, "machine": machine_info(torch.device("cpu")),
                           "args": vars(args), "table": table, "rows": rows})


if __name__ == "__main__":
    main()
