"""Blur kernels: the paper's defaults (docs/operators.md), arrays, files, and separable factors.

All kernels are float64 tensors (kh, kw), normalised to sum 1 unless asked otherwise. The blur is the
cross-correlation ``y[i, j] = sum_{u, v} k[u, v] x[i + u - kh // 2, j + v - kw // 2]`` (what
``torch.nn.functional.conv2d`` computes); for the symmetric built-in kernels it is also the convolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

KERNEL_KINDS = ("gaussian", "uniform", "anisotropic")
KERNEL_FILE_TYPES = (".npy", ".txt", ".csv", ".png")
#: A kernel to normalise must have sum(k) >= MIN_DC_FRACTION * sum(|k|): a smaller sum is a near-singular
#: (or sign-flipped) blur whose normalised taps would explode (sum 1e-9 -> taps of 1e9).
MIN_DC_FRACTION = 1e-2


def gaussian_1d(size: int, sigma: float) -> Tensor:
    """Taps exp(-x^2 / (2 sigma^2)) at x = -(size-1)/2 .. (size-1)/2, normalised: (size,)."""
    size, sigma = _check_size(size), float(sigma)
    if not sigma > 0:
        raise ValueError(f"Gaussian sigma must be > 0, got {sigma}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def uniform_1d(size: int) -> Tensor:
    """Box kernel of ``size`` taps 1/size: (size,)."""
    size = _check_size(size)
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def make_kernel(kind: str, kernel_size: int = 9, sigma: float = 10.0, sigma2: float = 20.0) -> tuple[Tensor, Tensor]:
    """Separable paper kernel as its two 1-D factors (vertical k_h, horizontal k_w).

    Args:
        kind: ``gaussian`` (both axes sigma), ``uniform`` (box), ``anisotropic`` (sigma vertically,
            sigma2 horizontally; the official ``Deblurring2D`` puts kernel1 on the rows).
        kernel_size: taps per axis.

    Returns:
        (k_h (kernel_size,), k_w (kernel_size,)); the 2-D kernel is their outer product.
    """
    if kind == "gaussian":
        k = gaussian_1d(kernel_size, sigma)
        return k, k.clone()
    if kind == "uniform":
        k = uniform_1d(kernel_size)
        return k, k.clone()
    if kind == "anisotropic":
        return gaussian_1d(kernel_size, sigma), gaussian_1d(kernel_size, sigma2)
    raise ValueError(f"unknown kernel kind {kind!r}; valid kinds: {', '.join(KERNEL_KINDS)} "
                     f"(or pass an array / a file path to deblur_kernel)")


def as_kernel(kernel: Tensor | np.ndarray | Sequence, normalize: bool = True) -> Tensor:
    """A user kernel (2-D array, or 1-D for a separable k outer k) as a float64 (kh, kw) tensor.

    Raises:
        ValueError: an empty or non-finite kernel; with ``normalize``, taps whose sum is negative or close to 0
            relative to their magnitude (less than :data:`MIN_DC_FRACTION` of ``sum |k|``).
    """
    k = torch.as_tensor(np.asarray(kernel, dtype=np.float64))
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.numel() == 0:
        raise ValueError(f"a blur kernel must be a non-empty 2-D array (kh, kw) or a 1-D array; got shape "
                         f"{tuple(k.shape)}")
    if not torch.isfinite(k).all():
        raise ValueError("the blur kernel contains NaN or inf")
    magnitude = float(k.abs().sum())
    if magnitude == 0:
        raise ValueError("the blur kernel is all zeros")
    if normalize:
        total = float(k.sum())
        if total < MIN_DC_FRACTION * magnitude:
            raise ValueError(f"the blur kernel's taps sum to {total:.3g} (sum of |taps| {magnitude:.3g}): a blur "
                             f"kernel needs a clearly positive sum (at least {MIN_DC_FRACTION:g} of sum |taps|), "
                             f"normalising this one would scale its taps by {1 / total if total else float('inf'):.3g}"
                             f"; check the kernel, or pass normalize=False to use its taps as they are")
        k = k / total
    return k


def load_kernel(path: str | Path, normalize: bool = True) -> Tensor:
    """Read a 2-D kernel from .npy, .txt/.csv (whitespace or comma separated) or .png (grayscale)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in KERNEL_FILE_TYPES:
        raise ValueError(f"unsupported kernel file {str(path)!r}; valid types: {', '.join(KERNEL_FILE_TYPES)}")
    if not path.is_file():
        raise ValueError(f"kernel file not found: {str(path)!r}")
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float64)
        else:
            arr = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2)
        return as_kernel(arr, normalize=normalize)
    except (ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"kernel file {str(path)!r}: {reason}") from None


def save_kernel(kernel: Tensor, directory: str | Path, stem: str = "kernel") -> list[Path]:
    """Write ``<stem>.npy`` (exact taps) and ``<stem>.png`` (scaled to its maximum, for viewing)."""
    from deqir.utils.images import atomic_write_bytes

    directory = Path(directory)
    k = kernel.detach().double().cpu().numpy()
    npy = atomic_write_bytes(directory / f"{stem}.npy", lambda tmp: _np_save(tmp, k))
    from PIL import Image

    peak = float(np.abs(k).max()) or 1.0
    img = Image.fromarray(np.clip(np.abs(k) / peak * 255 + 0.5, 0, 255).astype(np.uint8))
    png = atomic_write_bytes(directory / f"{stem}.png", lambda tmp: img.save(tmp, format="PNG"))
    return [npy, png]


def separable_factors(kernel: Tensor, rtol: float = 1e-10) -> tuple[Tensor, Tensor] | None:
    """(k_h, k_w) with outer(k_h, k_w) = kernel if the kernel has rank 1 (to rtol), else None."""
    from deqir.operators.base import single_thread

    with single_thread():
        u, s, vh = torch.linalg.svd(kernel.double())
    if s.numel() > 1 and float(s[1]) > rtol * float(s[0]):
        return None
    k_h, k_w = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()
    if float(k_h.sum()) < 0:  # sign convention: positive sums
        k_h, k_w = -k_h, -k_w
    return k_h, k_w


def _np_save(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def _check_size(size: int) -> int:
    if int(size) != size or int(size) < 1:
        raise ValueError(f"kernel_size must be a positive integer, got {size!r}")
    return int(size)
