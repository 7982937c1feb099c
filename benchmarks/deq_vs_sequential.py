"""DEQ (parallel) sampling vs the sequential chain: rounds, agreement, work, wall-clock, memory.

For each T, chain (the app's default: step form, etw = nw = 1, fresh noise per step; the paper's: cumsum form,
etw 0.1, nw 0), task and solver setting, on sample images:
  * rounds_45: rounds until PSNR(x_deq, x_seq) >= 45 dB (from a run with tol 0 and a round cap);
  * rounds_8bit: rounds until the 8-bit outputs differ by at most one level anywhere (a one-level flip is
    float round-off at a quantisation boundary);
  * psnr_seq / rounds / work: at the setting's own stop rule: PSNR to the sequential result, rounds (serial
    depth = latency on parallel hardware), model image-evaluations / (B T) (work ratio vs sequential, the CPU cost);
  * time_ratio: wall-clock DEQ / sequential in the same process; peak_mb: peak memory of the DEQ solve.
A Pareto table (rounds against work) per T and task closes the output.

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

from benchmarks.common import machine_info, peak_memory, print_table, sync, write_json
from deqir.datasets.images import read_image_uint8
from deqir.samplers.deq import sample_deq
from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.samplers.sequential import draw_chain_noise, sample_sequential
from deqir.metrics.fidelity import psnr as _psnr
from deqir.models.loading import load_eps_model, packaged_default_path
from deqir.operators import make_operator
from deqir.utils.runtime import tune_allocator

TASKS = {  # name -> (operator, params, sigma_y on [0, 1])
    "deblur": ("deblur_gauss", {}, 0.0),
    "sr4": ("sr_bicubic", {"scale": 4}, 0.0),
    "inpaint": ("inpaint", {"mask_type": "text"}, 0.0),
    "denoise": ("denoise", {}, 0.1),
}
#: setting -> (solver, options, max_iter (None: T), init, tol, stop_mode)
QN = "quasi_newton"
SOLVERS = {
    "anderson": ("anderson", {}, 30, "x_T", 1e-3, "rel"),  # the previous default: official constants
    "anderson_official": ("anderson", {"mixing": "slot", "return_value": "x", "select": "last"}, 15, "x_T", 1e-3,
                          "rel"),
    "anderson+surrogate": ("anderson", {}, 30, "surrogate", 1e-3, "rel"),
    "picard": ("picard", {}, None, "x_T", 1e-3, "rel"),  # T rounds at most (exact)
    "sliding_window": ("sliding_window", {"window": 8}, None, "x_T", 1e-3, "rel"),
    # quasi_newton (the default's solver): Gaussian-prior linearisation + 2 secant pairs per slot
    "quasi_newton": (QN, {}, None, "surrogate", 0.02, "noise"),
    "quasi_newton(tol=0.05)": (QN, {}, None, "surrogate", 0.05, "noise"),
    "quasi_newton(no secant)": (QN, {"history_size": 0}, None, "surrogate", 0.02, "noise"),
    "quasi_newton(init x_T)": (QN, {}, None, "x_T", 0.02, "noise"),
    "quasi_newton(init extrapolate)": (QN, {}, None, "extrapolate", 0.02, "noise"),
    "quasi_newton(w=6,tol=0.05)": (QN, {"window": 6}, None, "surrogate", 0.05, "noise"),
    "quasi_newton(w=4)": (QN, {"window": 4}, None, "surrogate", 0.05, "noise"),
    "quasi_newton(w=8)": (QN, {"window": 8}, None, "surrogate", 0.05, "noise"),
    "quasi_newton(w=6,tol=0.1)": (QN, {"window": 6}, None, "surrogate", 0.1, "noise"),
    "quasi_newton(w=8,tol=0.2)": (QN, {"window": 8}, None, "surrogate", 0.2, "noise"),
    "quasi_newton(w=16)": (QN, {"window": 16}, None, "surrogate", 0.05, "noise"),
    "quasi_newton(w=16,tol=0.2)": (QN, {"window": 16}, None, "surrogate", 0.2, "noise"),
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
        im = Image.fromarray(read_image_uint8(p)).resize((size, size), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(imgs)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two [-1, 1] batches, on [0, 1], mean over images (deqir.metrics.fidelity.psnr)."""
    return float(_psnr((a + 1) / 2, (b + 1) / 2).clamp_max(200).mean())


def levels_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest difference in 8-bit levels between two [-1, 1] batches after saving them as 8-bit images."""
    q = lambda v: torch.round((v.clamp(-1, 1) + 1) * 127.5)
    return int((q(a) - q(b)).abs().max())


def run(args) -> dict:
    device = torch.device(args.device)
    model, model_note = load_model(device, args.dtype)
    sched = NoiseSchedule.create()
    x = sample_images(args.size, args.images).to(device)
    B = x.shape[0]
    rows = []
    for T, chain in [(T, c) for T in args.T for c in args.chains]:
        form, etw, nw, per_step = CHAINS[chain]
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        x_T, z = draw_chain_noise(x.shape, T, gens, per_step_noise=per_step, device=device)
        for task in args.tasks:
            name, params, sigma_y = TASKS[task]
            op = make_operator(name, tuple(x.shape[1:]), **params).to(device=device, dtype=torch.float32)
            y = torch.cat([op.measure(x[k : k + 1], sigma_y, torch.Generator().manual_seed(100 + k)) for k in range(B)])
            gain = op.pinv_noise_gain() if sigma_y > 0 else 1.0
            coeffs = make_chain(sched, SamplingGrid.create(T), etw=etw, nw=nw, sigma_y_eff=2 * sigma_y * gain)
            sync(device)
            t0 = time.perf_counter()
            x_seq, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z)
            sync(device)
            t_seq = time.perf_counter() - t0
            variants = [(s, w) for s in args.solvers for w in (args.windows if s == "sliding_window" else [None])]
            for label, window in variants:
                solver, opts, max_iter, init, tol, stop_mode = SOLVERS[label]
                if solver == QN and form != "step":
                    continue  # quasi_newton solves the step form only
                max_iter = T if max_iter is None else max_iter
                if window is not None:
                    opts = {**opts, "window": window}
                    label = f"sliding_window(w={window})" if window != 8 else label
                kw = dict(operator=op, y=y, z=z, solver=solver, options=opts, max_batch=args.max_batch, form=form,
                          init=init, stop_mode=stop_mode)
                # 1) the stop rule, timed
                sync(device)
                with peak_memory(device) as mem:
                    t0 = time.perf_counter()
                    res = sample_deq(model, coeffs, x_T, max_iter=max_iter, tol=tol, **kw)
                    sync(device)
                    t_deq = time.perf_counter() - t0
                # 2) quality per round, no early stop
                curve: list[float] = []
                levels: list[int] = []

                def record(info):
                    curve.append(psnr(info["last_slot"], x_seq))
                    levels.append(levels_apart(info["last_slot"], x_seq))

                # (quasi_newton keeps its slot tolerances, which move its window, and only drops the output stop)
                sample_deq(model, coeffs, x_T, max_iter=min(args.round_cap, max_iter), callback=record,
                           **({**kw, "tol": tol, "options": {**opts, "output_tol": 0.0, "error_tol": 0.0}} if solver == QN
                              else {**kw, "tol": 0.0}))
                r45 = next((i + 1 for i, p in enumerate(curve) if p >= 45.0), None)
                r8 = next((i + 1 for i, lv in enumerate(levels) if lv <= 1), None)
                row = dict(T=T, chain=chain, task=task, solver=label, rounds_45=r45, rounds_8bit=r8,
                           psnr_seq=psnr(res.x0, x_seq), levels_seq=levels_apart(res.x0, x_seq),
                           rounds=res.stats.rounds, work=res.nfe / (B * T), time_ratio=t_deq / t_seq,
                           t_deq=t_deq, t_seq=t_seq, peak_mb=mem.get("peak_mb"), status=res.stats.status,
                           init=init, curve=curve)
                rows.append(row)
                print(f"T={T} {chain} {task} {label}: rounds_45={r45} rounds_8bit={r8} psnr_seq={row['psnr_seq']:.1f} "
                      f"rounds={row['rounds']} work={row['work']:.2f} time x{row['time_ratio']:.2f}", flush=True)
    return {"model": model_note, "rows": rows}


def pareto(rows: list[dict]) -> list[dict]:
    """Per (T, chain, task): the settings no other setting beats in both rounds and work (at >= 45 dB)."""
    out = []
    for key in sorted({(r["T"], r["chain"], r["task"]) for r in rows}, key=str):
        group = [r for r in rows if (r["T"], r["chain"], r["task"]) == key and r["psnr_seq"] >= 45]
        for r in sorted(group, key=lambda r: (r["rounds"], r["work"])):
            if not any(o is not r and o["rounds"] <= r["rounds"] and o["work"] <= r["work"]
                       and (o["rounds"], o["work"]) != (r["rounds"], r["work"]) for o in group):
                out.append(r)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    ap.add_argument("--windows", type=int, nargs="+", default=[8], help="sliding_window sizes (slots per round)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--chains", nargs="+", default=["default"], choices=list(CHAINS))
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
    print(f"\nmodel: {out['model']}; {args.images} image(s) at {args.size}^2; chains: "
          + "; ".join(f"{k} = form {v[0]}, etw {v[1]}, nw {v[2]}, per-step noise {v[3]}" for k, v in CHAINS.items()))
    table = print_table(out["rows"], [
        ("T", "T", ""), ("chain", "chain", ""), ("task", "task", ""), ("solver", "solver", ""), ("rounds_45", "rounds to 45 dB", ""),
        ("rounds_8bit", "rounds to 8-bit", ""), ("psnr_seq", "PSNR to seq (dB)", ".1f"), ("rounds", "rounds", ""), ("work", "work ratio", ".2f"),
        ("time_ratio", "wall DEQ/seq", ".2f"), ("peak_mb", "peak MB", ".0f")])
    print("\nPareto front (rounds vs work, settings at >= 45 dB from the sequential chain at their stop rule):")
    front = print_table(pareto(out["rows"]), [
        ("T", "T", ""), ("task", "task", ""), ("solver", "setting", ""), ("rounds", "rounds", ""),
        ("work", "work", ".2f"), ("psnr_seq", "PSNR to seq", ".1f"), ("rounds_45", "rounds to 45 dB", ""),
        ("rounds_8bit", "rounds to 8-bit", ""), ("time_ratio", "wall DEQ/seq", ".2f")])
    write_json(args.json, {"benchmark": "deq_vs_sequential", "machine": machine_info(torch.device(args.device)),
                           "args": vars(args), "table": table, "pareto": front, **out})


if __name__ == "__main__":
    main()
