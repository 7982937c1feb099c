"""Base classes of the degradation operators y = A x (+ noise).

Conventions shared by every operator (see docs/operators.md):

* Images ``x`` are (B, C, H, W) on the [-1, 1] data scale; measurements ``y`` have an operator-defined
  shape that starts with the batch dimension B (``measurement_shape`` is the rest).
* ``A_pinv`` is the exact Moore-Penrose pseudo-inverse of the operator ``A`` actually applied, so
  ``A A+ A = A``, ``A+ A A+ = A+`` and ``P = A+ A`` is an orthogonal projector.
* Operators are ``torch.nn.Module`` objects whose constants are buffers, built in float64; ``.to(device,
  dtype)`` moves them, and every method also casts them to the input's dtype and device on the fly.
* Measurement noise ``sigma_y`` is a standard deviation on the [0, 1] intensity scale: in the [-1, 1]
  data space the added noise has std ``2 * sigma_y``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn


class Operator(nn.Module):
    """A linear degradation operator for images of one shape (C, H, W) and any batch size.

    Subclasses implement ``A``, ``A_pinv``, ``A_adjoint`` and ``measurement_shape``; the projectors,
    noisy measurement, noise gain and measurement picture follow from those.

    Args:
        image_shape: (C, H, W) of the images the operator acts on.
    """

    def __init__(self, image_shape: tuple[int, int, int] | list[int]) -> None:
        super().__init__()
        self.image_shape = _as_image_shape(image_shape)
        self._noise_gain: float | None = None

    # ---------------------------------------------------------------- the contract
    @property
    def measurement_shape(self) -> tuple[int, ...]:
        """Shape of one measurement (y without its batch dimension)."""
        raise NotImplementedError

    def A(self, x: Tensor) -> Tensor:
        """Forward model: x (B, C, H, W) -> y (B, *measurement_shape)."""
        raise NotImplementedError

    def A_pinv(self, y: Tensor) -> Tensor:
        """Moore-Penrose pseudo-inverse: y (B, *measurement_shape) -> (B, C, H, W)."""
        raise NotImplementedError

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Adjoint (transpose): y (B, *measurement_shape) -> (B, C, H, W)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    # ---------------------------------------------------------------- derived quantities
    def project_range(self, x: Tensor) -> Tensor:
        """Range-space projection A+ A x, (B, C, H, W) -> (B, C, H, W)."""
        return self.A_pinv(self.A(x))

    def project_null(self, x: Tensor) -> Tensor:
        """Null-space projection (I - A+ A) x, (B, C, H, W) -> (B, C, H, W)."""
        return x - self.project_range(x)

    def measure(self, x: Tensor, sigma_y: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Noisy measurement y = A x + 2 sigma_y n, n ~ N(0, I) drawn on the CPU in float32.

        Args:
            x: images (B, C, H, W) on [-1, 1].
            sigma_y: noise std on the [0, 1] intensity scale (the data space [-1, 1] sees 2 sigma_y).
            generator: CPU ``torch.Generator``; the noise values do not depend on the device or dtype.

        Returns:
            y (B, *measurement_shape).
        """
        sigma_y = check_sigma_y(sigma_y)
        y = self.A(x)
        if sigma_y == 0.0:
            return y
        return y + 2.0 * sigma_y * self._measurement_noise(y, generator)

    def _measurement_noise(self, y: Tensor, generator: torch.Generator | None) -> Tensor:
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"measure() needs a CPU torch.Generator (noise is drawn on the CPU), got one on "
                             f"{generator.device}")
        n = torch.randn(tuple(y.shape), generator=generator, dtype=torch.float32, device="cpu")
        return n.to(device=y.device, dtype=y.dtype)

    def pinv_noise_gain(self) -> float:
        """sqrt(E|A+ n|^2 / E|A+ A w|^2) for white n (measurement space) and w (image space).

        The factor by which white measurement noise reaches image space through A+, relative to the
        range space. This default estimates both expectations with 4-64 seeded Gaussian probes (float64,
        CPU); SVD operators override it with the exact RMS of 1/s over the nonzero singular values.
        """
        if self._noise_gain is None:
            g = torch.Generator().manual_seed(1234)
            dev, dt = self._probe_device(), torch.float64
            probes = min(64, max(4, -(-200_000 // math.prod(self.image_shape))))  # ~2e5 samples in all
            n = torch.randn((probes, *self.measurement_shape), generator=g, dtype=dt).to(dev)
            w = torch.randn((probes, *self.image_shape), generator=g, dtype=dt).to(dev)
            num = self.A_pinv(n).pow(2).sum()
            den = self.project_range(w).pow(2).sum()
            self._noise_gain = float(torch.sqrt(num / den)) if float(den) > 0 else 0.0
        return self._noise_gain

    def y_to_image(self, y: Tensor) -> Tensor:
        """A viewable picture of the measurement, (B, *measurement_shape) -> (B, C, H, W) on [-1, 1]."""
        return self.A_pinv(y)

    def observed(self, y: Tensor) -> Tensor:
        """A given measurement-space picture (a user's photo) as this operator measures it, (B, *measurement_shape):
        unchanged, except for operators that observe only part of it (inpainting: zeros where pixels are missing,
        so a damaged photo's hole contents never count as measured)."""
        return y

    def restored_view(self, x: Tensor) -> Tensor:
        """The part of an image-space tensor (..., H, W) the user sees as the restoration: all of it, except for
        operators whose image extends beyond the measured photo (the valid-boundary blur keeps the photo's grid)."""
        return x

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        """Save what defines the operator (mask, kernel, ...) into ``directory``; returns the paths."""
        return []

    # ---------------------------------------------------------------- validation helpers
    def check_image(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless x is a (B, C, H, W) batch of this operator's image shape."""
        if not isinstance(x, Tensor):
            raise ValueError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{type(self).__name__} was built for images of shape (B, {', '.join(map(str, self.image_shape))}); "
                f"got a tensor of shape {tuple(x.shape)}. Build the operator with image_shape="
                f"{tuple(x.shape[1:]) if x.ndim == 4 else '(C, H, W)'} instead.")

    def check_measurement(self, y: Tensor) -> None:
        """Raise ``ValueError`` unless y is (B, *measurement_shape)."""
        if not isinstance(y, Tensor):
            raise ValueError(f"expected a torch.Tensor measurement, got {type(y).__name__}")
        if tuple(y.shape[1:]) != tuple(self.measurement_shape):
            dims = ", ".join(map(str, self.measurement_shape))
            raise ValueError(f"{type(self).__name__} measurements have shape (B, {dims}); "
                             f"got a tensor of shape {tuple(y.shape)}")

    def _probe_device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}"


class SVDOperator(Operator):
    """Operator with an explicit SVD A = U diag(s) V^T (the DDRM contract).

    Spectral vectors are flat (B, D) tensors, D = C * H * W; their first ``m = len(singulars())``
    entries pair with the singular values (zeros allowed), the rest span the null space of A.
    ``U`` maps (B, m) into measurement space isometrically (U_T(U(s)) = s); for the operators in this
    package U is square except for inpainting, whose image-shaped y only uses the observed entries.

    Subclasses implement ``V``, ``V_T``, ``U``, ``U_T`` and ``singulars``; ``A``, ``A_pinv`` and
    ``A_adjoint`` default to the spectral route and are overridden by faster exact forms.
    """

    def V(self, z: Tensor) -> Tensor:
        """Spectral -> image: z (B, D) -> (B, C, H, W)."""
        raise NotImplementedError

    def V_T(self, x: Tensor) -> Tensor:
        """Image -> spectral: x (B, C, H, W) -> (B, D)."""
        raise NotImplementedError

    def U(self, s: Tensor) -> Tensor:
        """(B, m) -> measurement (B, *measurement_shape). Default: U = I (measurement entries are the basis)."""
        return s.reshape(s.shape[0], *self.measurement_shape)

    def U_T(self, y: Tensor) -> Tensor:
        """Measurement (B, *measurement_shape) -> (B, m). Default: U = I."""
        self.check_measurement(y)
        return y.reshape(y.shape[0], -1)

    def singulars(self) -> Tensor:
        """Singular values (m,), zeros included (same dtype/device as the buffers)."""
        raise NotImplementedError

    def A(self, x: Tensor) -> Tensor:
        self.check_image(x)
        s = self.singulars().to(x)
        return self.U(s * self.V_T(x)[:, : s.numel()])

    def A_adjoint(self, y: Tensor) -> Tensor:
        s = self.singulars().to(y)
        return self.V(_pad_spectral(s * self.U_T(y), self.numel_image))

    def A_pinv(self, y: Tensor) -> Tensor:
        s = self.singulars().to(y)
        return self.V(_pad_spectral(inverse_singulars(s) * self.U_T(y), self.numel_image))

    def pinv_noise_gain(self) -> float:
        """Exact: RMS of 1/s over the nonzero singular values."""
        s = self.singulars().double()
        s = s[s > 0]
        return float((1.0 / s).pow(2).mean().sqrt()) if s.numel() else 0.0

    @property
    def numel_image(self) -> int:
        return math.prod(self.image_shape)


# -------------------------------------------------------------------- helpers
def inverse_singulars(s: Tensor) -> Tensor:
    """1/s where s > 0, else 0 (the Moore-Penrose rule for zeroed singular values)."""
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


def _pad_spectral(z: Tensor, d: int) -> Tensor:
    """(B, m) -> (B, d) with zeros appended (the null-space coordinates)."""
    if z.shape[1] == d:
        return z
    return torch.cat([z, z.new_zeros(z.shape[0], d - z.shape[1])], dim=1)


def check_sigma_y(sigma_y: float) -> float:
    """Validate a measurement-noise std on the [0, 1] scale (finite, >= 0)."""
    try:
        value = float(sigma_y)
    except (TypeError, ValueError):
        raise ValueError(f"sigma_y must be a number (noise std on the [0, 1] intensity scale), "
                         f"got {sigma_y!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"sigma_y must be finite and >= 0 (noise std on the [0, 1] intensity scale, e.g. 0.05); "
                         f"got {sigma_y!r}")
    return value


def _as_image_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        out = ()
    if len(out) != 3 or any(s <= 0 for s in out) or any(int(s) != s for s in shape):
        raise ValueError(f"image_shape must be three positive integers (C, H, W), got {shape!r}")
    return out  # type: ignore[return-value]


@contextmanager
def single_thread():
    """Run small one-off factorisations (1-D SVDs at construction) on one intra-op thread.

    Multi-threaded LAPACK on matrices this small only synchronises; on a machine whose cores are busy a
    64 x 256 SVD took 1.6 s with 2 threads and 2 ms with one. The previous setting is restored.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def cast(buf: Tensor, like: Tensor) -> Tensor:
    """A buffer in the dtype and on the device of ``like`` (no copy when they already match)."""
    return buf.to(device=like.device, dtype=like.dtype)


def check_divisible(image_shape: tuple[int, int, int], scale: int, what: str) -> None:
    """Raise ``ValueError`` unless H and W are multiples of ``scale``."""
    _, h, w = image_shape
    for name, n in (("height", h), ("width", w)):
        if n % scale:
            lo, hi = (n // scale) * scale, (n // scale + 1) * scale
            valid = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise ValueError(f"{what}: image {name} {n} is not divisible by the scale factor {scale}; "
                             f"use a {name} that is a multiple of {scale} (e.g. {valid}) or crop the image")
