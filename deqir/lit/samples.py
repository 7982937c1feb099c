"""Several restorations per image (``num_samples = K``, the paper's generation diversity; docs/app.md).

Sample ``k`` of image ``index`` draws its chain noise (x_T, z) from its own generator; sample 0 uses the
image's generator, so sample 0 of a K-sample run is the image of a one-sample run. All K samples share the
image's one measurement y. The B images of a batch become B * K chains solved together (one batch per round);
:func:`summarize_samples` turns the B * K per-chain results back into one row per image.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor

SAMPLE_STRIDE = 0x9E3779B1  # golden-ratio step: sample k's seed = image seed + k * stride (mod 2**32), k >= 1
STD_SCALE = 4.0  # std/<name>.png shows 4 x the per-pixel standard deviation (white = 0.25 on the [0, 1] scale)
MEAN_OVER_SAMPLES = ("psnr", "ssim", "lpips", "cons", "consistency", "residual", "psnr_to_sequential")


def sample_seed(image_seed: int, k: int) -> int:
    """Seed of sample ``k`` of an image whose chain-noise seed is ``image_seed`` (sample 0: the image's own)."""
    return (int(image_seed) + int(k) * SAMPLE_STRIDE) % 2**32


def check_num_samples(num_samples: Any, mode: str, task: str) -> int:
    """``num_samples`` as a positive int; only ``mode=restore`` of a task with a measurement takes K > 1."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer (restorations per image), got {num_samples!r}")
    if num_samples > 1 and mode != "restore":
        raise ValueError(f"num_samples={num_samples} needs mode=restore (got mode={mode}); use num_samples=1")
    if num_samples > 1 and task == "generate":
        raise ValueError("task=generate draws independent images already: set task.num_images instead of "
                         "num_samples")
    return num_samples


def expand(values: list, K: int) -> list:
    """[a, b] -> [a, a, ..., b, b, ...] (each repeated K times, the chain order of a K-sample batch)."""
    return [v for v in values for _ in range(K)]


def pairwise_lpips(samples: Tensor, lpips) -> float:
    """Mean LPIPS over the K (K - 1) / 2 pairs of one image's samples (K, C, H, W) on [0, 1]."""
    pairs = list(itertools.combinations(range(samples.shape[0]), 2))
    a = samples[[i for i, _ in pairs]]
    b = samples[[j for _, j in pairs]]
    return float(lpips(a, b).double().mean())


def summarize_samples(rows: list[dict[str, Any]], x0: Tensor, target: Tensor | None, K: int, suite,
                      names: list[str]) -> tuple[list[dict[str, Any]], Tensor, Tensor]:
    """One row per image from the rows of its K samples.

    Args:
        rows: B * K per-chain rows (sample k of image b at b * K + k). x0: (B * K, C, H, W) on [0, 1].
        target: (B, C, H, W) on [0, 1] or None. suite: the MetricSuite (None: no metrics). names: B names.

    Returns:
        rows (B): the sample means of the quality columns, ``psnr_of_mean`` / ``ssim_of_mean`` / ``lpips_of_mean``
        (the mean image against the target), ``diversity_lpips`` (mean pairwise LPIPS among the samples),
        ``sample_std`` (mean per-pixel std); ``rounds`` = the most any sample took, ``nfe`` = all samples'
        model evaluations; the mean (B, C, H, W) and the std map (B, C, H, W) on [0, 1].
    """
    B = len(names)
    samples = x0.reshape(B, K, *x0.shape[1:])
    mean, std = samples.mean(dim=1), samples.std(dim=1)
    of_mean = suite.compute(mean, target) if suite is not None and target is not None else {}
    out = []
    for b in range(B):
        group = rows[b * K : (b + 1) * K]
        row: dict[str, Any] = {"name": names[b], "index": group[0]["index"], "num_samples": K}
        for col in MEAN_OVER_SAMPLES:
            vals = [float(r[col]) for r in group if r.get(col) is not None and math.isfinite(float(r[col]))]
            if vals:
                row[col] = sum(vals) / len(vals)
        for col, v in of_mean.items():
            row[f"{col}_of_mean"] = float(v[b])
        if suite is not None and getattr(suite, "lpips", None) is not None:
            row["diversity_lpips"] = pairwise_lpips(samples[b].clamp(0, 1), suite.lpips)
        row["sample_std"] = float(std[b].mean())
        statuses = [r["status"] for r in group]
        row.update(rounds=max(int(r["rounds"]) for r in group), nfe=sum(int(r["nfe"]) for r in group),
                   seconds=group[0].get("seconds"),
                   status=next((s for s in statuses if s != "converged"), "converged"))
        out.append(row)
    std_map = (STD_SCALE * std.mean(dim=1, keepdim=True)).clamp(0, 1).expand_as(mean)
    return out, mean, std_map
