"""Restoration quality on the sample images: A^+ y baseline vs sequential chain vs DEQ sampler.

For each task: PSNR / SSIM / LPIPS (on saved 8-bit images) of the baseline A^+ y, the sequential chain and
the DEQ sampler with the app's default settings, plus PSNR(DEQ, sequential) and the DEQ's rounds.

    python benchmarks/quality.py --json bench_results/quality.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from benchmarks.deq_vs_sequential import load_model, psnr, sample_images  # noqa: E402
from deqir.deq.sampler import sample_deq  # noqa: E402
from deqir.diffusion.chain import make_chain  # noqa: E402
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid  # noqa: E402
from deqir.diffusion.sequential import draw_chain_noise, sample_sequential  # noqa: E402
from deqir.lit.builders import chain_settings  # noqa: E402
from deqir.metrics import MetricSuite  # noqa: E402
from deqir.operators import make_operator  # noqa: E402
from deqir.utils.images import to_unit  # noqa: E402
from deqir.utils.runtime import tune_allocator  # noqa: E402

TASKS = ["deblur", "sr4", "inpaint_text", "colorize", "sr_avgpool4", "deblur_aniso", "cs2", "denoise"]


def app_config(task: str, overrides: list[str]) -> dict:
    """The invert.py config for ``task=<task>`` (task presets included), composed by Hydra, as plain values."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="invert", overrides=[f"task={task}", *overrides])
    return OmegaConf.to_container(cfg, resolve=False)


def task_operator(task: str, shape, overrides: list[str] | None = None):
    """(operator, sigma_y, the composed app config) for ``task`` (plus invert.py ``overrides``)."""
    cfg = app_config(task, list(overrides or []))
    op = make_operator(cfg["task"]["name"], shape, **(cfg["task"].get("params") or {}))
    return op, float(cfg["task"].get("sigma_y", 0.0)), cfg


def run(args) -> list[dict]:
    device = torch.device(args.device)
    model, note = load_model(device, "float32")
    cli = [f"sampler.{k}={v}" for k, v in vars(args).items() if k in ("etw", "nw") and v is not None]
    cli += list(args.override or [])
    x = sample_images(args.size, args.images).to(device)
    B, T = x.shape[0], args.T
    sched = NoiseSchedule.create()
    suite = MetricSuite(lpips_net=args.lpips, device=device)
    rows = []
    for task in args.tasks:
        # composed as the app does: defaults, the task's presets, then the overrides
        op, sigma_y, cfg = task_operator(task, tuple(x.shape[1:]), [*cli, f"sampler.timesteps={T}"])
        st = chain_settings(cfg["sampler"], cfg["solver"])
        op = op.to(device=device, dtype=torch.float32)
        y = torch.cat([op.measure(x[b : b + 1], sigma_y, torch.Generator().manual_seed(100 + b)) for b in range(B)])
        gain = op.pinv_noise_gain() if sigma_y > 0 else 1.0
        sampler = cfg["sampler"]
        coeffs = make_chain(sched, SamplingGrid.create(T), etw=sampler["etw"], nw=sampler["nw"],
                            sigma_y_eff=2 * sigma_y * gain, noise_aware=sampler["noise_aware"])
        gens = [torch.Generator().manual_seed(b) for b in range(B)]
        x_T, z = draw_chain_noise(x.shape, T, gens, per_step_noise=st.per_step_noise, device=device)
        t0 = time.perf_counter()
        seq, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z, clip_x0=st.clip_x0)
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = sample_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver=st.solver, max_iter=st.max_iter,
                         tol=st.tol, stop_mode=st.stop_mode, options=st.solver_options, init=st.init,
                         coarse_steps=st.coarse_steps, form=st.form, clip_x0=st.clip_x0)
        t_deq = time.perf_counter() - t0
        target = to_unit(x)
        row = {"task": task, "sigma_y": sigma_y, "etw": sampler["etw"], "clip_x0": st.clip_x0, "solver": st.solver}
        for label, img in (("base", op.A_pinv(y)), ("seq", seq), ("deq", res.x0)):
            m = suite.compute(to_unit(img), target)
            for k, v in m.items():
                row[f"{k}_{label}"] = float(v.mean())
        row.update(psnr_deq_seq=psnr(res.x0, seq), rounds=res.stats.rounds, s_per_img_deq=t_deq / B,
                   s_per_img_seq=t_seq / B)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows, note


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--T", type=int, default=25)
    ap.add_argument("--etw", type=float, default=None, help="override conf/sampler/deq.yaml")
    ap.add_argument("--nw", type=float, default=None, help="override conf/sampler/deq.yaml")
    ap.add_argument("--override", nargs="*", default=None, metavar="KEY=VALUE",
                    help="invert.py overrides, e.g. sampler.form=cumsum sampler.etw=0.1 solver=anderson_official")
    ap.add_argument("--lpips", default="vgg")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    rows, note = run(args)
    print(f"\nmodel: {note}; {args.images} sample images at {args.size}^2, T={args.T}; chain and solver: "
          f"invert.py's composed config (sampler/deq, solver/anderson, the task's presets) "
          f"(overrides: etw={args.etw}, nw={args.nw}, {' '.join(args.override or [])})")
    cols = [("task", "task", ""), ("etw", "η", ".1f"), ("solver", "solver", "")]
    for k, h in (("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS")):
        for lab in ("base", "seq", "deq"):
            cols.append((f"{k}_{lab}", f"{h} {'A⁺y' if lab == 'base' else lab}", ".3f" if k != "psnr" else ".2f"))
    cols += [("psnr_deq_seq", "DEQ↔seq dB", ".1f"), ("rounds", "rounds", ""), ("s_per_img_deq", "s/img DEQ", ".1f"),
             ("s_per_img_seq", "s/img seq", ".1f")]
    table = print_table(rows, cols)
    write_json(args.json, {"benchmark": "quality", "model": note, "machine": machine_info(torch.device(args.device)),
                           "args": vars(args), "table": table, "rows": rows})


if __name__ == "__main__":
    main()
