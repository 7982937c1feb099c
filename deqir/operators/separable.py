"""Separable operators A X = M_h X M_w^T per channel, with their exact SVD from the two 1-D SVDs.

Used by bicubic super-resolution (``sr.py``), the zero-boundary true blur, and ``LegacySVDDeblur``: the
operator the official DDRM / DDNM / DeqIR code applies for ``deblur_*`` (docs/operators.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from deqir.operators.base import SVDOperator, cast, inverse_singulars, single_thread
from deqir.operators.kernels import save_kernel


class SeparableOperator(SVDOperator):
    """A X = M_h X M_w^T for every channel; M_h (m_h, H), M_w (m_w, W) with m_h <= H, m_w <= W.

    1-D singular values below ``zero_threshold`` are set to 0 (the official ZERO rule is applied per
    axis, before the 2-D products), and the operator applied is the truncated one, so A and A+ are an
    exact Moore-Penrose pair. Spectral layout: coefficients V_h^T X V_w (C, H, W); the (m_h, m_w) block
    with singulars s_h[a] s_w[b] first (channel-major), then the remaining null-space coefficients.

    Args:
        image_shape: (C, H, W).
        mat_h, mat_w: the 1-D matrices (float64).
        zero_threshold: threshold on the 1-D singular values.
    """

    def __init__(self, image_shape, mat_h: Tensor, mat_w: Tensor, zero_threshold: float = 3e-2) -> None:
        super().__init__(image_shape)
        _, h, w = self.image_shape
        if mat_h.shape[1] != h or mat_w.shape[1] != w or mat_h.shape[0] > h or mat_w.shape[0] > w:
            raise ValueError(f"separable matrices {tuple(mat_h.shape)}, {tuple(mat_w.shape)} "
                             f"do not fit H x W = {h} x {w}")
        if not math.isfinite(float(zero_threshold)) or float(zero_threshold) < 0:
            raise ValueError(f"zero_threshold must be >= 0, got {zero_threshold!r}")
        self.zero_threshold = float(zero_threshold)
        with single_thread():  # one-off small factorisations (see base.single_thread)
            for axis, mat in (("h", mat_h), ("w", mat_w)):
                u, s, vh = torch.linalg.svd(mat.double(), full_matrices=True)
                s = torch.where(s < self.zero_threshold, torch.zeros_like(s), s)
                v = vh.T.contiguous()
                m = s.numel()
                self.register_buffer(f"u_{axis}", u)
                self.register_buffer(f"s_{axis}", s)
                self.register_buffer(f"v_{axis}", v)
                self.register_buffer(f"a_{axis}", (u * s) @ v[:, :m].T)  # truncated M
                self.register_buffer(f"p_{axis}", (v[:, :m] * inverse_singulars(s)) @ u.T)  # its pinv
        mh, mw = mat_h.shape[0], mat_w.shape[0]
        grid = torch.arange(h * w).reshape(h, w)
        block = torch.zeros(h, w, dtype=torch.bool)
        block[:mh, :mw] = True
        self.register_buffer("_order", torch.cat([grid[block], grid[~block]]))

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return (self.image_shape[0], self.a_h.shape[0], self.a_w.shape[0])

    @staticmethod
    def _sandwich(left: Tensor, x: Tensor, right_t: Tensor) -> Tensor:
        """left @ x @ right_t over the last two dims, buffers cast to x."""
        return cast(left, x) @ x @ cast(right_t, x)

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return self._sandwich(self.a_h, x, self.a_w.T)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return self._sandwich(self.a_h.T, y, self.a_w)

    def A_pinv(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return self._sandwich(self.p_h, y, self.p_w.T)

    def V_T(self, x: Tensor) -> Tensor:
        self.check_image(x)
        coef = self._sandwich(self.v_h.T, x, self.v_w).flatten(-2)[..., self._order]  # (B, C, H*W)
        m = self.s_h.numel() * self.s_w.numel()
        return torch.cat([coef[..., :m].flatten(1), coef[..., m:].flatten(1)], dim=1)

    def V(self, z: Tensor) -> Tensor:
        c, h, w = self.image_shape
        m = self.s_h.numel() * self.s_w.numel()
        b = z.shape[0]
        coef = torch.cat([z[:, : c * m].reshape(b, c, m), z[:, c * m :].reshape(b, c, h * w - m)], dim=-1)
        grid = torch.empty_like(coef)
        grid[..., self._order] = coef
        return self._sandwich(self.v_h, grid.reshape(b, c, h, w), self.v_w.T)

    def U_T(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return self._sandwich(self.u_h.T, y, self.u_w).flatten(1)

    def U(self, s: Tensor) -> Tensor:
        return self._sandwich(self.u_h, s.reshape(s.shape[0], *self.measurement_shape), self.u_w.T)

    def singulars(self) -> Tensor:
        return torch.outer(self.s_h, self.s_w).flatten().repeat(self.image_shape[0])


class ZeroBoundaryBlur(SeparableOperator):
    """True separable blur with zero padding: conv2d(pad_zero(x), outer(k_h, k_w)), output H x W.

    Args:
        image_shape: (C, H, W).
        k_h, k_w: 1-D kernel factors (vertical, horizontal).
        zero_threshold: threshold on the 1-D singular values (0 = exactly conv2d).
    """

    def __init__(self, image_shape, k_h: Tensor, k_w: Tensor, zero_threshold: float = 3e-2) -> None:
        _, h, w = _shape(image_shape)
        super().__init__(image_shape, band_matrix(k_h, h), band_matrix(k_w, w), zero_threshold)
        self.register_buffer("kernel", torch.outer(k_h.double(), k_w.double()))

    def y_to_image(self, y: Tensor) -> Tensor:
        return y.clone()

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        return save_kernel(self.kernel, directory)

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, kernel={tuple(self.kernel.shape)}, boundary=zero, "
                f"zero_threshold={self.zero_threshold}")


class LegacySVDDeblur(SeparableOperator):
    """The deblurring operator the official DDRM / DDNM / DeqIR code applies (docs/operators.md).

    Reproduces, on purpose, the two inherited quirks of ``Deblurring`` / ``Deblurring2D``:

    1. the 1-D band matrix uses taps j in [i - k//2, i + k//2): the **last kernel tap is dropped** and the
       rest is not renormalised (zero boundary);
    2. the 2-D singular values s_h[a] s_w[b] are sorted (descending) and **tiled** over the channels,
       while the spectral coordinates are ordered rank-major / channel-interleaved (index 3 p + c). The
       coordinate of rank p in channel c is therefore scaled by sorted[(C p + c) mod (H W)] instead of
       sorted[p]: same singular vectors, permuted singular values, so A is *not* a blur.

    1-D singulars below ``zero_threshold`` (official 3e-2) are zeroed before the products. Ties in the
    sort (every s_a s_b = s_b s_a pair) are broken by the flat index a W + b (stable sort, as the CUDA
    radix sort the official code runs on); near-ties can order differently than a float32 SVD would.
    Where a 1-D band matrix has a zero or repeated singular value, the official operator itself depends on
    the SVD library's choice of basis (and signs) in that subspace; we use float64 LAPACK. Measured at
    256 x 256, float32- and float64-built operators differ by 3e-6 (gauss, aniso) and 1.5e-4 (uniform).
    For C = 1 the tiling is harmless and the operator equals the dropped-tap blur.
    """

    def __init__(self, image_shape, k_h: Tensor, k_w: Tensor, zero_threshold: float = 3e-2) -> None:
        _, h, w = _shape(image_shape)
        # Quirk 1 (docs/operators.md, legacy_svd): dropped last tap.
        super().__init__(image_shape, band_matrix(k_h, h, drop_last_tap=True),
                         band_matrix(k_w, w, drop_last_tap=True), zero_threshold)
        self.register_buffer("kernel", torch.outer(k_h.double(), k_w.double()))
        s2d = torch.outer(self.s_h, self.s_w).flatten()
        sorted_s, perm = torch.sort(s2d, descending=True, stable=True)
        self.register_buffer("_perm", perm)
        self.register_buffer("_sorted", sorted_s)
        # The same operator without gathers: the singular value each (channel, a, b) coefficient gets.
        c, h, w = self.image_shape
        sigma = sorted_s[(c * torch.arange(h * w)[None, :] + torch.arange(c)[:, None]) % (h * w)]  # (C, rank)
        grid = torch.empty_like(sigma)
        grid[:, perm] = sigma
        self.register_buffer("_sigma_map", grid.reshape(c, h, w))
        self.register_buffer("_sigma_inv_map", inverse_singulars(grid).reshape(c, h, w))

    def _coords(self, x: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """left^T X right, sorted by rank, channel-interleaved: (B, C, H, W) -> (B, H*W*C)."""
        coef = self._sandwich(left.T, x, right).flatten(-2)[..., self._perm]  # (B, C, HW) rank-major
        return coef.transpose(1, 2).reshape(x.shape[0], -1)

    def _image(self, z: Tensor, left: Tensor, right: Tensor) -> Tensor:
        c, h, w = self.image_shape
        coef = z.reshape(z.shape[0], h * w, c).transpose(1, 2)
        grid = torch.empty_like(coef)
        grid[..., self._perm] = coef
        return self._sandwich(left, grid.reshape(z.shape[0], c, h, w), right.T)

    def V_T(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return self._coords(x, self.v_h, self.v_w)

    def V(self, z: Tensor) -> Tensor:
        return self._image(z, self.v_h, self.v_w)

    def U_T(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        return self._coords(y, self.u_h, self.u_w)

    def U(self, s: Tensor) -> Tensor:
        return self._image(s, self.u_h, self.u_w)

    def singulars(self) -> Tensor:
        # Quirk 2 (docs/operators.md, legacy_svd): tiled (repeat), although the coordinates are channel-interleaved.
        return self._sorted.repeat(self.image_shape[0])

    # The applied operator is U diag(tiled s) V^T, not the band-matrix sandwich: with the singular values
    # laid out per 2-D coefficient (``_sigma_map``) it costs four small matmuls.
    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        coef = self._sandwich(self.v_h.T, x, self.v_w) * cast(self._sigma_map, x)
        return self._sandwich(self.u_h, coef, self.u_w.T)

    def A_adjoint(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        coef = self._sandwich(self.u_h.T, y, self.u_w) * cast(self._sigma_map, y)
        return self._sandwich(self.v_h, coef, self.v_w.T)

    def A_pinv(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        coef = self._sandwich(self.u_h.T, y, self.u_w) * cast(self._sigma_inv_map, y)
        return self._sandwich(self.v_h, coef, self.v_w.T)

    def y_to_image(self, y: Tensor) -> Tensor:
        return y.clone()

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        return save_kernel(self.kernel, directory)

    def extra_repr(self) -> str:
        return (f"image_shape={self.image_shape}, kernel={tuple(self.kernel.shape)}, legacy_svd=True, "
                f"zero_threshold={self.zero_threshold}")


def band_matrix(k: Tensor, n: int, drop_last_tap: bool = False) -> Tensor:
    """1-D zero-boundary correlation matrix (n, n): row i holds k[j - i + len(k)//2] at column j.

    With ``drop_last_tap`` only taps j in [i - k//2, i + k//2) are used (the official quirk: for odd k the
    last tap is lost, for even k nothing is); without it all taps, matching conv2d with padding (k//2
    before, k - 1 - k//2 after).
    """
    k = k.double()
    size = k.numel()
    half = size // 2
    taps = range(2 * half) if drop_last_tap else range(size)
    mat = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    for t in taps:
        cols = rows + t - half
        ok = (cols >= 0) & (cols < n)
        mat[rows[ok], cols[ok]] += k[t]
    return mat


def _shape(image_shape) -> tuple[int, int, int]:
    from deqir.operators.base import _as_image_shape

    return _as_image_shape(image_shape)
