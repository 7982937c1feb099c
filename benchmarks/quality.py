"""Restoration quality on the sample images: A^+ y baseline vs sequential chain vs DEQ sampler, per chain.

For each chain x task: PSNR / SSIM / LPIPS (on saved 8-bit images) of the baseline A^+ y, the sequential chain
and the DEQ sampler with the app's composed settings (``chain=<name>`` plus the task's presets), PSNR(DEQ,
sequential), the DEQ's rounds and work (model evaluations per image, VJPs counted as one more each).

    python benchmarks/quality.py --json bench_results/quality.json
    python benchmarks/quality.py --chains ddnm ddrm pigdm diffpir dps --size 64 --images 2 --tasks deblur sr4
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from benchmarks.deq_vs_sequential import load_model, psnr, sample_images  # noqa: E402
from deqir.chains import make_step  # noqa: E402
from deqir.samplers.deq import sample_deq  # noqa: E402
from deqir.diffusion.chain import make_chain  # noqa: E402
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid  # noqa: E402
from deqir.samplers.sequential import chain_start, draw_chain_noise, sample_sequential  # noqa: E402
from deqir.lit.builders import chain_settings  # noqa: E402
from deqir.metrics import MetricSuite  # noqa: E402
from deqir.operators import make_operator  # noqa: E402
from deqir.utils.images import to_unit  # noqa: E402
from deqir.utils.runtime import tune_allocator  # noqa: E402

TASKS = ["deblur", "sr4", "inpaint_text", "colorize", "sr_avgpool4", "deblur_aniso", "cs2", "denoise"]
CHAIN_TASKS = ["deblur", "sr4", "sr_avgpool4", "inpaint_random", "inpaint_text", "inpaint_box", "denoise", "colorize",
               "cs2"]


def app_config(task: str, overrides: list[str]) -> dict:
    """The invert.py config for ``task=<task>`` (task presets included), composed by Hydra, as plain values."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="invert", overrides=[f"task={task}", *overrides])
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain["solver"] = OmegaConf.to_container(cfg.solver, resolve=True)  # its tol may read task.quasi_newton_tol
    return plain


def task_operator(task: str, shape, overrides: list[str] | None = None):
    """(operator, sigma_y, the composed app config) for ``task`` (plus invert.py ``overrides``)."""
    cfg = app_config(task, list(overrides or []))
    op = make_operator(cfg["task"]["name"], shape, **(cfg["task"].get("params") or {}))
    return op, float(cfg["task"].get("sigma_y", 0.0)), cfg


def restore_with_chain(model, task: str, x: torch.Tensor, T: int, overrides: list[str], device,
                       samplers=("seq", "deq")) -> dict:
    """Restore the [-1, 1] batch x with invert.py's composed config for ``task`` (+ ``overrides``, e.g.
    ``chain=ddrm``): returns {"y", "op", "sigma_y", "settings", "seq", "deq", "deq_stats", "t_seq", "t_deq"}."""
    B = x.shape[0]
    op, sigma_y, cfg = task_operator(task, tuple(x.shape[1:]), [*overrides, f"sampler.timesteps={T}"])
    st = chain_settings(cfg["sampler"], cfg["solver"], cfg.get("chain"))
    if st.solver == "auto":  # the app's default: quasi_newton on all slots here (the schedule does not change quality)
        st = replace(st, solver="quasi_newton", form="step",
                     solver_options={k: v for k, v in st.solver_options.items() if k != "knee_factor"})
    op = op.to(device=device, dtype=torch.float32)
    y = torch.cat([op.measure(x[b : b + 1], sigma_y, torch.Generator().manual_seed(100 + b)) for b in range(B)])
    gain = op.pinv_noise_gain() if sigma_y > 0 else 1.0
    sampler = cfg["sampler"]
    sched = NoiseSchedule.create()
    grid = SamplingGrid.create(T, skip_type=sampler["skip_type"], t_start=sampler.get("t_start"), rho=sampler["rho"],
                               schedule=sched)  # the task's step placement and start (docs/solvers.md "Grids")
    coeffs = make_chain(sched, grid, etw=sampler["etw"], nw=sampler["nw"],
                        sigma_y_eff=2 * sigma_y * gain, noise_aware=sampler["noise_aware"])
    gens = [torch.Generator().manual_seed(b) for b in range(B)]
    x_T, z = draw_chain_noise(x.shape, T, gens, per_step_noise=st.per_step_noise, device=device)
    x_T = chain_start(coeffs, x_T, operator=op, y=y)
    step = None
    if st.chain != "ddnm":
        step = make_step(st.chain, coeffs, operator=op, y=y, z=z, sigma_y=sigma_y,
                         **{"clip_x0": st.clip_x0, **st.chain_params})
    out = {"y": y, "op": op, "sigma_y": sigma_y, "settings": st, "sampler": sampler,
           "vjp": bool(step is not None and step.needs_vjp)}
    if "seq" in samplers:
        t0 = time.perf_counter()
        out["seq"], _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z, clip_x0=st.clip_x0, step_fn=step)
        out["t_seq"] = time.perf_counter() - t0
    if "deq" in samplers:
        t0 = time.perf_counter()
        res = sample_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver=st.solver, max_iter=st.max_iter,
                         tol=st.tol, stop_mode=st.stop_mode, options=st.solver_options, init=st.init,
                         coarse_steps=st.coarse_steps, form=st.form, clip_x0=st.clip_x0, step_fn=step)
        out["t_deq"] = time.perf_counter() - t0
        out["deq"], out["deq_stats"], out["deq_nfe"] = res.x0, res.stats, res.nfe
    return out


def run(args) -> list[dict]:
    device = torch.device(args.device)
    model, note = load_model(device, "float32")
    cli = [f"sampler.{k}={v}" for k, v in vars(args).items() if k in ("etw", "nw") and v is not None]
    cli += list(args.override or [])
    x = sample_images(args.size, args.images).to(device)
    B, T = x.shape[0], args.T
    suite = MetricSuite(lpips_net=args.lpips, device=device)
    rows = []
    for chain in args.chains or [None]:
        for task in args.tasks:
            # composed as the app does: defaults, the task's presets, then the overrides
            over = [*cli, *([f"chain={chain}"] if chain else [])]
            try:
                r = restore_with_chain(model, task, x, T, over, device, samplers=args.samplers)
            except ValueError as err:  # e.g. DDRM on an operator without an SVD
                print(f"skip {chain} / {task}: {err}", flush=True)
                continue
            st, op, y = r["settings"], r["op"], r["y"]
            target = to_unit(x)
            row = {"chain": st.chain, "task": task, "sigma_y": r["sigma_y"], "etw": r["sampler"]["etw"],
                   "clip_x0": bool(st.chain_params.get("clip_x0", st.clip_x0)), "solver": st.solver}
            for label, img in (("base", op.A_pinv(y)), ("seq", r.get("seq")), ("deq", r.get("deq"))):
                if img is None:
                    continue
                m = suite.compute(to_unit(img), target)
                for k, v in m.items():
                    row[f"{k}_{label}"] = float(v.mean())
                row[f"consistency_{label}"] = float((op.A(img) - y).flatten(1).norm(dim=1).mean() / 2)
            per_eval = 2 if r["vjp"] else 1
            row.update(work_seq=per_eval * T)
            if "seq" in r:
                row.update(s_per_img_seq=r["t_seq"] / B)
            if "deq" in r:
                row.update(rounds=r["deq_stats"].rounds, work_deq=per_eval * r["deq_nfe"] / B,
                           s_per_img_deq=r["t_deq"] / B)
            if "seq" in r and "deq" in r:
                row.update(psnr_deq_seq=psnr(r["deq"], r["seq"]))
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows, note


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=None,
                    help=f"default: {' '.join(TASKS)}; with --chains: {' '.join(CHAIN_TASKS)}")
    ap.add_argument("--chains", nargs="+", default=None, help="chain axis (chain/ options); default: the app's chain")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--T", type=int, default=25)
    ap.add_argument("--samplers", nargs="+", choices=("seq", "deq"), default=["seq", "deq"],
                    help="which samplers to run (seq alone: a chain x task grid at large T without the DEQ)")
    ap.add_argument("--etw", type=float, default=None, help="override conf/sampler/deq.yaml")
    ap.add_argument("--nw", type=float, default=None, help="override conf/sampler/deq.yaml")
    ap.add_argument("--override", nargs="*", default=None, metavar="KEY=VALUE",
                    help="invert.py overrides, e.g. sampler.form=cumsum sampler.etw=0.1 solver=anderson_official")
    ap.add_argument("--lpips", default="vgg")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.tasks is None:
        args.tasks = CHAIN_TASKS if args.chains else TASKS
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    rows, note = run(args)
    print(f"\nmodel: {note}; {args.images} sample images at {args.size}^2, T={args.T}; chain and solver: "
          f"invert.py's composed config (sampler/deq, solver/auto as quasi_newton on all slots, the task's presets) "
          f"(overrides: etw={args.etw}, nw={args.nw}, {' '.join(args.override or [])})")
    cols = [("chain", "chain", ""), ("task", "task", ""), ("etw", "η", ".1f"), ("solver", "solver", "")]
    for k, h in (("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS")):
        for lab in ("base", "seq", "deq"):
            cols.append((f"{k}_{lab}", f"{h} {'A⁺y' if lab == 'base' else lab}", ".3f" if k != "psnr" else ".2f"))
    cols += [("psnr_deq_seq", "DEQ↔seq dB", ".1f"), ("rounds", "rounds", ""), ("work_deq", "work DEQ", ".0f"),
             ("consistency_deq", "‖Ax−y‖ DEQ", ".3f"), ("s_per_img_deq", "s/img DEQ", ".1f"),
             ("s_per_img_seq", "s/img seq", ".1f")]
    table = print_table(rows, cols)
    write_json(args.json, {"benchmark": "quality", "model": note, "machine": machine_info(torch.device(args.device)),
                           "args": vars(args), "table": table, "rows": rows})


if __name__ == "__main__":
    main()
