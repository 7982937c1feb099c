"""Boundary-aware blur for real photos: the photo is the *valid* part of a blur of a slightly larger image.

A real photo's border was blurred with pixels outside the frame, so no boundary rule (circular, zero,
reflect) describes it exactly. The model that needs none (docs/operators.md, "Real photos"): the unknown
image x is (C, H + kh - 1, W + kw - 1), the photo y = (k * x)_valid is (C, H, W), each measured pixel the
kernel-weighted sum of image pixels that all exist. The extra border of x is simply unobserved (it lies
partly in the null space of A, where the diffusion prior fills it), so blur made by any boundary rule, by a
camera, or by deqir's own operators fits the model.

* :class:`ValidSeparableBlur`: separable (rank-1) kernels, the built-in Gaussian / box / anisotropic
  ones. A X = M_h X M_w^T with the (H, H + kh - 1) valid-correlation matrices; exact SVD from the two
  1-D SVDs (:class:`~deqir.operators.separable.SeparableOperator`), 1-D singular values below
  ``zero_threshold`` zeroed (the official ZERO rule), so (A, A+) stay an exact Moore-Penrose pair.
* :class:`ValidBlur`: any 2-D kernel (a PSF file). A = conv2d without padding, A^T its transpose, A+ by
  CGLS (:func:`~deqir.operators.general.cgls`), exact to the CG tolerance.

``restored_view`` crops an image-space tensor to the photo's own grid (pixel i of y is centred on pixel
i + kh // 2 of x), ``y_to_image`` pads y back with its edge pixels, so ``restored_view(y_to_image(y)) = y``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from deqir.operators.base import _as_image_shape, cast
from deqir.operators.general import GeneralLinearOperator
from deqir.operators.kernels import save_kernel
from deqir.operators.separable import SeparableOperator


def valid_image_shape(measurement_shape, kernel_shape) -> tuple[int, int, int]:
    """(C, H + kh - 1, W + kw - 1): the image whose valid blur is a (C, H, W) photo."""
    c, h, w = (int(s) for s in measurement_shape)
    kh, kw = (int(s) for s in kernel_shape)
    return c, h + kh - 1, w + kw - 1


def valid_matrix(k: Tensor, n_out: int) -> Tensor:
    """1-D valid correlation (n_out, n_out + len(k) - 1): row i holds k[t] at column i + t."""
    k = k.double()
    size = k.numel()
    mat = torch.zeros(n_out, n_out + size - 1, dtype=torch.float64)
    rows = torch.arange(n_out)
    for t in range(size):
        mat[rows, rows + t] = k[t]
    return mat


class _ValidGrid:
    """What both valid blurs share: the photo's grid inside the image (``restored_view``, ``y_to_image``)."""

    image_shape: tuple[int, int, int]
    kernel: Tensor

    @property
    def margins(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) image pixels outside the photo's grid."""
        kh, kw = self.kernel.shape
        return kh // 2, kh - 1 - kh // 2, kw // 2, kw - 1 - kw // 2

    def restored_view(self, x: Tensor) -> Tensor:
        top, bottom, left, right = self.margins
        h, w = x.shape[-2:]
        return x[..., top : h - bottom, left : w - right]

    def y_to_image(self, y: Tensor) -> Tensor:
        top, bottom, left, right = self.margins
        return F.pad(y, (left, right, top, bottom), mode="replicate")

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        return save_kernel(self.kernel, directory)


class ValidSeparableBlur(_ValidGrid, SeparableOperator):
    """Valid blur with a separable kernel outer(k_h, k_w): image (C, H, W) -> photo (C, H - kh + 1, W - kw + 1).

    Args:
        image_shape: (C, H, W) of the unknown image (use :func:`valid_image_shape` for a photo's size).
        k_h, k_w: 1-D kernel factors (vertical, horizontal).
        zero_threshold: threshold on the 1-D singular values (0 = exactly the valid conv2d).

    Example:
        >>> import torch
        >>> from deqir.operators.kernels import make_kernel
        >>> op = ValidSeparableBlur((3, 20, 20), *make_kernel("gaussian", 5, 10.0))
        >>> op.measurement_shape
        (3, 16, 16)
    """

    def __init__(self, image_shape, k_h: Tensor, k_w: Tensor, zero_threshold: float = 3e-2) -> None:
        _, h, w = _as_image_shape(image_shape)
        kh, kw = k_h.numel(), k_w.numel()
        if kh > h or kw > w:
            raise ValueError(f"the blur kernel ({kh} x {kw}) is larger than the image ({h} x {w})")
        super().__init__(image_shape, valid_matrix(k_h, h - kh + 1), valid_matrix(k_w, w - kw + 1), zero_threshold)
        self.register_buffer("kernel", torch.outer(k_h.double(), k_w.double()))

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, kernel={tuple(self.kernel.shape)}, boundary=valid, "
                f"zero_threshold={self.zero_threshold}")


class ValidBlur(_ValidGrid, GeneralLinearOperator):
    """Valid blur with any 2-D kernel (cross-correlation, docs/operators.md); A+ by CGLS.

    Args:
        image_shape: (C, H, W) of the unknown image; the photo is (C, H - kh + 1, W - kw + 1).
        kernel: (kh, kw) taps.
        max_iter, tol: CGLS settings of ``A_pinv`` (relative normal-equation residual).
    """

    def __init__(self, image_shape, kernel: Tensor, *, max_iter: int = 200, tol: float = 1e-6) -> None:
        c, h, w = _as_image_shape(image_shape)
        kernel = torch.as_tensor(kernel, dtype=torch.float64)
        if kernel.ndim != 2 or kernel.shape[0] > h or kernel.shape[1] > w:
            raise ValueError(f"the blur kernel must be 2-D and fit the image: kernel {tuple(kernel.shape)}, "
                             f"image H x W = {h} x {w}")
        kh, kw = kernel.shape
        super().__init__(self._conv, (c, h, w), self._conv_t, max_iter=max_iter, tol=tol,
                         measurement_shape=(c, h - kh + 1, w - kw + 1))
        self.register_buffer("kernel", kernel.clone())

    def _weight(self, like: Tensor) -> Tensor:
        c = self.image_shape[0]
        k = cast(self.kernel, like)
        return k[None, None].expand(c, 1, *k.shape)

    def _conv(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self._weight(x), groups=self.image_shape[0])

    def _conv_t(self, y: Tensor) -> Tensor:
        return F.conv_transpose2d(y, self._weight(y), groups=self.image_shape[0])

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, kernel={tuple(self.kernel.shape)}, boundary=valid, "
                f"max_iter={self.max_iter}, tol={self.tol:g}")
