"""Restoration metrics: PSNR/SSIM (torchmetrics), offline LPIPS (metric + loss), FID, consistency.

See ``docs/metrics.md`` for the exact definitions and the offline weight sources.
"""
from __future__ import annotations

from deqir.metrics._warn import MetricUnavailableWarning
from deqir.metrics.consistency import colorization_consistency, consistency, gray
from deqir.metrics.fid import FIDMetric, find_inception_weights
from deqir.metrics.fidelity import psnr, quantize, rgb_to_y, ssim
from deqir.metrics.lpips_weights import find_backbone_file, restricted_pickle_load
from deqir.metrics.perceptual import LPIPSLoss, LPIPSMetric, build_lpips, lpips_available
from deqir.metrics.suite import MetricSuite

__all__ = [
    "FIDMetric",
    "LPIPSLoss",
    "LPIPSMetric",
    "MetricSuite",
    "MetricUnavailableWarning",
    "build_lpips",
    "colorization_consistency",
    "consistency",
    "find_backbone_file",
    "find_inception_weights",
    "gray",
    "lpips_available",
    "psnr",
    "quantize",
    "restricted_pickle_load",
    "rgb_to_y",
    "ssim",
]
