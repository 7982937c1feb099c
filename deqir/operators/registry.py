"""``make_operator(name, image_shape, **params)``: every task of the paper by name, plain-value parameters.

Each name becomes a Hydra ``task=`` choice; parameters are ints, floats, strings and lists only.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch

from deqir.operators.base import Operator, _as_image_shape
from deqir.operators.blur import CircularBlur
from deqir.operators.colorize import Colorization
from deqir.operators.compose import ComposedOperator
from deqir.operators.cs import WalshHadamardCS
from deqir.operators.denoise import Denoising
from deqir.operators.inpaint import Inpainting
from deqir.operators.kernels import as_kernel, load_kernel, make_kernel, separable_factors
from deqir.operators.masks import make_mask
from deqir.operators.null import Unconditional
from deqir.operators.separable import LegacySVDDeblur, ZeroBoundaryBlur
from deqir.operators.sr import AveragePoolSR, BicubicSR
from deqir.operators.valid_blur import ValidBlur, ValidSeparableBlur

BOUNDARIES = ("circular", "zero", "valid")  # valid: the photo is the valid part of the blur (real photos)
ZERO = 3e-2  # the official singular-value threshold (docs/operators.md)


def _blur(shape, k_h, k_w, kernel2d, legacy_svd: bool, boundary: str | None, zero_threshold: float) -> Operator:
    """Dispatch a kernel to the circular FFT blur, the zero-boundary separable blur or the legacy operator."""
    if boundary is not None and boundary not in BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; valid: {', '.join(BOUNDARIES)}")
    if legacy_svd:
        if boundary in ("circular", "valid"):
            raise ValueError("legacy_svd reproduces the official zero-boundary operator; "
                             "use boundary='zero' or leave it unset")
        boundary = "zero"
    boundary = boundary or "circular"
    if boundary == "circular":
        return CircularBlur(shape, kernel2d if kernel2d is not None else torch.outer(k_h, k_w), zero_threshold)
    if boundary == "valid":  # separable kernels: exact SVD; any other kernel: A+ by CGLS (valid_blur.py)
        factors = (k_h, k_w) if k_h is not None else separable_factors(kernel2d)
        if factors is None:
            return ValidBlur(shape, kernel2d)
        return ValidSeparableBlur(shape, factors[0], factors[1], zero_threshold)
    if k_h is None:
        factors = separable_factors(kernel2d)
        if factors is None:
            raise ValueError("boundary='zero' and legacy_svd need a separable (rank-1) kernel; this kernel is not "
                             "separable: use boundary='circular'")
        k_h, k_w = factors
    cls = LegacySVDDeblur if legacy_svd else ZeroBoundaryBlur
    return cls(shape, k_h, k_w, zero_threshold)


def sr_bicubic(image_shape, scale: int = 4, zero_threshold: float = ZERO) -> Operator:
    return BicubicSR(image_shape, scale, zero_threshold)


def sr_avgpool(image_shape, scale: int = 4) -> Operator:
    return AveragePoolSR(image_shape, scale)


def deblur_gauss(image_shape, kernel_size: int = 5, sigma: float = 10.0, legacy_svd: bool = False,
                 boundary: str | None = None, zero_threshold: float = ZERO) -> Operator:
    k_h, k_w = make_kernel("gaussian", kernel_size, sigma)
    return _blur(image_shape, k_h, k_w, None, legacy_svd, boundary, zero_threshold)


def deblur_uniform(image_shape, kernel_size: int = 9, legacy_svd: bool = False, boundary: str | None = None,
                   zero_threshold: float = ZERO) -> Operator:
    k_h, k_w = make_kernel("uniform", kernel_size)
    return _blur(image_shape, k_h, k_w, None, legacy_svd, boundary, zero_threshold)


def deblur_aniso(image_shape, kernel_size: int = 9, sigma: float = 1.0, sigma2: float = 20.0,
                 legacy_svd: bool = False, boundary: str | None = None, zero_threshold: float = ZERO) -> Operator:
    k_h, k_w = make_kernel("anisotropic", kernel_size, sigma, sigma2)
    return _blur(image_shape, k_h, k_w, None, legacy_svd, boundary, zero_threshold)


def deblur_kernel(image_shape, kernel: str | Sequence | None = None, kernel_path: str | None = None,
                  kernel_size: int = 9, sigma: float = 10.0, sigma2: float = 20.0, normalize: bool = True,
                  legacy_svd: bool = False, boundary: str | None = None, zero_threshold: float = ZERO) -> Operator:
    """A kernel given as an array (nested list), a file (``kernel_path``) or a kind name (gaussian, ...)."""
    if (kernel is None) == (kernel_path is None):
        raise ValueError("deblur_kernel needs exactly one of kernel (an array or a kind name: gaussian, uniform, "
                         "anisotropic) and kernel_path (.npy, .txt, .csv or .png)")
    if isinstance(kernel, str):
        k_h, k_w = make_kernel(kernel, kernel_size, sigma, sigma2)
        return _blur(image_shape, k_h, k_w, None, legacy_svd, boundary, zero_threshold)
    k2d = load_kernel(kernel_path, normalize) if kernel_path is not None else as_kernel(kernel, normalize)
    return _blur(image_shape, None, None, k2d, legacy_svd, boundary, zero_threshold)


def inpaint(image_shape, mask_type: str = "text", mask_path: str | None = None, missing_ratio: float = 0.5,
            box_size: int | Sequence[int] | None = None, stripe_width: int | None = None, seed: int = 0,
            mask: Sequence | None = None) -> Operator:
    shape = _as_image_shape(image_shape)
    if mask is not None:
        return Inpainting(shape, torch.as_tensor(mask, dtype=torch.float64))
    m = make_mask(mask_type, shape[1], shape[2], seed=seed, missing_ratio=missing_ratio, box_size=box_size,
                  stripe_width=stripe_width, mask_path=mask_path)
    return Inpainting(shape, m)


def colorize(image_shape, luma_weights: str | Sequence[float] = "equal") -> Operator:
    return Colorization(image_shape, luma_weights)


def cs_walsh_hadamard(image_shape, ratio: float = 2, seed: int = 0) -> Operator:
    return WalshHadamardCS(image_shape, ratio, seed)


def denoise(image_shape) -> Operator:
    return Denoising(image_shape)


def generate(image_shape) -> Operator:
    """Unconditional generation: nothing is measured (``task=generate``)."""
    return Unconditional(image_shape)


def compose(image_shape, operators: Sequence[Mapping] = (), pinv: str = "exact", max_iter: int = 200,
            tol: float = 1e-6) -> Operator:
    """``operators``: [{"name": ..., **params}, ...], applied first to last; shapes are chained."""
    if len(operators) < 2:
        raise ValueError("compose needs operators=[{name: ..., ...}, {name: ..., ...}] "
                         "(at least two, first applied first)")
    built: list[Operator] = []
    shape = _as_image_shape(image_shape)
    for spec in operators:
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(f"each composed operator must be a mapping with a 'name' key, got {spec!r}")
        params = {k: v for k, v in spec.items() if k != "name"}
        if len(shape) != 3:
            raise ValueError(f"{built[-1].__class__.__name__} measurements {shape} are not images; it must come last")
        op = make_operator(str(spec["name"]), shape, **params)
        built.append(op)
        shape = tuple(op.measurement_shape)
    return ComposedOperator(built, pinv=pinv, max_iter=max_iter, tol=tol)


_KERNEL_KINDS = {"deblur_gauss": "gaussian", "deblur_uniform": "uniform", "deblur_aniso": "anisotropic"}


def blur_kernel(name: str, **params) -> torch.Tensor:
    """The 2-D kernel (kh, kw) the blur operator ``name`` would use with ``params`` (float64)."""
    builder = _BUILDERS[name]
    sig = inspect.signature(builder).parameters
    p = {k: v.default for k, v in sig.items() if k != "image_shape" and v.default is not inspect.Parameter.empty}
    p.update(params)
    if name == "deblur_kernel":
        if (p["kernel"] is None) == (p["kernel_path"] is None):
            raise ValueError("deblur_kernel needs exactly one of kernel (an array or a kind name: gaussian, uniform, "
                             "anisotropic) and kernel_path (.npy, .txt, .csv or .png)")
        if isinstance(p["kernel"], str):
            k_h, k_w = make_kernel(p["kernel"], p["kernel_size"], p["sigma"], p["sigma2"])
            return torch.outer(k_h, k_w)
        if p["kernel_path"] is not None:
            return load_kernel(p["kernel_path"], p["normalize"])
        return as_kernel(p["kernel"], p["normalize"])
    if name not in _KERNEL_KINDS:
        raise ValueError(f"{name!r} is not a blur operator; valid: deblur_kernel, {', '.join(_KERNEL_KINDS)}")
    k_h, k_w = make_kernel(_KERNEL_KINDS[name], p["kernel_size"], *(p[k] for k in ("sigma", "sigma2") if k in p))
    return torch.outer(k_h, k_w)


_BUILDERS = {
    "sr_bicubic": sr_bicubic,
    "sr_avgpool": sr_avgpool,
    "deblur_gauss": deblur_gauss,
    "deblur_uniform": deblur_uniform,
    "deblur_aniso": deblur_aniso,
    "deblur_kernel": deblur_kernel,
    "inpaint": inpaint,
    "colorize": colorize,
    "cs_walsh_hadamard": cs_walsh_hadamard,
    "denoise": denoise,
    "compose": compose,
    "generate": generate,
}
OPERATOR_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def make_operator(name: str, image_shape: Sequence[int], **params) -> Operator:
    """Build a degradation operator by name.

    Args:
        name: one of ``OPERATOR_NAMES``.
        image_shape: (C, H, W) of the images to degrade.
        **params: the builder's keyword parameters (plain values), e.g. ``scale=4``.

    Raises:
        ValueError: unknown name or parameter, or parameters the image does not admit.

    Example:
        >>> op = make_operator("sr_bicubic", (3, 64, 64), scale=4)
        >>> op.measurement_shape
        (3, 16, 16)
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown operator {name!r}; valid names: {', '.join(OPERATOR_NAMES)}")
    builder = _BUILDERS[name]
    valid = [p for p in inspect.signature(builder).parameters if p != "image_shape"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for operator {name!r}; valid: {', '.join(valid)}")
    return builder(image_shape, **params)
