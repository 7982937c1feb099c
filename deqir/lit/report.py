"""End-of-run outputs: metrics.json, grid.png, convergence.png (matplotlib) and the one-line summary."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqir.datasets.images import read_image, to_tensor
from deqir.lit.writer import RunStore, _json_safe, write_text
from deqir.utils.images import atomic_write_bytes

MEAN_COLUMNS = ("psnr", "ssim", "lpips", "cons", "consistency", "rounds", "nfe", "residual", "seconds",
                "psnr_to_sequential", "psnr_init", "loss_init", "loss_best", "best_step",
                "psnr_of_mean", "ssim_of_mean", "lpips_of_mean", "diversity_lpips", "sample_std")


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of the numeric columns over the images that have them, plus ``n_images``."""
    out: dict[str, Any] = {"n_images": len(records)}
    for col in MEAN_COLUMNS:
        vals = [float(r[col]) for r in records if r.get(col) is not None]
        if vals:
            out[col] = float(np.mean(vals))
    if records:
        out["converged_fraction"] = float(np.mean([r.get("status") == "converged" for r in records]))
    warned = sum(1 for r in records if r.get("warning"))
    if warned:
        out["inconsistent"] = warned
    if any(str(r.get("uses_oracle")) == "True" for r in records):
        out["uses_oracle"] = True  # the objective used the ground truth: analysis only, not a restoration result
    return out


def write_metrics(store: RunStore, summary: dict[str, Any]) -> Path:
    return write_text(store.root / "metrics.json", json.dumps(_json_safe(summary), indent=2, sort_keys=True))


def _load(path: Path) -> torch.Tensor | None:
    return to_tensor(read_image(path)) if path.is_file() else None


def write_grid(store: RunStore, records: Sequence[dict[str, Any]], max_images: int = 8,
               max_samples: int = 4) -> Path | None:
    """grid.png: labelled rows input / restored / ground truth (when present), one column per image, with each
    image's name and PSNR (``torchvision.utils.make_grid`` for the tiles, matplotlib for the labels). With
    ``num_samples`` K > 1 the restored row becomes up to ``max_samples`` sample rows, the mean and the std map."""
    from torchvision.utils import make_grid

    recs = list(records)[:max_images]
    if not recs:
        return None
    K = store.num_samples
    if K == 1:
        restored = [("restored", lambda n: store.images / f"{n}.png")]
    else:
        restored = [(f"sample {k}", lambda n, k=k: store.images / f"{n}_{k}.png") for k in range(min(K, max_samples))]
        restored += [(f"mean of {K}", lambda n: store.mean / f"{n}.png"), ("std x4", lambda n: store.std / f"{n}.png")]
    where = [("input", lambda n: store.inputs / f"{n}.png"), *restored,
             ("ground truth", lambda n: store.targets / f"{n}.png")]
    rows = [(label, [_load(path(r["name"])) for r in recs]) for label, path in where]
    ref = rows[1][1][0]
    if ref is None:
        return None
    rows = [(label, tiles) for label, tiles in rows if any(t is not None for t in tiles)]
    tiles = [t if t is not None and t.shape == ref.shape else torch.ones_like(ref) for _, row in rows for t in row]
    pad = 2
    image = make_grid(torch.stack(tiles), nrow=len(recs), padding=pad, pad_value=1.0)
    (_, h, w), (gh, gw) = ref.shape, image.shape[1:]
    captions = [f"{str(r['name'])[:18]}" + (f"\n{float(r['psnr']):.2f} dB" if r.get("psnr") is not None else "")
                for r in recs]
    scale = max(1, math.ceil(110 / w))  # small images are shown enlarged so that the captions fit
    fw, fh = gw * scale + 110, gh * scale + 45
    fig = _figure(fw / 100, fh / 100)
    ax = fig.add_axes((100 / fw, 40 / fh, gw * scale / fw, gh * scale / fh))
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(recs))], captions, fontsize=7)
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows))], [label for label, _ in rows], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return _save(fig, store.root / "grid.png")


def fid_from_files(store: RunStore, records: Sequence[dict[str, Any]], weights: str | None,
                   device: str | torch.device = "cpu", chunk: int = 16) -> float | None:
    """FID between the saved restored images and targets (None: unavailable, or fewer than 2 images)."""
    from deqir.metrics import FIDMetric

    pairs = [(store.images / f"{r['name']}.png", store.targets / f"{r['name']}.png") for r in records]
    pairs = [p for p in pairs if p[0].is_file() and p[1].is_file()]
    if len(pairs) < 2:
        return None
    metric = FIDMetric.create(weights, device=device)
    if metric is None:
        return None
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        metric.update(torch.stack([_load(a) for a, _ in part]), torch.stack([_load(b) for _, b in part]))
    return metric.compute()


def fid_generated(store: RunStore, records: Sequence[dict[str, Any]], reference, weights: str | None,
                  device: str | torch.device = "cpu", chunk: int = 16) -> float | None:
    """task=generate: FID between the generated images and the ``reference`` dataset's images (items with an
    ``image`` (3, H, W) on [0, 1]); None when unavailable or either side has fewer than 2 images."""
    from deqir.metrics import FIDMetric

    fakes = [p for p in (store.images / f"{r['name']}.png" for r in records) if p.is_file()]
    if len(fakes) < 2 or len(reference) < 2:
        return None
    metric = FIDMetric.create(weights, device=device)
    if metric is None:
        return None
    for i in range(0, len(fakes), chunk):
        metric.update(torch.stack([_load(p) for p in fakes[i : i + chunk]]), None)
    for i in range(0, len(reference), chunk):
        metric.update(None, torch.stack([reference[j]["image"] for j in range(i, min(len(reference), i + chunk))]))
    return metric.compute()


# ------------------------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot: the caller's backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    return atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_convergence(store: RunStore, records: Sequence[dict[str, Any]], stop_mode: str = "rel",
                      tol: float | None = None, max_series: int = 10) -> Path | None:
    """convergence.png, one line per image (first ``max_series``):

    * restore: the solver's residual per round (log scale) with the tolerance line, and, when recorded
      (``eval.compare_sequential=true``), the PSNR of each round's x0 to the sequential chain;
    * optimize_init / invert: the optimisation objective per step (its solver statistics are CSV columns).
    """
    recs = [r for r in records if (r.get("trace") or {}).get("residual") or (r.get("trace") or {}).get("loss")]
    recs = recs[:max_series]
    if not recs:
        return None
    key = "residual" if any(r["trace"].get("residual") for r in recs) else "loss"
    panels = [key] + (["psnr_to_sequential"] if any(r["trace"].get("psnr_to_sequential") for r in recs) else [])
    fig = _figure(5.2 * len(panels), 3.6)
    for k, what in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for r in recs:
            ys = [float(v) for v in r["trace"].get(what, [])]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", markersize=2.5, linewidth=1.2, label=str(r["name"])[:18])
        if what == "residual":
            ax.set_yscale("log")
            ax.set(title=f"solver residual per round ({stop_mode})", xlabel="solver round",
                   ylabel="||f(X) - X|| / ||X||" if stop_mode == "rel" else "||f(X) - X||")
            if tol:
                ax.axhline(tol, color="black", linestyle="--", linewidth=1, label=f"tol {tol:g}")
        elif what == "loss":
            ax.set(title="optimisation objective per step", xlabel="optimisation step", ylabel="loss")
        else:
            ax.set(title="PSNR of the round's x0 to the sequential chain", xlabel="solver round", ylabel="dB")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, which="major", alpha=0.3)
    fig.axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, store.root / "convergence.png")


def summary_line(task: str, sampler: str, summary: dict[str, Any], run_dir: Path, fid: float | None = None) -> str:
    """One clean line: task, ``[sampler]`` (the label of the chain that ran), images, mean metrics, cost and
    where the outputs are. Sequential runs show no solver rounds (their cost is the NFE: T model calls)."""
    parts = [f"{task} [{sampler}]", f"{summary['n_images']} images"]
    sequential = str(summary.get("sampler")) == "sequential"
    for key, fmt in (("psnr_init", "PSNR before optimisation {:.2f} dB"), ("psnr", "PSNR {:.2f} dB"),
                     ("ssim", "SSIM {:.4f}"), ("lpips", "LPIPS {:.4f}"), ("psnr_of_mean", "PSNR of the mean {:.2f} dB"),
                     ("diversity_lpips", "diversity LPIPS {:.4f}"),
                     ("cons", "Cons {:.2f}"), ("consistency", "||Ax-y|| {:.3g}"),
                     ("psnr_to_sequential", "to-seq {:.2f} dB"), ("rounds", "{:.1f} rounds"), ("nfe", "{:.0f} NFE"),
                     ("seconds", "{:.1f} s/img")):
        if summary.get(key) is not None and not (sequential and key == "rounds"):
            parts.append(fmt.format(summary[key]))
    frac = summary.get("converged_fraction")
    if frac is not None and frac < 1 and summary.get("max_iter"):
        capped = round((1 - frac) * summary["n_images"])
        parts.append(f"{capped}/{summary['n_images']} stopped at the round cap (solver.max_iter={summary['max_iter']})")
    if summary.get("inconsistent"):
        parts.append(f"WARNING: {summary['inconsistent']}/{summary['n_images']} restorations inconsistent with "
                     f"their input (||Ax-y|| far above the noise; the photo's degradation is likely not the task's "
                     f"operator, or sigma_y is too low: see per_image.csv 'warning')")
    if fid is not None:
        parts.append(f"FID {fid:.2f} (n={summary['n_images']})")
    if summary.get("uses_oracle"):
        parts.append("ORACLE objective (used the ground truth: analysis only)")
    return " | ".join(parts) + f" -> {run_dir}"
