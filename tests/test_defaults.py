"""One source for every default: a library keyword default never differs from the configuration ``invert.py``
composes (docs/api.md "Lower-level pieces").

Every parameter that a ``conf/`` key sets is either required (no default: the caller passes the value, as
``deqir.lit`` does from the composed config) or has exactly the composed value.
"""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from deqir.api import compose_config
from deqir.deq.grad import DEQGradientConfig
from deqir.deq.joint_map import ChainMap
from deqir.samplers.deq import sample_deq
from deqir.deq.solvers import get_solver
from deqir.diffusion.chain import make_chain
from deqir.samplers.sequential import draw_chain_noise, sample_sequential
from deqir.optim import SolveConfig, invert_image, optimize_init

REQUIRED = object()  # the parameter has no default

#: (callable, {parameter: config key}) -- every library parameter that a conf/ key sets.
MAP = {"form": "sampler.form", "clip_x0": "sampler.clip_x0", "max_batch": "sampler.max_batch"}
SOLVE = {"solver": "solver.name", "max_iter": "solver.max_iter", "tol": "solver.tol", "stop_mode": "solver.stop_mode"}
OPTIMIZE = {k: f"optimize.{k}" for k in ("steps", "lr", "patience", "min_improvement", "stop_below")}
CASES = [
    (sample_deq, {**SOLVE, **MAP, "init": "sampler.init", "coarse_steps": "sampler.coarse_steps"}),
    (sample_sequential, {"clip_x0": "sampler.clip_x0"}),
    (ChainMap, MAP),
    (make_chain, {"etw": "sampler.etw", "nw": "sampler.nw", "noise_aware": "sampler.noise_aware"}),
    (draw_chain_noise, {"per_step_noise": "sampler.per_step_noise"}),
    (SolveConfig, SOLVE),
    (optimize_init, {**OPTIMIZE, "reference_kind": "optimize.reference_kind", "lpips_net": "optimize.lpips_net",
                     "map_form": "sampler.form", "clip_x0": "sampler.clip_x0", "max_batch": "sampler.max_batch",
                     "solve": "solver"}),
    (invert_image, {**OPTIMIZE, "prior_weight": "optimize.prior_weight", "init": "optimize.invert_init",
                    "init_iters": "optimize.invert_init_iters",
                    "map_form": "sampler.form", "clip_x0": "sampler.clip_x0", "max_batch": "sampler.max_batch",
                    "solve": "solver"}),
]
#: None = "give it when it is used": sample_deq's coarse_steps matters only with init="coarse" (tested below).
NEEDED_WHEN_USED = {(sample_deq, "coarse_steps")}


def defaults(fn) -> dict[str, object]:
    if dataclasses.is_dataclass(fn):
        return {f.name: REQUIRED if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                else f.default for f in dataclasses.fields(fn)}
    return {n: REQUIRED if p.default is inspect.Parameter.empty else p.default
            for n, p in inspect.signature(fn).parameters.items()}


@pytest.fixture(scope="module")
def cfg():
    return compose_config()


@pytest.mark.parametrize("fn, keys", CASES, ids=[c[0].__name__ for c in CASES])
def test_library_defaults_equal_the_composed_config(cfg, fn, keys):
    found = defaults(fn)
    for param, key in keys.items():
        assert param in found, f"{fn.__name__} has no parameter {param!r}"
        default = found[param]
        if default is REQUIRED or ((fn, param) in NEEDED_WHEN_USED and default is None):
            continue
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert default == value, (f"{fn.__name__}({param}={default!r}) differs from {key}={value!r} in conf/: "
                                  f"make it required or read it from the config")


def test_gradient_config_defaults_equal_the_gradient_group(cfg):
    found = defaults(DEQGradientConfig)
    assert set(cfg.gradient) <= set(found)
    for key, value in cfg.gradient.items():
        assert found[key] in (REQUIRED, value), f"DEQGradientConfig.{key}={found[key]!r} differs from gradient.{key}"


@pytest.mark.parametrize("name", ["anderson", "picard", "sliding_window", "quasi_newton"])
def test_solver_defaults_equal_their_solver_group(name):
    solver_cfg = compose_config(overrides=[f"solver={name}"]).solver
    found = defaults(get_solver(name))
    for key, value in solver_cfg.items():
        if key == "name":
            continue
        assert key in found, f"conf/solver/{name}.yaml sets {key!r}, which {name}() does not take"
        assert found[key] in (REQUIRED, value), f"{name}({key}={found[key]!r}) differs from solver.{key}={value!r}"


def test_coarse_warm_start_needs_its_steps():
    from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid

    coeffs = make_chain(NoiseSchedule.create(), SamplingGrid.create(3), etw=0.0, nw=0.0)
    with pytest.raises(ValueError, match="coarse_steps"):
        sample_deq(lambda x, t: torch.zeros_like(x), coeffs, torch.zeros(1, 3, 4, 4), solver="picard", max_iter=3,
                   tol=0.0, stop_mode="rel", init="coarse", form="cumsum")
