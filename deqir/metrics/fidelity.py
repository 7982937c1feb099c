"""Per-image PSNR and SSIM (torchmetrics) on 8-bit images, with basicsr-style crop and Y channel.

All functions take ``(N, C, H, W)`` tensors on the [0, 1] scale and return one value per image,
shape ``(N,)``. Averages over a data set are the mean of these per-image values (what papers report),
never the PSNR of a pooled MSE.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from deqir.utils.images import quantize

__all__ = ["Channel", "quantize", "rgb_to_y", "prepare", "psnr", "ssim", "to_uint8_batch"]

Channel = Literal["rgb", "y"]

# ITU-R BT.601 studio-swing luma, as basicsr's ``rgb2ycbcr(img, y_only=True)`` for float inputs:
# Y = (65.481 R + 128.553 G + 24.966 B + 16) / 255 with R, G, B on [0, 1]; Y lies in [16/255, 235/255].
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(x: Tensor) -> Tensor:
    """BT.601 luma of an RGB batch, as basicsr's ``rgb2ycbcr(..., y_only=True)`` on [0, 1] floats.

    Args:
        x: ``(N, 3, H, W)`` RGB on [0, 1].

    Returns:
        ``(N, 1, H, W)`` luma on [0, 1] (studio swing, not re-quantized).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_y expects (N, 3, H, W), got {tuple(x.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * w).sum(dim=1, keepdim=True) + _Y_OFFSET) / 255.0


def _crop(x: Tensor, crop_border: int) -> Tensor:
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border == 0:
        return x
    h, w = x.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
    return x[..., crop_border : h - crop_border, crop_border : w - crop_border]


def prepare(
    x: Tensor, *, crop_border: int = 0, channel: Channel = "rgb", quantized: bool = True
) -> Tensor:
    """Quantize to 8 bits (optional), crop the border and select RGB or Y.

    Args:
        x: ``(N, C, H, W)`` on [0, 1].
        crop_border: Pixels removed on every side (basicsr's ``crop_border``).
        channel: ``"rgb"`` keeps all channels; ``"y"`` converts RGB to BT.601 luma.
        quantized: Round to what a saved 8-bit PNG holds first (idempotent on 8-bit inputs).

    Returns:
        The prepared tensor, ``(N, C', H', W')``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got {tuple(x.shape)}")
    if channel not in ("rgb", "y"):
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    if quantized:
        x = quantize(x)
    x = _crop(x, crop_border)
    return rgb_to_y(x) if channel == "y" else x


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}")


def psnr(
    pred: Tensor,
    target: Tensor,
    *,
    crop_border: int = 0,
    channel: Channel = "rgb",
    quantized: bool = True,
) -> Tensor:
    """Per-image PSNR in dB with data range 1: ``10 log10(1 / mean((pred - target)^2))``.

    The mean runs over channels and pixels of each image (torchmetrics with ``dim=(1, 2, 3)``,
    computed in float64). Identical images give ``inf``.

    Args:
        pred: ``(N, C, H, W)`` restored images on [0, 1].
        target: ``(N, C, H, W)`` ground truth on [0, 1].
        crop_border: Pixels removed on every side before the comparison.
        channel: ``"rgb"`` or ``"y"`` (BT.601 luma as basicsr).
        quantized: Compare the 8-bit versions (the saved PNGs). Set False only for inputs that
            must not be rounded.

    Returns:
        ``(N,)`` float64 tensor on the inputs' device.
    """
    _check_pair(pred, target)
    p = prepare(pred.double(), crop_border=crop_border, channel=channel, quantized=quantized)
    t = prepare(target.double(), crop_border=crop_border, channel=channel, quantized=quantized)
    return peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)).reshape(-1)


def ssim(
    pred: Tensor,
    target: Tensor,
    *,
    crop_border: int = 0,
    channel: Channel = "rgb",
    quantized: bool = True,
) -> Tensor:
    """Per-image SSIM (torchmetrics): Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1.

    The SSIM map is evaluated on the valid region (no padded pixels) and averaged over channels and
    pixels of each image, as basicsr / scikit-image do for RGB.

    Args:
        pred: ``(N, C, H, W)`` restored images on [0, 1]; after cropping, H and W must be >= 11.
        target: ``(N, C, H, W)`` ground truth on [0, 1].
        crop_border: Pixels removed on every side before the comparison.
        channel: ``"rgb"`` or ``"y"``.
        quantized: Compare the 8-bit versions (the saved PNGs).

    Returns:
        ``(N,)`` float tensor on the inputs' device.
    """
    _check_pair(pred, target)
    p = prepare(pred, crop_border=crop_border, channel=channel, quantized=quantized).float()
    t = prepare(target, crop_border=crop_border, channel=channel, quantized=quantized).float()
    out = structural_similarity_index_measure(
        p, t, data_range=1.0, gaussian_kernel=True, kernel_size=11, sigma=1.5, k1=0.01, k2=0.03,
        reduction="none",
    )
    return out.reshape(-1)


def to_uint8_batch(x: Tensor) -> Tensor:
    """``(N, C, H, W)`` on [0, 1] -> uint8 with round-half-up, the same rounding as :func:`quantize`."""
    return torch.floor(x.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
