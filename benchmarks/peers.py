"""deqir's chains (sequential and DEQ) against deepinv 0.5's DDRM, DiffPIR and DPS (optional extra ``peers``).

Same eps-model (our default, behind deepinv's sigma-denoiser interface: deqir.chains.peers.EpsDenoiser), same y,
same operator (ours, wrapped as a deepinv DecomposablePhysics through its SVD). Per method: PSNR, SSIM, LPIPS,
|Ax - y| (on [0, 1]), model evaluations per image (VJPs count as one more each) and seconds per image. Also the
DDRM agreement check: deepinv's DDRM on our T-step grid vs ours, mean PSNR over seeds (docs/chains.md).

    pip install -e '.[peers]'
    python benchmarks/peers.py --size 64 --images 2 --T 25 --json bench_results/peers.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, print_table, write_json
from benchmarks.deq_vs_sequential import load_model, psnr, sample_images
from benchmarks.quality import restore_with_chain
from deqir.chains import make_step
from deqir.chains.peers import EpsDenoiser, coefficients_on
from deqir.diffusion.schedule import SamplingGrid
from deqir.samplers.sequential import sample_sequential
from deqir.metrics import MetricSuite
from deqir.operators.base import SVDOperator, _pad_spectral
from deqir.utils.images import to_unit

TASKS = ["deblur", "sr_avgpool4", "inpaint_random"]
CHAINS = ["ddnm", "ddrm", "pigdm", "diffpir", "dps"]


def physics_of(op: SVDOperator, sigma: float):
    """Our SVD operator as a deepinv DecomposablePhysics on [0, 1] images (A = U diag(s) V^T is linear)."""
    import deepinv as dinv

    D, m = op.numel_image, op.singulars().numel()
    shape = op.image_shape
    mask = _pad_spectral(op.singulars().float()[None], D)
    return dinv.physics.DecomposablePhysics(
        V_adjoint=lambda x: op.V_T(x), V=lambda s: op.V(s), U=lambda s: op.U(s[:, :m]),
        U_adjoint=lambda y: _pad_spectral(op.U_T(y), D), mask=mask, img_size=shape,
        noise_model=dinv.physics.GaussianNoise(sigma=sigma))


def run_deepinv(name: str, model, op, y01: torch.Tensor, sigma_y: float, steps: int, seed: int,
                own_grid: bool = False):
    """One image (1, C, H, W) with deepinv's ``name``; returns (x on [-1, 1], model evaluations incl. VJPs).

    ``own_grid``: DDRM on deepinv's own default grid (sigma linear from 1 to 0 on [0, 1] images, 100 steps, started
    from y) instead of our ``steps``-step uniform grid."""
    import deepinv as dinv

    den = EpsDenoiser(model)
    if name == "DDRM" and own_grid:
        algo = dinv.sampling.DDRM(den, eta=0.85, etab=1.0)
        x = algo(y01.clone(), physics_of(op, sigma_y), seed=seed + 1)
        return 2 * x - 1, len(algo.sigmas)
    if name == "DDRM":
        grid = SamplingGrid.create(steps)
        co = coefficients_on(list(grid.t), list(grid.t_next))
        sigmas = (torch.sqrt((1 - co.a) / co.a) / 2).tolist() + [0.0]  # lands on our t_j (docs/chains.md)
        algo = dinv.sampling.DDRM(den, sigmas=torch.tensor(sigmas), eta=0.85, etab=1.0)
        x = algo(y01.clone(), physics_of(op, sigma_y), seed=seed + 1)  # seed 0 would be ignored
        return 2 * x - 1, len(sigmas)
    if name == "DiffPIR":  # deepinv defaults (zeta 0.1, lambda 7 = official 14); noise floor as the official code
        algo = dinv.sampling.DiffPIR(den, dinv.optim.data_fidelity.L2(), sigma=max(sigma_y, 1e-3), max_iter=steps)
        x = algo(y01.clone(), physics_of(op, max(sigma_y, 1e-3)), seed=seed + 1)
        return 2 * x - 1, steps
    if name == "DPS":
        algo = dinv.sampling.DPS(den, num_steps=steps, rng=torch.Generator().manual_seed(seed + 1),
                                 dtype=torch.float32)
        x = algo(y01.clone(), physics_of(op, sigma_y), x_init=(1, *op.image_shape))
        return 2 * x - 1, 2 * (steps - 1)
    raise ValueError(f"unknown deepinv method {name!r}; valid: DDRM, DiffPIR, DPS")


def ddrm_agreement(model, op, x, y, sigma_y, T, seeds, clip: bool = True) -> dict:
    """Mean PSNR of our DDRM and deepinv's DDRM on the same T-step grid over ``seeds`` (same y); also ours with
    deepinv's fresh noise scaled by 1/sqrt(2) as deepinv does (docs/chains.md), the quirk that moves its PSNR."""
    grid = SamplingGrid.create(T)
    co = coefficients_on(list(grid.t), list(grid.t_next))
    ours, ours_half, theirs = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(1000 + s)
        x_T = torch.randn(x.shape, generator=g)
        z = torch.randn((x.shape[0], T, *x.shape[1:]), generator=g)
        # clip_x0: deepinv clamps every denoiser output (the official DDRM does not)
        step = make_step("ddrm", co, operator=op, y=y, z=z, sigma_y=sigma_y, eta=0.85, eta_b=1.0, clip_x0=clip)
        ours.append(psnr(sample_sequential(model, co, x_T, step_fn=step)[0], x))
        half = make_step("ddrm", co, operator=op, y=y, z=z / 2**0.5, sigma_y=sigma_y, eta=0.85, eta_b=1.0,
                         clip_x0=clip)
        ours_half.append(psnr(sample_sequential(model, co, x_T, step_fn=half)[0], x))
        y01 = (y + op.A(torch.ones_like(x))) / 2
        theirs.append(psnr(torch.cat([run_deepinv("DDRM", model, op, y01[b : b + 1], sigma_y, T, 97 * s + b)[0]
                                      for b in range(x.shape[0])]), x))
    return {"psnr_ours": sum(ours) / len(ours), "psnr_deepinv": sum(theirs) / len(theirs),
            "psnr_ours_noise_over_sqrt2": sum(ours_half) / len(ours_half)}


def run(args):
    device = torch.device("cpu")
    model, note = load_model(device, "float32")
    x = sample_images(args.size, args.images)
    B, T = x.shape[0], args.T
    suite = MetricSuite(lpips_net=args.lpips, device=device)
    target = to_unit(x)
    rows, agreement = [], {}

    def score(row, img, y, op):
        for k, v in suite.compute(to_unit(img), target).items():
            row[k] = float(v.mean())
        row["consistency"] = float((op.A(img) - y).flatten(1).norm(dim=1).mean() / 2)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    for task in args.tasks:
        base = restore_with_chain(model, task, x, T, list(args.override or []), device, samplers=())
        y, op, sigma_y = base["y"], base["op"], base["sigma_y"]
        for chain in args.chains:
            try:
                r = restore_with_chain(model, task, x, T, [*(args.override or []), f"chain={chain}"], device,
                                       samplers=args.samplers)
            except ValueError as err:
                print(f"skip {chain} / {task}: {err}", flush=True)
                continue
            k = 2 if r["vjp"] else 1
            if "seq" in r:
                score({"task": task, "method": f"deqir {chain} seq", "nfe": k * T, "s_per_img": r["t_seq"] / B},
                      r["seq"], y, op)
            if "deq" in r:
                score({"task": task, "method": f"deqir {chain} DEQ", "nfe": k * r["deq_nfe"] / B,
                       "s_per_img": r["t_deq"] / B}, r["deq"], y, op)
        if not isinstance(op, SVDOperator):
            continue
        y01 = (y + op.A(torch.ones_like(x))) / 2
        for name in args.peers:
            t0, outs, nfe = time.perf_counter(), [], 0
            for b in range(B):
                xb, nfe = run_deepinv(name, model, op, y01[b : b + 1], sigma_y, args.peer_steps, seed=b)
                outs.append(xb.float())
            score({"task": task, "method": f"deepinv {name} ({args.peer_steps})", "nfe": nfe,
                   "s_per_img": (time.perf_counter() - t0) / B}, torch.cat(outs), y, op)
        if args.ddrm_seeds:
            agreement[task] = ddrm_agreement(model, op, x, y, sigma_y, T, range(args.ddrm_seeds))
            print(task, "DDRM agreement", agreement[task], flush=True)
    return rows, agreement, note


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--chains", nargs="*", default=CHAINS)
    ap.add_argument("--samplers", nargs="+", choices=("seq", "deq"), default=["seq", "deq"],
                    help="deqir's samplers (seq alone: T model evaluations, the equal-evaluation comparison)")
    ap.add_argument("--peers", nargs="*", default=["DDRM", "DiffPIR", "DPS"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--T", type=int, default=25)
    ap.add_argument("--peer-steps", type=int, default=100, help="deepinv's steps (its DDRM/DiffPIR default 100)")
    ap.add_argument("--ddrm-seeds", type=int, default=3, help="seeds of the DDRM agreement check (0: skip)")
    ap.add_argument("--override", nargs="*", default=None, metavar="KEY=VALUE",
                    help="invert.py overrides for deqir's chains, e.g. solver=anderson sampler.timesteps=50")
    ap.add_argument("--lpips", default="vgg")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, agreement, note = run(args)
    print(f"\nmodel: {note}; {args.images} sample images at {args.size}^2; deqir T={args.T}, deepinv "
          f"{args.peer_steps} steps")
    cols = [("task", "task", ""), ("method", "method", ""), ("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".3f"),
            ("lpips", "LPIPS", ".3f"), ("consistency", "‖Ax−y‖", ".3f"), ("nfe", "NFE", ".0f"),
            ("s_per_img", "s/img", ".1f")]
    table = print_table(rows, cols)
    for task, a in agreement.items():
        print(f"DDRM agreement {task}: deqir {a['psnr_ours']:.2f} dB (noise / sqrt 2: "
              f"{a['psnr_ours_noise_over_sqrt2']:.2f}) vs deepinv {a['psnr_deepinv']:.2f} dB "
              f"(T={args.T}, {args.ddrm_seeds} seeds)")
    write_json(args.json, {"benchmark": "peers", "model": note, "machine": machine_info(torch.device("cpu")),
                           "args": vars(args), "table": table, "rows": rows, "ddrm_agreement": agreement})


if __name__ == "__main__":
    main()
