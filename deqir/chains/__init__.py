"""Zero-shot restoration chains as step functions (one step per slot; see :mod:`deqir.chains.base`).

``make_step(name, coeffs, operator=, y=, z=, sigma_y=, clip_x0=, **params)`` binds a chain to one problem;
the same object drives :func:`deqir.samplers.sequential.sample_sequential` (``step_fn=``) and the DEQ step
form (:class:`deqir.deq.joint_map.ChainMap`, ``step_fn=``).
"""
from __future__ import annotations

from deqir.chains.base import ChainStep, eps_and_vjp, slot_vjp
from deqir.chains.ddnm import DDNMStep
from deqir.chains.ddrm import DDRMStep
from deqir.chains.diffpir import DiffPIRStep
from deqir.chains.guided import DPSStep, PiGDMStep

STEPS: dict[str, type[ChainStep]] = {"ddnm": DDNMStep, "ddrm": DDRMStep, "pigdm": PiGDMStep,
                                     "diffpir": DiffPIRStep, "dps": DPSStep}
CHAINS = tuple(STEPS)
_COMMON = ("operator", "y", "z", "sigma_y", "clip_x0")


def chain_params(name: str) -> tuple[str, ...]:
    """The chain-specific keyword arguments of ``name`` (ValueError listing the chains if unknown)."""
    import inspect

    if name not in STEPS:
        raise ValueError(f"unknown chain {name!r}; valid: {', '.join(CHAINS)}")
    sig = inspect.signature(STEPS[name].__init__)
    return tuple(p for p in sig.parameters if p not in ("self", "coeffs", "pinv_y", *_COMMON))


def make_step(name: str, coeffs, **kwargs) -> ChainStep:
    """The step object of chain ``name`` (ValueError for unknown chains or parameters)."""
    valid = chain_params(name)
    unknown = sorted(set(kwargs) - set(valid) - set(_COMMON))
    if unknown:
        raise ValueError(f"chain {name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return STEPS[name](coeffs, **kwargs)


__all__ = [
    "CHAINS",
    "STEPS",
    "ChainStep",
    "DDNMStep",
    "DDRMStep",
    "DPSStep",
    "DiffPIRStep",
    "PiGDMStep",
    "chain_params",
    "eps_and_vjp",
    "make_step",
    "slot_vjp",
]
