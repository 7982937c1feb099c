"""End-of-run outputs: metrics.json, grid.png, convergence.png and the one-line summary.

Plots are drawn with Pillow only (no matplotlib dependency).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from deqir.datasets.images import read_image, to_tensor
from deqir.lit.writer import RunStore, _json_safe, write_text
from deqir.utils.images import atomic_write_bytes, grid, save_png

MEAN_COLUMNS = ("psnr", "ssim", "lpips", "cons", "consistency", "rounds", "nfe", "residual", "seconds",
                "psnr_to_sequential", "psnr_init", "loss_init", "loss_best", "best_step")


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of the numeric columns over the images that have them, plus ``n_images``."""
    out: dict[str, Any] = {"n_images": len(records)}
    for col in MEAN_COLUMNS:
        vals = [float(r[col]) for r in records if r.get(col) is not None]
        if vals:
            out[col] = float(np.mean(vals))
    if records:
        out["converged_fraction"] = float(np.mean([r.get("status") == "converged" for r in records]))
    if any(str(r.get("uses_oracle")) == "True" for r in records):
        out["uses_oracle"] = True  # the objective used the ground truth: analysis only, not a restoration result
    return out


def write_metrics(store: RunStore, summary: dict[str, Any]) -> Path:
    return write_text(store.root / "metrics.json", json.dumps(_json_safe(summary), indent=2, sort_keys=True))


def _load(path: Path) -> torch.Tensor | None:
    return to_tensor(read_image(path)) if path.is_file() else None


def write_grid(store: RunStore, records: Sequence[dict[str, Any]], max_images: int = 8) -> Path | None:
    """grid.png: rows input / restored / ground truth (when present), one column per image."""
    recs = list(records)[:max_images]
    if not recs:
        return None
    rows: list[list[torch.Tensor | None]] = [[], [], []]
    for r in recs:
        name = r["name"]
        rows[0].append(_load(store.inputs / f"{name}.png"))
        rows[1].append(_load(store.images / f"{name}.png"))
        rows[2].append(_load(store.targets / f"{name}.png"))
    ref = rows[1][0]
    tiles = []
    for row in rows:
        if all(t is None for t in row):
            continue
        tiles += [t if t is not None and t.shape == ref.shape else torch.ones_like(ref) for t in row]
    return save_png(grid(torch.stack(tiles), nrow=len(recs)), store.root / "grid.png")


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


# ------------------------------------------------------------------------------------------- plots
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: Sequence[Sequence[float]], title: str,
           log: bool, font) -> None:
    x0, y0, x1, y1 = box
    left, bottom, top = x0 + 58, y1 - 28, y0 + 22
    draw.rectangle((left, top, x1 - 10, bottom), outline=(0, 0, 0))
    draw.text((left, y0 + 4), title, fill=(0, 0, 0), font=font)
    vals = [v for s in series for v in s if math.isfinite(v) and (v > 0 or not log)]
    if not vals:
        draw.text((left + 10, top + 10), "no data", fill=(0, 0, 0), font=font)
        return
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = f(min(vals)), f(max(vals))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(len(s) for s in series)
    width, height = (x1 - 10) - left, bottom - top

    def pt(i: int, v: float) -> tuple[float, float]:
        return left + (i / max(1, n - 1)) * width, bottom - (f(v) - lo) / (hi - lo) * height

    for k, tick in enumerate(np.linspace(lo, hi, 5)):
        yy = bottom - (tick - lo) / (hi - lo) * height
        label = f"{10 ** tick:.1e}" if log else f"{tick:.3g}"
        draw.line((left - 3, yy, left, yy), fill=(0, 0, 0))
        draw.text((x0 + 2, yy - 5), label, fill=(0, 0, 0), font=font)
    for i in range(n):
        xx = left + (i / max(1, n - 1)) * width
        draw.line((xx, bottom, xx, bottom + 3), fill=(0, 0, 0))
        if n <= 20 or i % max(1, n // 10) == 0:
            draw.text((xx - 3, bottom + 6), str(i + 1), fill=(0, 0, 0), font=font)
    draw.text((x1 - 60, bottom + 14), "round", fill=(0, 0, 0), font=font)
    for k, s in enumerate(series):
        pts = [pt(i, v) for i, v in enumerate(s) if math.isfinite(v) and (v > 0 or not log)]
        color = _COLORS[k % len(_COLORS)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts:
            draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=color)


def write_convergence(store: RunStore, records: Sequence[dict[str, Any]], stop_mode: str = "rel",
                      max_series: int = 10) -> Path | None:
    """convergence.png: residual vs round (log scale) and, when recorded, PSNR to sequential vs round."""
    recs = [r for r in records if r.get("trace", {}).get("residual")][:max_series]
    if not recs:
        return None
    panels = [([r["trace"]["residual"] for r in recs], f"{stop_mode} residual ||f(X) - X|| per image", True)]
    if any(r["trace"].get("psnr_to_sequential") for r in recs):
        panels.append(([r["trace"].get("psnr_to_sequential", []) for r in recs],
                       "PSNR of f(X) to the sequential chain (dB)", False))
    w, h = 560, 300
    img = Image.new("RGB", (w * len(panels), h + 16 * ((len(recs) + 3) // 4) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for k, (series, title, log) in enumerate(panels):
        _panel(draw, (k * w, 0, (k + 1) * w, h), series, title, log, font)
    for k, r in enumerate(recs):  # legend
        xx, yy = 60 + (k % 4) * 130, h + 4 + (k // 4) * 16
        draw.rectangle((xx, yy + 3, xx + 10, yy + 9), fill=_COLORS[k % len(_COLORS)])
        draw.text((xx + 14, yy), str(r["name"])[:16], fill=(0, 0, 0), font=font)
    path = store.root / "convergence.png"
    return atomic_write_bytes(path, lambda tmp: img.save(tmp, format="PNG"))


def summary_line(task: str, sampler: str, summary: dict[str, Any], run_dir: Path, fid: float | None = None) -> str:
    """One clean line: task, images, mean metrics, cost and where the outputs are."""
    parts = [f"{task} [{sampler}]", f"{summary['n_images']} images"]
    for key, fmt in (("psnr_init", "PSNR before optimisation {:.2f} dB"), ("psnr", "PSNR {:.2f} dB"), ("ssim", "SSIM {:.4f}"), ("lpips", "LPIPS {:.4f}"),
                     ("cons", "Cons {:.2f}"), ("consistency", "||Ax-y|| {:.3g}"),
                     ("psnr_to_sequential", "to-seq {:.2f} dB"), ("rounds", "{:.1f} rounds"), ("nfe", "{:.0f} NFE"),
                     ("seconds", "{:.1f} s/img")):
        if summary.get(key) is not None:
            parts.append(fmt.format(summary[key]))
    if fid is not None:
        parts.append(f"FID {fid:.2f} (n={summary['n_images']})")
    if summary.get("uses_oracle"):
        parts.append("ORACLE objective (used the ground truth: analysis only)")
    return " | ".join(parts) + f" -> {run_dir}"
