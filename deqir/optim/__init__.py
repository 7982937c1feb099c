"""Optimisation through the DEQ equilibrium: initialization optimization and inversion (docs/gradients.md).

* :func:`optimize_init` -- optimise x_T per image against weighted ``consistency`` / ``reference`` /
  ``oracle`` / ``prior`` terms (:mod:`deqir.optim.losses`).
* :func:`invert_image` -- fixed-point (:func:`fixed_point_invert`) or DDIM inversion (:func:`ddim_invert`), then DEQ-gradient refinement of x_T.

Gradients come from :mod:`deqir.deq.grad` (``ift`` | ``phantom`` | ``unroll``); see docs/gradients.md.
"""
from __future__ import annotations

from deqir.optim.init_opt import STOP_REASONS, InitOptResult, SolveConfig, optimize_init
from deqir.optim.inversion import INVERSION_INITS, ddim_invert, fixed_point_invert, invert_image
from deqir.optim.losses import (
    LOSS_NAMES,
    REFERENCE_KINDS,
    LossTerms,
    consistency_loss,
    l2_loss,
    prior_loss,
    reference_loss_fn,
)

__all__ = [
    "INVERSION_INITS",
    "LOSS_NAMES",
    "REFERENCE_KINDS",
    "STOP_REASONS",
    "InitOptResult",
    "LossTerms",
    "SolveConfig",
    "consistency_loss",
    "ddim_invert",
    "fixed_point_invert",
    "invert_image",
    "l2_loss",
    "optimize_init",
    "prior_loss",
    "reference_loss_fn",
]
