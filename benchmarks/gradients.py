"""Benchmark: one initialization-optimisation step per gradient mode vs backprop through the sequential chain.

One step = what :func:`deqir.optim.optimize_init` does per iteration: build the map, solve the equilibrium
(warm-started from the previous step, as in the loop), attach the gradient, loss on x0, backward, Adam
step. The reference is backpropagation through the full T-step sequential chain
(:func:`deqir.samplers.sequential.sample_sequential_with_grad`). Each cell runs in a fresh subprocess:
one untimed step (cold solve, allocator warm-up), then ``--repeats`` timed steps (median reported).

Columns: wall time per step (and its solve / gradient split), peak memory above the pre-step baseline,
forward-solver rounds, adjoint rounds (IFT), the gradient's cosine with the exact (sequential) gradient,
and ``serial_calls``: model calls (forward or backward) that must run one after another -- the step's
length on parallel hardware where a batched call over T images costs about as much as one image
(sequential: T forward + T backward; DEQ: solver rounds + attachment + adjoint rounds + final backward).

Peak memory: CUDA ``max_memory_allocated``; on the CPU the process RSS high-water mark (VmHWM) above the
RSS before the step, reset through ``/proc/self/clear_refs`` after ``malloc_trim`` (Linux; elsewhere
``ru_maxrss``, which cannot be reset). torch's CPU allocations are invisible to tracemalloc, hence RSS;
the memory step runs after ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` so large tensors are mmapped and returned
on free, and RSS follows the live tensors (the timed steps run with the default allocator). ``solve`` is the
forward solve's peak (the sequential chain's forward with its graph), ``grad`` the gradient phase's
(attachment + backward + Adam), both above the RSS before the step.

Models (random weights): ``unet`` = the embedded default architecture (DDPMUNet ch 32, ch_mult (1, 2, 2),
1 res block, no attention, ~1.05 M parameters) with the "scaled" random init; ``score_unet`` = the
Gaussian-prior score sqrt(1 - a) x / (a s^2 + 1 - a) (s = 0.5) plus 0.1 x that UNet: a random UNet's
Jacobian is small and makes the adjoint look easy, the score term gives the chain a trained model's
Jacobian scale (the explicit sqrt(1 / a_0) N x_T term is then cancelled by the eps path).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/gradients.py --json bench_results/gradients.json
    python benchmarks/gradients.py --steps 25 --methods sequential ift --models unet --size 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("sequential", "ift", "phantom", "unroll")
MODELS = ("unet", "score_unet")


# ----------------------------------------------------------------------------------------------- one cell
def _rss_mb(field: str) -> float | None:
    try:
        found = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


def _reset_peak(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # hand freed heap memory back to the OS so that the high-water mark starts from live memory
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- current RSS
    except OSError:
        pass
    return _rss_mb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_model(name: str, size: int, device):
    from torch import nn

    from deqir.diffusion.schedule import NoiseSchedule
    from deqir.models import DDPMUNet, init_random_

    net = DDPMUNet(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], mid_attn=False,
                   resolution=size)
    init_random_(net, 0)
    net = net.to(device).eval().requires_grad_(False)
    if name == "unet":
        return net
    schedule = NoiseSchedule.create()

    class ScoreUNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, t):
            a = schedule.alpha_bar(t.cpu()).to(x).view(-1, 1, 1, 1)
            return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.1 * self.net(x, t)

    return ScoreUNet()


def run_cell(args: argparse.Namespace) -> dict:
    """Measure one (model, T, method) cell in this process."""
    import torch

    from deqir.deq.grad import DEQGradientConfig
    from deqir.deq.joint_map import ChainMap
    from deqir.deq.solvers import get_solver
    from deqir.diffusion.chain import make_chain
    from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
    from deqir.samplers.sequential import sample_sequential_with_grad

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _build_model(args.model, args.size, device)
    coeffs = make_chain(NoiseSchedule.create(), SamplingGrid.create(args.T), etw=0.1, nw=0.0)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 3, args.size, args.size, generator=g).to(device)
    target = (0.5 * torch.randn(1, 3, args.size, args.size, generator=g)).clamp(-1, 1).to(device)
    param = x_T.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=args.lr)
    cfg = {
        "ift": DEQGradientConfig(mode="ift", adjoint_tol=args.adjoint_tol),
        "phantom": DEQGradientConfig(mode="phantom", phantom_steps=1, tau=0.1),
        "unroll": DEQGradientConfig(mode="unroll", unroll_rounds=args.unroll_rounds),
    }.get(args.method)
    solve = get_solver(args.solver)
    state = {"prev": None}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(memory: bool = False) -> dict:
        """One optimisation step; with ``memory`` the peak of each phase (solve / gradient) is recorded."""
        info: dict = {}
        x_before = param.detach().clone()
        mem = {}
        base = _reset_peak(device) if memory else 0.0
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if args.method == "sequential":
            x0, _ = sample_sequential_with_grad(model, coeffs, param)  # forward with the full graph
            sync()
            t1 = time.perf_counter()
            if memory:
                mem["solve"] = _peak(device) - base
                base_g = _reset_peak(device)
            ((x0 - target) ** 2).sum().backward()
            rounds = 0
        else:
            fmap = ChainMap(model, coeffs, param, max_batch=args.max_batch or None, form="cumsum")
            z0 = state["prev"] if state["prev"] is not None else fmap.initial_state()
            z_star, stats = solve(fmap, z0, max_iter=args.max_iter, tol=args.tol)  # no graph
            sync()
            t1 = time.perf_counter()
            if memory:
                mem["solve"] = _peak(device) - base
                base_g = _reset_peak(device)
            states = cfg.attach(fmap, z_star, on_backward=info.update)
            ((states[:, -1] - target) ** 2).sum().backward()
            state["prev"] = states.detach()
            rounds = int(stats.rounds)
        grad = param.grad.detach().clone()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if memory:
            mem["grad"] = _peak(device) - base_g + (base_g - base)
        return {"time_s": t2 - t0, "solve_s": t1 - t0, "grad_s": t2 - t1, "rounds": rounds,
                "adjoint_rounds": info.get("adjoint_rounds", 0), "grad": grad, "x_before": x_before, "mem": mem}

    step()  # untimed: cold solve, allocator warm-up
    runs = [step() for _ in range(args.repeats)]
    last = runs[-1]
    # memory: one more step with glibc returning large blocks to the OS, so RSS follows the live tensors
    _mmap_large_blocks()
    m = step(memory=True)["mem"]
    out = {
        "model": args.model, "T": args.T, "method": args.method, "size": args.size, "device": str(device),
        "threads": args.threads, "solver": args.solver, "tol": args.tol, "max_iter": args.max_iter,
        "max_batch": args.max_batch,
        "time_s": statistics.median(r["time_s"] for r in runs),
        "solve_s": statistics.median(r["solve_s"] for r in runs),
        "grad_s": statistics.median(r["grad_s"] for r in runs),
        "solve_peak_mb": m["solve"], "grad_peak_mb": m["grad"], "peak_mb": max(m["solve"], m["grad"]),
        "rounds": last["rounds"], "adjoint_rounds": last["adjoint_rounds"],
    }
    k = {"ift": 1, "phantom": 1, "unroll": args.unroll_rounds}.get(args.method, 0)
    out["serial_calls"] = (2 * args.T if args.method == "sequential"
                           else last["rounds"] + k + last["adjoint_rounds"] + k)
    if args.cosine:
        out["grad_cosine"] = _cosine_vs_sequential(model, coeffs, last, target, args.method)
    return out


def _mmap_large_blocks() -> None:
    """glibc: serve blocks >= 64 KiB by mmap from now on (freed memory leaves RSS at once)."""
    if device_is_linux():
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def device_is_linux() -> bool:
    return sys.platform.startswith("linux")


def _cosine_vs_sequential(model, coeffs, last: dict, target, method: str) -> float:
    """Cosine between the last step's gradient and the exact one (backprop through the chain at that x_T)."""
    from deqir.samplers.sequential import sample_sequential_with_grad

    if method == "sequential":
        return 1.0
    x = last["x_before"].clone().requires_grad_(True)
    x0, _ = sample_sequential_with_grad(model, coeffs, x)
    ((x0 - target) ** 2).sum().backward()
    g, h = last["grad"].flatten().double(), x.grad.flatten().double()
    return float((g @ h) / (g.norm() * h.norm()))


# ------------------------------------------------------------------------------------------------- driver
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[25, 100], help="chain lengths T")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--models", nargs="+", default=["unet", "score_unet"], choices=MODELS)
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per cell")
    p.add_argument("--solver", default="anderson")
    p.add_argument("--max-iter", type=int, default=15)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--adjoint-tol", type=float, default=1e-4)
    p.add_argument("--unroll-rounds", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=25,
                   help="micro-batch of the DEQ model calls (bounds the no-grad transient; 0 = all T at once)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-cosine", dest="cosine", action="store_false", help="skip the exact-gradient check")
    p.add_argument("--skip", nargs="*", default=["score_unet:100"],
                   help="cells MODEL:T to leave out (default: score_unet at T=100, ~T adjoint rounds on a CPU)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="unet", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, default=25, help=argparse.SUPPRESS)
    p.add_argument("--method", default="sequential", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(args)))
        return 0
    common = ["--size", str(args.size), "--device", args.device, "--threads", str(args.threads), "--solver",
              args.solver, "--max-iter", str(args.max_iter), "--tol", str(args.tol), "--adjoint-tol",
              str(args.adjoint_tol), "--unroll-rounds", str(args.unroll_rounds), "--lr", str(args.lr),
              "--repeats", str(args.repeats)]
    if args.max_batch:
        common += ["--max-batch", str(args.max_batch)]
    if not args.cosine:
        common.append("--no-cosine")
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for model in args.models:
        for T in args.steps:
            for method in args.methods:
                if f"{model}:{T}" in args.skip:
                    rows.append({"model": model, "T": T, "method": method, "skipped": "--skip"})
                    continue
                cmd = [sys.executable, __file__, "--cell", "--model", model, "--T", str(T), "--method", method,
                       *common]
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    rows.append({"model": model, "T": T, "method": method, "error": proc.stderr.strip()[-500:]})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                rows[-1]["cell_wall_s"] = round(time.time() - t0, 1)
                print(_fmt(rows[-1]), flush=True)
    _table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"python": platform.python_version(), "machine": platform.machine(), "args": vars(args)}
        meta["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in meta["args"].items()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


def _fmt(r: dict) -> str:
    if "time_s" not in r:
        return f"{r['model']:>10} T={r['T']:<4} {r['method']:<10} {r.get('skipped') or r.get('error')}"
    cos = r.get("grad_cosine")
    return (f"{r['model']:>10} T={r['T']:<4} {r['method']:<10} {r['time_s']:8.2f} s  (solve {r['solve_s']:6.2f}, "
            f"grad {r['grad_s']:6.2f})  peak MB solve {r['solve_peak_mb']:7.1f} grad {r['grad_peak_mb']:7.1f}  "
            f"rounds {r['rounds']:3d}  "
            f"adjoint {r['adjoint_rounds']:3d}  serial {r['serial_calls']:4d}  "
            f"cos {'-' if cos is None else f'{cos:.4f}'}")


def _table(rows: list[dict]) -> None:
    print("\n| model | T | method | step s | solve s | grad s | time / seq | peak MB solve | peak MB grad | rounds | "
          "adjoint | serial calls | cos vs exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    seq = {(r["model"], r["T"]): r["time_s"] for r in rows if r.get("method") == "sequential" and "time_s" in r}
    for r in rows:
        if "time_s" not in r:
            print(f"| {r['model']} | {r['T']} | {r['method']} | {r.get('skipped') or 'error'} ||||||||||")
            continue
        ratio = r["time_s"] / seq[(r["model"], r["T"])] if (r["model"], r["T"]) in seq else float("nan")
        cos = r.get("grad_cosine")
        print(f"| {r['model']} | {r['T']} | {r['method']} | {r['time_s']:.2f} | {r['solve_s']:.2f} | "
              f"{r['grad_s']:.2f} | {ratio:.2f} | {r['solve_peak_mb']:.0f} | {r['grad_peak_mb']:.0f} | {r['rounds']} | "
              f"{r['adjoint_rounds']} | {r['serial_calls']} | {'-' if cos is None else f'{cos:.4f}'} |")


if __name__ == "__main__":
    raise SystemExit(main())
