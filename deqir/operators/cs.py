"""Compressed sensing with a seeded subset of Walsh-Hadamard coefficients (docs/operators.md, ``cs_walshhadamard``)."""
from __future__ import annotations

import torch
from torch import Tensor

from deqir.operators.base import SVDOperator


class WalshHadamardCS(SVDOperator):
    """y_c = (H x_c)[S]: per channel, the orthonormal Walsh-Hadamard transform of the image flattened
    row-major (N = H W entries, Sylvester / natural order), keeping the coefficients S = the first
    N // ratio entries of a seeded random permutation of 0..N-1 (as the official ``WalshHadamardCS``,
    whose ``randperm`` indexes the transform output). Shapes: (B, C, H, W) -> (B, C, N // ratio).

    The rows are orthonormal, so A+ = A^T (zero-fill, inverse transform), singular values are all 1.
    SVD: V_T is the full transform with the kept coefficients of every channel first.

    Args:
        image_shape: (C, H, W) with H W a power of two (H and W powers of two).
        ratio: compression ratio N / m (2, 4, 8, ...; the official sampler hard-codes 2). Any real >= 1.
        seed: seed of the coefficient selection.
    """

    def __init__(self, image_shape, ratio: float = 2, seed: int = 0) -> None:
        super().__init__(image_shape)
        _, h, w = self.image_shape
        n = h * w
        if n & (n - 1):
            raise ValueError(f"cs_walsh_hadamard needs H * W to be a power of two (e.g. 32 x 32, 64 x 64, 256 x 256); "
                             f"got {h} x {w} = {n}")
        if isinstance(ratio, bool) or not float(ratio) >= 1:
            raise ValueError(f"ratio must be a number >= 1 (kept fraction 1 / ratio; e.g. 2, 4, 8), got {ratio!r}")
        self.ratio = float(ratio)
        self.seed = int(seed)
        m = int(n / self.ratio)
        if m < 1:
            raise ValueError(f"ratio {ratio} keeps no coefficient of a {h} x {w} image")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        self.register_buffer("_select", perm[:m].clone())
        self.register_buffer("_rest", perm[m:].clone())

    @property
    def num_measurements(self) -> int:
        return self._select.numel()

    @property
    def measurement_shape(self) -> tuple[int, ...]:
        return (self.image_shape[0], self.num_measurements)

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        return fwht(x.flatten(-2))[..., self._select]

    def A_adjoint(self, y: Tensor) -> Tensor:
        self.check_measurement(y)
        coef = y.new_zeros(*y.shape[:-1], self.image_shape[1] * self.image_shape[2])
        coef[..., self._select] = y
        return fwht(coef).reshape(y.shape[0], *self.image_shape)

    A_pinv = A_adjoint

    def pinv_noise_gain(self) -> float:
        return 1.0

    def V_T(self, x: Tensor) -> Tensor:
        self.check_image(x)
        coef = fwht(x.flatten(-2))
        return torch.cat([coef[..., self._select].flatten(1), coef[..., self._rest].flatten(1)], dim=1)

    def V(self, z: Tensor) -> Tensor:
        c, h, w = self.image_shape
        m, b = self.num_measurements, z.shape[0]
        coef = z.new_empty(b, c, h * w)
        coef[..., self._select] = z[:, : c * m].reshape(b, c, m)
        coef[..., self._rest] = z[:, c * m :].reshape(b, c, h * w - m)
        return fwht(coef).reshape(b, c, h, w)

    def singulars(self) -> Tensor:
        return torch.ones(self.image_shape[0] * self.num_measurements, dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, ratio={self.ratio:g}, seed={self.seed}, m={self.num_measurements}"


def fwht(v: Tensor) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (length a power of two), natural order.

    Self-inverse: fwht(fwht(v)) = v. Uses H_n = H_16 (x) H_16 (x) ... (Sylvester), one small matmul per
    radix-16 stage, so a 256 x 256 image takes 4 passes over memory instead of 16.
    """
    n = v.shape[-1]
    lead = v.shape[:-1]
    out = v.reshape(-1, n)
    done = 1  # product of the stage sizes already applied (trailing factors)
    while done < n:
        m = min(16, n // done)
        h = _sylvester(m, v.dtype, v.device)
        out = (h @ out.reshape(-1, m, done)).reshape(-1, n) if done > 1 else out.reshape(-1, m) @ h.T
        out = out.reshape(-1, n)
        done *= m
    return out.reshape(*lead, n) * n**-0.5


def _sylvester(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Unnormalised Sylvester Hadamard matrix (m, m), m a power of two."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h
