"""The official DeqIR sampler's settings (the paper's code: Anderson, 15 rounds, tol 1e-3 relative, every slot
initialised to x_T, the analytic ``cumsum`` form of the joint map), passed explicitly by the numerics tests.

The library has no defaults for these (the application's settings live in ``conf/`` only, docs/api.md);
``paper_deq`` / ``paper_solve`` are ``sample_deq`` / ``SolveConfig`` with these values unless overridden.
"""
from __future__ import annotations

from deqir.samplers.deq import sample_deq
from deqir.optim import SolveConfig

PAPER_SOLVE = {"solver": "anderson", "max_iter": 15, "tol": 1e-3, "stop_mode": "rel"}
PAPER_DEQ = {**PAPER_SOLVE, "init": "x_T", "coarse_steps": 5, "form": "cumsum"}


def paper_deq(model, coeffs, x_T, **kw):
    """``sample_deq`` with the official sampler's settings, ``kw`` overriding them."""
    return sample_deq(model, coeffs, x_T, **{**PAPER_DEQ, **kw})


def paper_solve(**kw) -> SolveConfig:
    """``SolveConfig`` with the official sampler's stopping rule, ``kw`` overriding it."""
    return SolveConfig(**{**PAPER_SOLVE, **kw})


#: ``optimize_init`` / ``invert_image`` settings of the numerics tests (the application's are conf/optimize/).
OPTIMIZE = {"steps": 100, "lr": 1e-2, "map_form": "cumsum"}


def paper_optimize_init(model, coeffs, x_T0, **kw):
    """``optimize_init`` with :data:`OPTIMIZE` and the official stopping rule, ``kw`` overriding them."""
    from deqir.optim import optimize_init

    return optimize_init(model, coeffs, x_T0, **{**OPTIMIZE, "solve": paper_solve(), **kw})


def paper_invert_image(model, coeffs, x, **kw):
    """``invert_image`` with :data:`OPTIMIZE` and the official stopping rule, ``kw`` overriding them."""
    from deqir.optim import invert_image

    return invert_image(model, coeffs, x, **{**OPTIMIZE, "solve": paper_solve(), **kw})
