"""Step placement and the truncated start (deqir/diffusion/schedule.py): every grid is a valid chain for every
chain and both samplers; a chain started below N begins at A^+ y diffused to its first level."""
from __future__ import annotations

import json

import pytest
import torch
from paper_settings import paper_deq
from tiny_models import TinyEps

from deqir.chains import CHAINS, make_step
from deqir.diffusion.chain import diffuse, make_chain
from deqir.diffusion.schedule import SKIP_TYPES, NoiseSchedule, SamplingGrid, level, timestep_grid
from deqir.operators import make_operator
from deqir.samplers import draw_chain_noise, sample_deq, sample_sequential

SCHED = NoiseSchedule.create()
PARAMS = {"ddnm": {}, "ddrm": {"eta": 0.85, "eta_b": 1.0}, "pigdm": {"eta": 0.5}, "diffpir": {"zeta": 0.3},
          "dps": {"zeta": 0.5, "eta": 0.5}}


@pytest.mark.parametrize("t_start", [None, 1000, 600, 250])
@pytest.mark.parametrize("T", [1, 5, 25, 50, 100])
@pytest.mark.parametrize("skip_type", SKIP_TYPES)
def test_every_grid_is_strictly_decreasing_inside_the_model_range(skip_type, T, t_start):
    g = SamplingGrid.create(T, 1000, skip_type, schedule=SCHED, t_start=t_start)
    assert len(g) == T and all(a > b for a, b in zip(g.t, g.t[1:]))
    H = 1000 if t_start is None else t_start
    assert 0 <= g.t[-1] and g.t[0] < H
    assert g.t_next == (*g.t[1:], -1)
    assert g.from_measurement is (t_start is not None and t_start < 1000)


def test_grids_place_their_steps_as_defined():
    assert timestep_grid(25) == list(range(0, 1000, 40))  # DDIM / DeqIR uniform: 0 .. 960
    assert timestep_grid(25, skip_type="quad")[-1] == 800  # DDIM's quad tops at 0.8 N
    assert timestep_grid(25, t_start=500)[-1] == 480
    lin = timestep_grid(10, skip_type="linear_sigma", t_start=400, schedule=SCHED)
    sig = [level(SCHED, t) for t in lin[::-1]]  # processing order: sigma_top (T - i) / T
    top = level(SCHED, 399)
    assert lin[-1] == 399 and all(abs(s - top * (10 - i) / 10) < 0.05 * top / 10 for i, s in enumerate(sig))
    k = timestep_grid(25, skip_type="karras", schedule=SCHED)
    assert k[0] == 0 and k[-1] == 999
    lo = timestep_grid(25, skip_type="karras", rho=1.0, schedule=SCHED)  # rho = 1: linear in sigma
    assert sum(t > 500 for t in lo) > sum(t > 500 for t in k)  # rho = 7 puts more steps near the data


@pytest.mark.parametrize("bad, match", [
    ({"skip_type": "log"}, "valid: uniform, quad, linear_sigma, karras"),
    ({"t_start": 0}, r"t_start must be an integer timestep in \(0, 1000\]"),
    ({"t_start": 1001}, r"t_start must be an integer timestep in \(0, 1000\]"),
    ({"t_start": 10}, "do not fit below t_start=10"),
    ({"skip_type": "karras", "rho": 0.0}, "rho .* must be a finite number > 0"),
    ({"skip_type": "karras", "rho": -2.0}, "rho .* must be a finite number > 0"),
    ({"skip_type": "karras", "schedule": None}, "pass the model's schedule"),
])
def test_bad_grid_values_are_one_line_errors(bad, match):
    kw = {"skip_type": "uniform", "schedule": SCHED, **bad}
    with pytest.raises(ValueError, match=match) as err:
        timestep_grid(25, 1000, **kw)
    assert "\n" not in str(err.value)


def _problem(skip_type, t_start, task="sr_avgpool", T=6, size=8, B=2):
    op = make_operator(task, (3, size, size), scale=2).double()
    grid = SamplingGrid.create(T, 1000, skip_type, schedule=SCHED, t_start=t_start)
    coeffs = make_chain(SCHED, grid, etw=1.0, nw=1.0)
    gens = [torch.Generator().manual_seed(10 + b) for b in range(B)]
    x_T, z = draw_chain_noise((B, 3, size, size), T, gens, per_step_noise=True, dtype=torch.float64)
    gt = torch.rand((B, 3, size, size), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    y = op.A(gt)
    if coeffs.from_measurement:
        x_T = diffuse(op.A_pinv(y), x_T, float(coeffs.a[0]))
    return coeffs, x_T, z, op, y


@pytest.mark.parametrize("t_start", [None, 400])
@pytest.mark.parametrize("skip_type", SKIP_TYPES)
@pytest.mark.parametrize("name", CHAINS)
def test_deq_equals_sequential_on_every_grid(name, skip_type, t_start):
    """Picard with T rounds and quasi_newton at zero tolerance reproduce the sequential chain on every grid."""
    model = TinyEps()
    coeffs, x_T, z, op, y = _problem(skip_type, t_start)
    fn = make_step(name, coeffs, operator=op, y=y, z=z, **PARAMS[name])
    x0, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z, step_fn=fn)
    pic = paper_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver="picard", max_iter=6, tol=0.0, form="step",
                    step_fn=fn)
    assert (pic.x0 - x0).abs().max() < 1e-10
    qn = sample_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver="quasi_newton", max_iter=6, tol=0.0,
                    stop_mode="noise", options={"output_tol": 0.0, "error_tol": 0.0}, init="surrogate", form="step", step_fn=fn)
    assert (qn.x0 - x0).abs().max() < 1e-8


def test_truncated_start_is_the_measurement_diffused_to_the_first_level():
    x0 = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    noise = torch.randn((1, 3, 4, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = float(SCHED.alpha_bar(399))
    out = diffuse(x0, noise, a)
    assert torch.allclose(out, a**0.5 * x0 + (1 - a) ** 0.5 * noise)


def test_app_truncated_start_runs_and_is_refused_for_generation(tmp_path):
    """invert.py: sampler.t_start < N starts from A^+ y (so the sequential chain and the DEQ agree there too);
    task=generate has nothing to start from."""
    from app_support import TINY, error_lines, pixels, run_cli, run_inprocess

    over = [*TINY, "dataset.limit=1", "sampler.skip_type=karras", "sampler.t_start=400"]
    run_inprocess([*over, "sampler=sequential"], tmp_path / "seq")
    run_inprocess([*over, "solver=quasi_newton", "solver.tol=0", "solver.output_tol=0", "solver.error_tol=0"], tmp_path / "qn")
    for png in (tmp_path / "seq" / "images").glob("*.png"):
        diff = pixels(png).astype(int) - pixels(tmp_path / "qn" / "images" / png.name).astype(int)
        assert abs(diff).max() <= 1
    meta = json.loads((tmp_path / "seq" / "metrics.json").read_text())
    assert meta["n_images"] == 1
    res = run_cli(["debug=tiny", "task=generate", "sampler.t_start=400", f"hydra.run.dir={tmp_path / 'gen'}"])
    assert res.returncode == 2 and "t_start must be null" in error_lines(res.stderr)[0]


def test_restoration_module_starts_a_truncated_chain_from_the_measurement():
    from app_support import TINY, compose_cfg
    from omegaconf import OmegaConf

    from deqir.lit import builders
    from deqir.lit.app import build_module, plain_config
    from deqir.lit.restoration import image_generator

    def problem(extra):
        cfg = compose_cfg([*TINY, "task=sr4", *extra])
        plain = plain_config(OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}))
        shape = (3, 32, 32)
        op = builders.build_operator(plain["task"], shape)
        module = build_module(plain, op, builders.build_model(plain["model"]), shape)
        img = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
        return module, op, module.make_problem({"index": torch.tensor([0]), "name": ["a"], "image": img})

    module, op, p = problem(["sampler.t_start=300"])
    noise, _ = draw_chain_noise((1, 3, 32, 32), 4, [image_generator(0, 0)], per_step_noise=True)
    a0 = float(module.coeffs.a[0])
    assert module.coeffs.from_measurement and int(module.coeffs.t[0]) < 300
    assert torch.allclose(p.x_T, diffuse(op.A_pinv(p.y), noise, a0), atol=1e-6)
    _, _, full = problem(["sampler.t_start=null"])
    assert torch.allclose(full.x_T, noise)  # t_start = null: pure noise, as before


@pytest.mark.parametrize("task", ["cs2", "colorize"])
def test_clipped_deterministic_presets_solve_under_quasi_newton(task, tmp_path):
    """The clipped, deterministic chain of colorize / cs2 runs under solver=auto like every task: quasi_newton (what
    auto runs on a GPU) reaches the sequential chain's images."""
    from app_support import TINY, pixels, run_inprocess

    over = [*TINY, f"task={task}", "dataset.limit=1"]
    run_inprocess([*over, "sampler=sequential"], tmp_path / "seq")
    run_inprocess([*over, "solver=quasi_newton", "solver.tol=0", "solver.output_tol=0", "solver.error_tol=0"], tmp_path / "qn")
    for png in (tmp_path / "seq" / "images").glob("*.png"):
        diff = pixels(png).astype(int) - pixels(tmp_path / "qn" / "images" / png.name).astype(int)
        assert abs(diff).max() <= 1


def test_chain_start_is_the_noise_or_the_diffused_measurement():
    from deqir.samplers import chain_start

    coeffs, x_T, z, op, y = _problem("quad", None)
    noise = torch.randn_like(x_T)
    assert chain_start(coeffs, noise) is noise  # t_start = null: pure noise, nothing else needed
    truncated, *_ = _problem("quad", 400)
    out = chain_start(truncated, noise, operator=op, y=y)
    assert torch.allclose(out, diffuse(op.A_pinv(y), noise, float(truncated.a[0])))
    with pytest.raises(ValueError, match="starts from the measurement: pass operator and y"):
        chain_start(truncated, noise)
