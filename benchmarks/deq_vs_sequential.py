"""DEQ (parallel) sampling vs the sequential chain: rounds, agreement, work, wall-clock, memory.

For each T, chain (the app's default: step form, etw = nw = 1, fresh noise per step; the paper's: cumsum form,
etw 0.1, nw 0), task and solver, on a sample image:
  * rounds_45: rounds until PSNR(x_deq, x_seq) >= 45 dB (from a run with tol 0 and a round cap);
  * psnr_seq / rounds / work: at the solver's stop rule (tol 1e-3 relative, paper defaults):
    PSNR to the sequential result, rounds, model image-evaluations / (B T) (work ratio vs sequential);
  * time_ratio: wall-clock DEQ / sequential in the same process; peak_mb: peak memory of the DEQ solve.

    python benchmarks/deq_vs_sequential.py --json bench_results/deq_vs_seq.json
    python benchmarks/deq_vs_sequential.py --quick     # T=25 only, one image
Uses the embedded default model when its weights are installed, else a random small UNet (said so).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, peak_memory, print_table, sync, write_json  # noqa: E402
from deqir.datasets.photos import load_rgb  # noqa: E402
from deqir.deq.sampler import sample_deq  # noqa: E402
from deqir.diffusion.chain import make_chain  # noqa: E402
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid  # noqa: E402
from deqir.diffusion.sequential import draw_chain_noise, sample_sequential  # noqa: E402
from deqir.models.loading import load_eps_model, packaged_default_path  # noqa: E402
from deqir.operators import make_operator  # noqa: E402
from deqir.utils.runtime import tune_allocator  # noqa: E402

TASKS = {
    "deblur": ("deblur_gauss", {}),
    "sr4": ("sr_bicubic", {"scale": 4}),
    "inpaint": ("inpaint", {"mask_type": "text"}),
}
SOLVERS = {
    "anderson": ({}, 30),  # the app's default: official constants, stops at tol
    "anderson_official": ({"mixing": "slot", "return_value": "x", "select": "last"}, 15),
    "picard": ({}, None),  # None: T rounds (exact)
    "sliding_window": ({"window": 8}, None),
}
#: chain -> (map form, etw, nw, per-step noise): the app's default (stochastic, step form) and the paper's
CHAINS = {
    "default": ("step", 1.0, 1.0, True),
    "paper": ("cumsum", 0.1, 0.0, False),
}


def load_model(device, dtype):
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/default.yaml"), resolve=True)
    if packaged_default_path().is_file():
        return load_eps_model(**{**cfg, "dtype": dtype, "device": str(device)}), "default (trained)"
    cfg["ckpt_path"] = "random"
    return load_eps_model(**{**cfg, "dtype": dtype, "device": str(device)}), "default architecture, RANDOM weights"


def sample_images(size: int, n: int) -> torch.Tensor:
    from PIL import Image

    imgs = []
    for p in sorted((ROOT / "data/samples").glob("*.png"))[:n]:
        im = Image.fromarray(load_rgb(p)).resize((size, size), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(imgs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two [-1, 1] batches, on [0, 1], mean over images."""
    mse = (((a - b) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-20)
    return float((10 * torch.log10(1 / mse)).mean())


def run(args) -> dict:
    device = torch.device(args.device)
    model, model_note = load_model(device, args.dtype)
    sched = NoiseSchedule.create()
    x = sample_images(args.size, args.images).to(device)
    B = x.shape[0]
    rows = []
    for T, chain in [(T, c) for T in args.T for c in args.chains]:
        form, etw, nw, per_step = CHAINS[chain]
        coeffs = make_chain(sched, SamplingGrid.create(T), etw=etw, nw=nw)
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        x_T, z = draw_chain_noise(x.shape, T, gens, per_step_noise=per_step, device=device)
        for task in args.tasks:
            name, params = TASKS[task]
            op = make_operator(name, tuple(x.shape[1:]), **params).to(device=device, dtype=torch.float32)
            y = op.A(x)
            sync(device)
            t0 = time.perf_counter()
            x_seq, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z)
            sync(device)
            t_seq = time.perf_counter() - t0
            variants = [(s, w) for s in args.solvers for w in (args.windows if s == "sliding_window" else [None])]
            for solver, window in variants:
                opts, max_iter = SOLVERS[solver]
                max_iter = T if max_iter is None else max_iter
                if window is not None:
                    opts = {**opts, "window": window}
                label = solver if window in (None, 8) else f"sliding_window(w={window})"
                # 1) the stop rule, timed
                sync(device)
                with peak_memory(device) as mem:
                    t0 = time.perf_counter()
                    res = sample_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver=solver.replace("_official", ""),
                                     options=opts, max_iter=max_iter, tol=args.tol, max_batch=args.max_batch,
                                     form=form)
                    sync(device)
                    t_deq = time.perf_counter() - t0
                # 2) quality per round, no early stop
                curve: list[float] = []
                cap = min(args.round_cap, max_iter)
                sample_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver=solver.replace("_official", ""),
                           options=opts, max_iter=cap, tol=0.0, max_batch=args.max_batch, form=form,
                           callback=lambda info: curve.append(psnr(info["last_slot"], x_seq)))
                r45 = next((i + 1 for i, p in enumerate(curve) if p >= 45.0), None)
                row = dict(T=T, chain=chain, task=task, solver=label, rounds_45=r45, psnr_seq=psnr(res.x0, x_seq),
                           rounds=res.stats.rounds, work=res.nfe / (B * T), time_ratio=t_deq / t_seq,
                           t_deq=t_deq, t_seq=t_seq, peak_mb=mem.get("peak_mb"), status=res.stats.status,
                           curve=curve)
                rows.append(row)
                print(f"T={T} {chain} {task} {label}: rounds_45={r45} psnr_seq={row['psnr_seq']:.1f} "
                      f"rounds={row['rounds']} work={row['work']:.2f} time x{row['time_ratio']:.2f}", flush=True)
    return {"model": model_note, "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    ap.add_argument("--windows", type=int, nargs="+", default=[8], help="sliding_window sizes (slots per round)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--chains", nargs="+", default=list(CHAINS), choices=list(CHAINS))
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--round-cap", type=int, default=30, help="rounds of the no-early-stop quality run")
    ap.add_argument("--max-batch", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="T=25, one image")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.T, args.images = [25], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    out = run(args)
    print(f"\nmodel: {out['model']}; {args.images} image(s) at {args.size}^2, tol={args.tol}; chains: "
          + "; ".join(f"{k} = form {v[0]}, etw {v[1]}, nw {v[2]}, per-step noise {v[3]}" for k, v in CHAINS.items()))
    table = print_table(out["rows"], [
        ("T", "T", ""), ("chain", "chain", ""), ("task", "task", ""), ("solver", "solver", ""), ("rounds_45", "rounds to 45 dB", ""),
        ("psnr_seq", "PSNR to seq (dB)", ".1f"), ("rounds", "rounds", ""), ("work", "work ratio", ".2f"),
        ("time_ratio", "wall DEQ/seq", ".2f"), ("peak_mb", "peak MB", ".0f")])
    write_json(args.json, {"benchmark": "deq_vs_sequential", "machine": machine_info(torch.device(args.device)),
                           "args": vars(args), "table": table, **out})


if __name__ == "__main__":
    main()
