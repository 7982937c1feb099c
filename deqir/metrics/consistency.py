"""Data consistency of a restoration: how far ``A(x0)`` is from the measurement ``y``.

* :func:`consistency` -- generic, per image ``||A(x0) - y||_p`` over all entries (default p = 2).
* :func:`colorization_consistency` -- Table 3's "Cons" (DDNM's colorization protocol), defined here as
  the **L1 sum** over pixels ``sum_ij |gray(x0)_ij - y_ij|`` on the [0, 1] scale, with
  ``gray(x) = (R + G + B) / 3``. DDNM's evaluation code is not public; the L1-sum-on-[0, 1] reading is
  the one that matches the published magnitudes (DDNM 45.07, DeqIR 43.15 on 256x256 images, i.e.
  about 7e-4 per pixel -- the 8-bit rounding floor of an exactly consistent result, see docs/metrics.md).

Everything is on the [0, 1] image scale; convert [-1, 1] tensors first.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["colorization_consistency", "consistency", "consistency_rms_limit", "gray"]


def gray(x: Tensor) -> Tensor:
    """DDNM's colorization operator: the channel mean, ``(N, C, H, W) -> (N, 1, H, W)``."""
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got {tuple(x.shape)}")
    return x.mean(dim=1, keepdim=True)


def consistency(A: Callable[[Tensor], Tensor], x0: Tensor, y: Tensor, ord: float = 2.0) -> Tensor:
    """Per-image ``||A(x0) - y||_ord`` over all entries of each measurement.

    Args:
        A: The forward operator, mapping a batch ``(N, ...)`` to measurements shaped like ``y``.
        x0: Restored images ``(N, C, H, W)`` on [0, 1] (the saved 8-bit image, for reported numbers).
        y: Measurements ``(N, ...)`` on the [0, 1] scale.
        ord: Vector norm order (2: Euclidean; 1: sum of absolute values).

    Returns:
        ``(N,)`` tensor.
    """
    r = A(x0) - y
    if r.shape[0] != x0.shape[0]:
        raise ValueError(f"A(x0) has batch {r.shape[0]}, x0 has {x0.shape[0]}")
    return r.reshape(r.shape[0], -1).double().norm(p=ord, dim=1)


def consistency_rms_limit(sigma_y: float) -> float:
    """The largest RMS of ``A(x0) - y`` (on [0, 1]) a restoration consistent with a photo of noise ``sigma_y``
    shows: 3 sigma_y plus 2/255 for the 8-bit rounding of the saved image (seen through A)."""
    return 3.0 * float(sigma_y) + 2.0 / 255.0


def colorization_consistency(
    x0: Tensor, y: Tensor, A: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Colorization "Cons": per image ``sum |A(x0) - y|`` (L1 sum, [0, 1] scale, lower is better).

    Args:
        x0: Restored colour images ``(N, 3, H, W)`` on [0, 1].
        y: Gray measurements ``(N, 1, H, W)`` on [0, 1]; a 3-channel ``y`` whose channels are equal
            (the saved ``A+ y`` image) is accepted and reduced to one channel.
        A: The colorization operator; default :func:`gray` (coefficients 1/3). Pass the task's own
            operator if it uses other coefficients (e.g. DDRM's 0.3333/0.3334/0.3333).

    Returns:
        ``(N,)`` float64 tensor.
    """
    if y.ndim == 4 and y.shape[1] == 3:
        if not (torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])):
            raise ValueError("a 3-channel y must be gray (equal channels); pass the (N, 1, H, W) measurement")
        y = y[:, :1]
    return consistency(A or gray, x0, y, ord=1.0)
