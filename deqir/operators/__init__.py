"""Degradation operators y = A x + 2 sigma_y n for zero-shot restoration (see docs/operators.md).

Every operator has ``A``, ``A_pinv`` (exact Moore-Penrose, or CGLS for general operators), ``A_adjoint``,
``project_range`` / ``project_null``, ``measure`` (sigma_y on the [0, 1] scale), ``pinv_noise_gain``,
``y_to_image`` and ``save_artifacts``; SVD operators add ``V, V_T, U, U_T, singulars`` (the DDRM contract).
"""
from __future__ import annotations

from deqir.operators.base import Operator, SVDOperator, check_sigma_y
from deqir.operators.blur import CircularBlur
from deqir.operators.colorize import LUMA_WEIGHTS, Colorization
from deqir.operators.compose import ComposedOperator
from deqir.operators.cs import WalshHadamardCS, fwht
from deqir.operators.denoise import Denoising
from deqir.operators.general import GeneralLinearOperator, cgls
from deqir.operators.inpaint import Inpainting
from deqir.operators.kernels import KERNEL_KINDS, load_kernel, make_kernel, save_kernel
from deqir.operators.null import Unconditional
from deqir.operators.masks import MASK_TYPES, load_mask, make_mask, save_mask
from deqir.operators.registry import OPERATOR_NAMES, make_operator
from deqir.operators.separable import LegacySVDDeblur, SeparableOperator, ZeroBoundaryBlur
from deqir.operators.sr import AveragePoolSR, BicubicSR
from deqir.operators.valid_blur import ValidBlur, ValidSeparableBlur, valid_image_shape

__all__ = [
    "OPERATOR_NAMES",
    "KERNEL_KINDS",
    "MASK_TYPES",
    "LUMA_WEIGHTS",
    "make_operator",
    "Operator",
    "SVDOperator",
    "AveragePoolSR",
    "BicubicSR",
    "CircularBlur",
    "ZeroBoundaryBlur",
    "LegacySVDDeblur",
    "SeparableOperator",
    "ValidBlur",
    "ValidSeparableBlur",
    "valid_image_shape",
    "Inpainting",
    "Colorization",
    "WalshHadamardCS",
    "Denoising",
    "Unconditional",
    "ComposedOperator",
    "GeneralLinearOperator",
    "cgls",
    "fwht",
    "make_kernel",
    "load_kernel",
    "save_kernel",
    "make_mask",
    "load_mask",
    "save_mask",
    "check_sigma_y",
]
