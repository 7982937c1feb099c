"""Defaults chosen by measurement: per task, step placement x T x eta x t_start (x chain) on the evaluation set,
against the current default and deepinv 0.5's DDRM / DiffPIR at their own defaults, with paired 95 % intervals.

Every deqir row is invert.py's own configuration (``compose_config(task, overrides)``, the task's presets
included) run by the app's RestorationModule, so its per-image measurement y and noise are exactly the CLI's;
the peers restore the same y with the same ε-model (benchmarks/peers.py wrappers). Per image: PSNR, SSIM,
LPIPS-VGG, ‖Ax − y‖ on [0, 1]; per row: the means, work = model evaluations per image (a VJP counts as one), and
the paired difference to the reference row (mean and 95 % t-interval over the images). Results are cached per
(row, image) in ``--cache`` (JSON lines), so a killed run resumes and a grown grid only runs what is new.

    python data/eval_set.py                                         # the 30-photo evaluation set
    python benchmarks/defaults.py --tasks deblur --grid placement --json bench_results/defaults.json
    python benchmarks/defaults.py --tasks deblur --configs "skip_type=quad" "skip_type=karras,T=100" --peers DDRM
    python benchmarks/defaults.py --report --plot-dir docs/figures     # tables + PNGs from the cache only

A config is ``key=value`` pairs joined by commas: ``skip_type``, ``T``, ``eta`` (etw = nw), ``t_start``, ``rho``,
``chain`` and any invert.py override (``sampler.clip_x0=true``); ``default`` is the task's current default.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from benchmarks.rule import (current_label, decide, default_at_steps, overrides_of, parallel_vetoes,  # noqa: E402
                            real_vetoes, steps_vetoes)
from benchmarks.stats import paired  # noqa: E402

TASKS = ["deblur", "sr4", "sr_avgpool4", "inpaint_random", "inpaint_box", "inpaint_text", "denoise", "colorize", "cs2"]
GRIDS = {
    "placement": ["default", "skip_type=quad", "skip_type=karras"],
    "start": ["skip_type=quad,t_start=600", "skip_type=karras,t_start=600", "skip_type=linear_sigma,t_start=400"],
    "eta": ["skip_type=quad,eta=0.85", "skip_type=quad,eta=0.5"],
    "T": ["default,T=100", "skip_type=quad,T=50", "skip_type=quad,T=100"],
}
def load_images(folder: Path, limit: int | None) -> tuple[list[str], torch.Tensor]:
    from deqir.datasets.images import read_image, to_tensor

    paths = sorted(folder.glob("*.png"))[: limit or None]
    if not paths:
        raise SystemExit(f"error: no images in {folder}: build the evaluation set with python data/eval_set.py")
    return [p.stem for p in paths], torch.stack([to_tensor(read_image(p)) for p in paths])


class Runner:
    """The app's module for one (task, overrides), reused over batches of images."""

    def __init__(self, task: str, overrides: list[str], model_dtype: str, shape):
        from omegaconf import open_dict

        from deqir.api import compose_config
        from deqir.lit import builders
        from deqir.lit.app import build_module, plain_config

        cfg = compose_config(task, [*overrides, f"model_dtype={model_dtype}", "trainer=cpu"])
        with open_dict(cfg):
            cfg["trainer"]["inference_mode"] = False
        self.plain = plain_config(cfg)
        self.op = builders.build_operator(self.plain["task"], shape)
        self.model = _model(self.plain["model"])
        self.module = build_module(self.plain, self.op, self.model, shape)
        self.module.eval()
        self.module.on_predict_start()

    def run(self, index: list[int], names: list[str], images: torch.Tensor) -> tuple[list[dict], object]:
        batch = {"index": torch.tensor(index), "name": names, "image": images}
        return self.module.predict_step(batch).rows, self.module.make_problem(batch)


_MODELS: dict[str, torch.nn.Module] = {}


def _model(model_cfg: dict) -> torch.nn.Module:
    from deqir.lit import builders

    key = json.dumps(model_cfg, sort_keys=True)
    if key not in _MODELS:
        _MODELS[key] = builders.build_model(model_cfg)
    return _MODELS[key]


def work_per_image(runner: Runner, rows: list[dict]) -> float:
    """Model evaluations per image; ΠGDM / DPS add one VJP per step."""
    vjp = runner.plain.get("chain", {}).get("name") in ("pigdm", "dps")
    return float(sum(float(r["nfe"]) for r in rows) / len(rows)) * (2 if vjp else 1)


def score_peer(name: str, runner: Runner, problem, target01: torch.Tensor, suite, steps: int) -> list[dict]:
    """deepinv's ``name`` at its defaults on the module's own y (benchmarks/peers.py wrapper)."""
    from benchmarks.peers import run_deepinv

    op, sigma_y = runner.op, float(runner.plain["task"]["sigma_y"])
    y = problem.y
    y01 = (y + op.A(torch.ones_like(problem.x_T))) / 2
    rows = []
    for b in range(y.shape[0]):
        x, nfe = run_deepinv(name, runner.model, op, y01[b : b + 1], sigma_y, steps, seed=problem.index[b],
                             own_grid=True)
        x01 = ((x.float().clamp(-1, 1) + 1) / 2 * 255).round() / 255  # scored as saved 8-bit images, as the app
        m = suite.compute(x01, target01[b : b + 1])
        row = {k: float(v[0]) for k, v in m.items()}
        row["consistency"] = float((op.A(2 * x01 - 1) - y[b : b + 1]).flatten(1).norm(dim=1)[0] / 2)
        row["nfe"] = nfe
        rows.append(row)
    return rows


def baseline_rows(runner: Runner, problem, target01: torch.Tensor, suite) -> list[dict]:
    """The trivial baseline A^+ y (for colorize the grey image, for denoise the noisy input), as an 8-bit image."""
    op = runner.op
    with torch.no_grad():
        x = op.A_pinv(problem.y).clamp(-1, 1)
    x01 = (((x + 1) / 2) * 255).round() / 255
    m = suite.compute(x01, target01)
    cons = (op.A(2 * x01 - 1) - problem.y).flatten(1).norm(dim=1) / 2
    return [{**{k: float(v[b]) for k, v in m.items()}, "consistency": float(cons[b]), "nfe": 0}
            for b in range(x.shape[0])]


def load_cache(*paths: Path) -> dict[tuple[str, str, str], dict]:
    """(task, row, image) -> record, from every cache file given (the first one is the one written)."""
    out: dict = {}
    for path in paths:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    out[(r["task"], r["config"], r["image"])] = r
    return out


def run(args) -> None:
    cache_path = Path(args.cache[0])
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache = load_cache(*map(Path, args.cache))
    names, images = load_images(Path(args.images), args.limit)
    shape = tuple(images.shape[1:])
    configs = [c for g in args.grid for c in GRIDS[g]] + list(args.configs or [])
    configs = [] if args.only_peers else list(dict.fromkeys(["default", *configs]))
    for task in args.tasks:
        cache = load_cache(*map(Path, args.cache))  # (re-read: another process may share the read caches)
        rows_to_run = ([] if args.only_peers else [("baseline", None)]) + [(c, None) for c in configs] + \
            [(f"deepinv {p}", p) for p in args.peers]
        for label, peer in rows_to_run:
            todo = [i for i, n in enumerate(names) if (task, label, n) not in cache]
            if not todo:
                continue
            conf = "default" if label == "baseline" or peer else label
            # the sequential sampler: quality does not depend on the solve (the DEQ's fixed point is this chain),
            # and its work is exactly T (benchmarks/parallel_defaults.py measures the parallel solve)
            runner = Runner(task, ["sampler=sequential", *args.override, *overrides_of(conf)], args.model_dtype,
                            shape)
            suite = runner.module.suite
            t0 = time.perf_counter()
            for start in range(0, len(todo), args.batch):
                idx = todo[start : start + args.batch]
                x01 = images[idx]
                if label == "baseline" or peer:
                    problem = runner.module.make_problem({"index": torch.tensor(idx), "name": [names[i] for i in idx],
                                                          "image": x01})
                    rows = (baseline_rows(runner, problem, x01, suite) if label == "baseline"
                            else score_peer(peer, runner, problem, x01, suite, args.peer_steps))
                    work = [float(r["nfe"]) for r in rows]
                else:
                    rows, _ = runner.run(idx, [names[i] for i in idx], x01)
                    work = [work_per_image(runner, [r]) for r in rows]
                with open(cache_path, "a") as f:
                    for i, r, w in zip(idx, rows, work):
                        rec = {"task": task, "config": label, "image": names[i], "psnr": r.get("psnr"),
                               "ssim": r.get("ssim"), "lpips": r.get("lpips"), "consistency": r.get("consistency"),
                               "work": w, "model_dtype": args.model_dtype}
                        cache[(task, label, names[i])] = rec
                        f.write(json.dumps(rec) + "\n")
            print(f"{task:>15s} {label:<45s} {len(todo)} images, {(time.perf_counter() - t0) / len(todo):.1f} s/img",
                  flush=True)


def report(args) -> dict:
    """Tables from the cache: per task, every row with its means and paired differences (95 % CI) to the task's
    current default (and to the best peer row)."""
    cache = load_cache(*map(Path, args.cache))
    real = [Path(p) for p in (args.real or [])]
    parallel = [Path(p) for p in (args.parallel or [])]
    names, imgs = load_images(Path(args.images), args.limit)
    size = imgs.shape[-1]
    tasks = [t for t in args.tasks if any(k[0] == t for k in cache)]
    out: dict = {}
    for task in tasks:
        labels = list(dict.fromkeys(k[1] for k in cache if k[0] == task))
        full = [lab for lab in labels if all((task, lab, n) in cache for n in names)]
        per = {lab: [cache[(task, lab, n)] for n in names] for lab in full}
        peers = [lab for lab in full if lab.startswith("deepinv")]
        best_peer = max(peers, key=lambda lab: _mean(per[lab], "psnr")) if peers else None
        rows = []
        for lab in full:
            r = {"task": task, "config": lab, "n": len(names)}
            for k in ("psnr", "ssim", "lpips", "consistency", "work"):
                r[k] = _mean(per[lab], k)
            for ref, tag in (("default", "default"), (best_peer, "peer")):
                if ref is None or ref not in per or lab == ref:
                    continue
                for k in ("psnr", "lpips"):
                    a, b = [x[k] for x in per[lab]], [x[k] for x in per[ref]]
                    if None in a or None in b:
                        continue  # (not measured, e.g. eval.lpips=null)
                    d = paired(a, b)
                    r[f"d_{k}_{tag}"], r[f"ci_{k}_{tag}"] = d["mean"], (d["lo"], d["hi"])
            rows.append(r)
        current = current_label(task, full)
        out[task] = {"rows": rows, "best_peer": best_peer, "size": size,
                     # one reason vetoes: where several floors do, the real-photo one is reported
                     "decision": decide(rows, per, current, {**steps_vetoes(task, full, current, per),
                                                             **parallel_vetoes(task, full, current, parallel),
                                                             **real_vetoes(task, full, current, real)})}
        print(f"\n### {task} ({len(names)} photos, {size} px; Δ = paired difference, [95 % CI])")
        cols = [("config", "config", ""), ("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".3f"), ("lpips", "LPIPS", ".3f"),
                ("consistency", "‖Ax−y‖", ".3f"), ("work", "NFE", ".0f"),
                ("d_psnr_default_s", "ΔPSNR vs default", ""), ("d_lpips_default_s", "ΔLPIPS vs default", ""),
                ("d_psnr_peer_s", f"ΔPSNR vs {best_peer or 'peer'}", ""),
                ("d_lpips_peer_s", f"ΔLPIPS vs {best_peer or 'peer'}", "")]
        for r in rows:
            for k in ("psnr_default", "lpips_default", "psnr_peer", "lpips_peer"):
                if f"d_{k}" in r:
                    lo, hi = r[f"ci_{k}"]
                    fmt = ".2f" if k.startswith("psnr") else ".3f"
                    r[f"d_{k}_s"] = f"{r[f'd_{k}']:+{fmt}} [{lo:+{fmt}}, {hi:+{fmt}}]"
        out[task]["table"] = print_table(rows, cols)
        print(f"rule: {out[task]['decision']['text']}")
        out[task]["steps"] = steps_row(task, full, per, current, best_peer)
    summary = []
    for task, res in out.items():
        rows = {r["config"]: r for r in res["rows"]}
        win = res["decision"]["winner"] or "default"
        new, old, base = rows.get(win), rows.get("default"), rows.get("baseline")
        peer = rows.get(res["best_peer"]) if res["best_peer"] else None
        if new is None or old is None:
            continue
        line = {"task": task, "n": new["n"], "chosen": win,
                "base": f"{base['psnr']:.2f} / {base['lpips']:.3f}" if base else "–",
                "old": f"{old['psnr']:.2f} / {old['lpips']:.3f}", "new": f"{new['psnr']:.2f} / {new['lpips']:.3f}",
                "gain": (f"{new['d_psnr_default']:+.2f} [{new['ci_psnr_default'][0]:+.2f}, {new['ci_psnr_default'][1]:+.2f}]"
                         if "d_psnr_default" in new else "–"),
                "peer": f"{peer['psnr']:.2f} / {peer['lpips']:.3f} ({peer['work']:.0f})" if peer else "–",
                "vs_peer": (f"{new['d_psnr_peer']:+.2f} [{new['ci_psnr_peer'][0]:+.2f}, {new['ci_psnr_peer'][1]:+.2f}]"
                            if "d_psnr_peer" in new else "–")}
        summary.append(line)
    if summary:
        print("\n### Summary: the rule's choice per task (PSNR dB / LPIPS; Δ paired, [95 % CI])")
        print_table(summary, [("task", "task", ""), ("n", "photos", ""), ("chosen", "chosen", ""),
                              ("base", "baseline", ""), ("old", "old default", ""), ("new", "new default", ""),
                              ("gain", "ΔPSNR new − old", ""), ("peer", "best peer (NFE)", ""),
                              ("vs_peer", "ΔPSNR new − peer", "")])
    out["_summary"] = summary
    steps = [res["steps"] for res in out.values() if isinstance(res, dict) and res.get("steps")]
    if steps:
        print("\n### The default with more steps (PSNR dB / LPIPS; Δ paired, [95 % CI]; reported, never chosen)")
        print_table(steps, [("task", "task", ""), ("T25", "T = 25", ""), ("T50", "T = 50", ""), ("T100", "T = 100", ""),
                            ("d50_peer", "ΔPSNR T = 50 − best peer", ""), ("d100_25", "ΔPSNR T = 100 − 25", ""),
                            ("d100_peer", "ΔPSNR T = 100 − best peer", ""),
                            ("dl100_peer", "ΔLPIPS T = 100 − best peer", "")])
    out["_steps"] = steps
    if args.plot_dir:
        plot({k: v for k, v in out.items() if not k.startswith("_")}, Path(args.plot_dir))
    return out


def steps_row(task: str, full: list[str], per: dict[str, list[dict]], current: str | None,
              best_peer: str | None) -> dict | None:
    """The task's current default at T = 25, 50 and 100 (the cached rows that compose to it), with paired
    differences of T = 50 and 100 to the best peer and of T = 100 to T = 25; None when T = 100 was not run."""
    at = default_at_steps(task, full)
    at.setdefault(25, current or "default")  # no labelled switch: the "default" row is the default
    if 100 not in at or at[25] not in per:
        return None

    def diff(a: str, b: str | None, key: str, fmt: str) -> str:
        if b is None:
            return "–"
        d = paired([x[key] for x in per[a]], [x[key] for x in per[b]])
        return f"{d['mean']:+{fmt}} [{d['lo']:+{fmt}}, {d['hi']:+{fmt}}]"

    row = {"task": task, "labels": at}
    for T in (25, 50, 100):
        row[f"T{T}"] = (f"{_mean(per[at[T]], 'psnr'):.2f} / {_mean(per[at[T]], 'lpips'):.3f}" if T in at else "–")
    row["d50_peer"] = diff(at[50], best_peer, "psnr", ".2f") if 50 in at else "–"
    row["d100_25"] = diff(at[100], at[25], "psnr", ".2f")
    row["d100_peer"] = diff(at[100], best_peer, "psnr", ".2f")
    row["dl100_peer"] = diff(at[100], best_peer, "lpips", ".3f")
    return row


def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    return sum(vals) / len(vals) if vals else math.nan


def plot(out: dict, folder: Path) -> None:
    """One PNG per task: PSNR and LPIPS against model evaluations; deqir's settings measured at several T as curves,
    the rule's choice as a star, the other single-T settings as grey dots, the peers and the baseline as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for task, res in out.items():
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
        winner = (res.get("decision") or {}).get("winner")
        curves: dict[str, list] = {}
        for r in res["rows"]:
            lab = r["config"]
            if lab == "baseline" or lab.startswith("deepinv"):
                for ax, k in zip(axes, ("psnr", "lpips")):
                    ax.scatter([max(r["work"], 1)], [r[k]], marker="x" if lab == "baseline" else "s", s=40,
                               label=lab if ax is axes[0] else None, zorder=3)
                continue
            parts = [p for p in lab.split(",") if not p.startswith("T=")]
            key = ",".join(parts) or "default"
            T = next((int(p[2:]) for p in lab.split(",") if p.startswith("T=")), 25)
            curves.setdefault(key, []).append((r["work"], r["psnr"], r["lpips"], T, lab))
        others = False
        for key, pts in curves.items():
            pts.sort()
            chosen = any(p[4] == winner for p in pts)
            for ax, i in zip(axes, (1, 2)):
                x, y = [p[0] for p in pts], [p[i] for p in pts]
                first = ax is axes[0]
                if len(pts) > 1 or chosen or key == "default":
                    name = ("old default" if key == "default" else f"deqir {key}") + (" (chosen)" if chosen else "")
                    ax.plot(x, y, "o-", ms=4, lw=1.2, label=name if first else None, zorder=2)
                else:
                    ax.scatter(x, y, s=12, color="0.6", label=None if others or not first else
                               "other settings (one T each)", zorder=1)
                if chosen:
                    w = next(p for p in pts if p[4] == winner)
                    ax.scatter([w[0]], [w[i]], marker="*", s=160, color="crimson", zorder=4,
                               label="the rule's choice" if first else None)
            others = others or not (len(pts) > 1 or chosen or key == "default")
        for ax, k in zip(axes, ("PSNR (dB)", "LPIPS-VGG (lower is better)")):
            ax.set_xscale("log")
            ax.set_xlabel("model evaluations per image")
            ax.set_ylabel(k)
            ax.grid(alpha=0.3)
        fig.legend(loc="lower center", ncol=3, fontsize=6, frameon=False)
        fig.suptitle(f"{task}: {res['rows'][0]['n']} photos, {res.get('size', 128)} px (CPU)", fontsize=9)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        fig.savefig(folder / f"defaults_{task}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--grid", nargs="*", default=["placement"], choices=sorted(GRIDS),
                    help="named config groups (see GRIDS)")
    ap.add_argument("--configs", nargs="*", default=None, help="extra configs, e.g. skip_type=quad,T=50")
    ap.add_argument("--peers", nargs="*", default=[], choices=["DDRM", "DiffPIR"])
    ap.add_argument("--only-peers", action="store_true", help="run only the peer rows (e.g. in a second process)")
    ap.add_argument("--peer-steps", type=int, default=100, help="deepinv's steps (its default: 100)")
    ap.add_argument("--images", default=str(ROOT / "data" / "eval" / "128"))
    ap.add_argument("--limit", type=int, default=24, help="first N photos of the set (>= 24 for claims)")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="invert.py overrides applied to every row (e.g. model=tiny_ddpm for a smoke run)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--model-dtype", default="model", help="invert.py's model_dtype (model = float32)")
    ap.add_argument("--cache", nargs="+", default=[str(ROOT / "benchmarks" / "results" / "defaults_cache.jsonl")],
                    help="result cache(s), JSON lines: the first is written, all are read")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report", action="store_true", help="only print the tables from the cache")
    ap.add_argument("--real", nargs="*", default=None, metavar="JSON",
                    help="real_degradations.py results (one per config, per-image): the rule's real-photo floor")
    ap.add_argument("--parallel", nargs="*", default=None, metavar="JSON",
                    help="parallel_defaults.py results (per image): the rule's parallel floor (45 dB of the sequential "
                         "result at the stop on every photo)")
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.report:
        from deqir.utils.runtime import tune_allocator

        tune_allocator()
        run(args)
    out = report(args)
    write_json(args.json, {"benchmark": "defaults", "machine": machine_info(torch.device("cpu")),
                           "args": vars(args), "tasks": out})


if __name__ == "__main__":
    main()
