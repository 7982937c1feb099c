"""Super-resolution: average pooling and bicubic (Keys a = -0.5) downsampling by an integer factor."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from deqir.operators.base import SVDOperator, cast, check_divisible
from deqir.operators.separable import SeparableOperator


class AveragePoolSR(SVDOperator):
    """y = mean of each r x r block: (B, C, H, W) -> (B, C, H/r, W/r).

    A+ is nearest-neighbour replication (exact: A A^T = I / r^2), A^T = replication / r^2. Every
    singular value is 1/r (so ``pinv_noise_gain() == r``). SVD: V is the orthonormal 2-D DCT-II of each
    block (its first vector is the constant 1/r); the block DC terms come first, channel-major.

    Args:
        image_shape: (C, H, W), H and W multiples of ``scale``.
        scale: the factor r (docs/operators.md: 2, 4; 32 for the diversity figure; any integer >= 1 works).

    Example:
        >>> import torch
        >>> op = AveragePoolSR((3, 8, 8), scale=2)
        >>> op.A(torch.ones(1, 3, 8, 8)).shape
        torch.Size([1, 3, 4, 4])
    """

    def __init__(self, image_shape, scale: int = 4) -> None:
        super().__init__(image_shape)
        self.scale = _check_scale(scale)
        check_divisible(self.image_shape, self.scale, "sr_avgpool")
        self.register_buffer("_dct", dct_matrix(self.scale))

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        c, h, w = self.image_shape
        return (c, h // self.scale, w // self.scale)

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return F.avg_pool2d(x, self.scale)

    def A_pinv(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        r = self.scale
        return y.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1)

    def A_adjoint(self, y: Tensor) -> Tensor:
        return self.A_pinv(y) / self.scale**2

    def y_to_image(self, y: Tensor) -> Tensor:
        return self.A_pinv(y)

    def _blocks(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        r = self.scale
        return x.reshape(b, c, h // r, r, w // r, r)

    def V_T(self, x: Tensor) -> Tensor:
        self.check_image(x)
        d = cast(self._dct, x)
        coef = torch.einsum("ui,vj,bchiwj->bchwuv", d, d, self._blocks(x)).flatten(-2)  # (B, C, h, w, r^2)
        return torch.cat([coef[..., 0].flatten(1), coef[..., 1:].flatten(1)], dim=1)

    def V(self, z: Tensor) -> Tensor:
        c, hs, ws = self.measurement_shape
        r, b = self.scale, z.shape[0]
        m = c * hs * ws
        coef = torch.cat([z[:, :m].reshape(b, c, hs, ws, 1), z[:, m:].reshape(b, c, hs, ws, r * r - 1)], dim=-1)
        d = cast(self._dct, z)
        x = torch.einsum("ui,vj,bchwuv->bchiwj", d, d, coef.reshape(b, c, hs, ws, r, r))
        return x.reshape(b, *self.image_shape)

    def singulars(self) -> Tensor:
        return torch.full((math.prod(self.measurement_shape),), 1.0 / self.scale, dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, scale={self.scale}"


class BicubicSR(SeparableOperator):
    """Bicubic downsampling as DDRM / DDNM's ``SRConv`` (docs/operators.md): (B, C, H, W) -> (B, C, H/r, W/r).

    Separable strided correlation with the 4r-tap kernel k[i] = cubic((i - 2r + 0.5) / r) (Keys,
    a = -0.5), normalised to sum 1; output pixel o reads centre i = r//2 + o r, taps i - 2r .. i + 2r - 1,
    half-sample symmetric ("reflect") boundary. The 1-D singular values below ``zero_threshold``
    (official 3e-2) are zeroed; for the bicubic kernel they are all >= 0.12 at sizes >= 32, so the
    applied operator equals the strided convolution. The 2-D singulars are correctly matched to their
    channels (no tiling quirk here).

    Args:
        image_shape: (C, H, W), H and W multiples of ``scale``.
        scale: the factor r (2, 4, 8, 16, 32, any integer >= 1).
        zero_threshold: threshold on the 1-D singular values.
    """

    def __init__(self, image_shape, scale: int = 4, zero_threshold: float = 3e-2) -> None:
        from deqir.operators.base import _as_image_shape

        shape = _as_image_shape(image_shape)
        scale = _check_scale(scale)
        check_divisible(shape, scale, "sr_bicubic")
        _, h, w = shape
        k = bicubic_kernel(scale)
        super().__init__(shape, strided_matrix(k, h, scale), strided_matrix(k, w, scale), zero_threshold)
        self.scale = scale

    def y_to_image(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        r = self.scale
        return y.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1)

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, scale={self.scale}, zero_threshold={self.zero_threshold}"


def keys_cubic(t: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel (a = -0.5 is the classical bicubic)."""
    t = t.abs()
    inner = (a + 2) * t**3 - (a + 3) * t**2 + 1
    outer = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return torch.where(t <= 1, inner, torch.where(t < 2, outer, torch.zeros_like(t)))


def bicubic_kernel(scale: int) -> Tensor:
    """The 4r-tap antialiasing bicubic kernel of SRConv, normalised: (4 r,)."""
    i = torch.arange(4 * scale, dtype=torch.float64)
    k = keys_cubic((i - math.floor(2 * scale) + 0.5) / scale)
    return k / k.sum()


def strided_matrix(k: Tensor, n: int, stride: int) -> Tensor:
    """(n // stride, n) matrix of the strided correlation with half-sample symmetric boundary."""
    half = k.numel() // 2
    mat = torch.zeros(n // stride, n, dtype=torch.float64)
    rows = torch.arange(n // stride)
    centres = stride // 2 + rows * stride
    for t in range(k.numel()):
        j = (centres + t - half) % (2 * n)  # symmetric extension has period 2n
        j = torch.where(j >= n, 2 * n - 1 - j, j)
        mat.index_put_((rows, j), k[t].expand(rows.numel()), accumulate=True)
    return mat


def dct_matrix(n: int) -> Tensor:
    """Orthonormal DCT-II matrix (n, n); row 0 is the constant 1/sqrt(n)."""
    i = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (i[None, :] + 0.5) * i[:, None] / n) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def _check_scale(scale) -> int:
    if isinstance(scale, bool) or int(scale) != scale or int(scale) < 1:
        raise ValueError(f"scale must be a positive integer (e.g. 2, 4, 8, 16, 32), got {scale!r}")
    return int(scale)
