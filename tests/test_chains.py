"""Every chain of deqir.chains: Picard with T rounds is the sequential chain; each chain's defining property."""
from __future__ import annotations

import pytest
import torch
from paper_settings import paper_deq
from tiny_models import TinyEps

from deqir.chains import CHAINS, make_step
from deqir.chains.diffpir import DiffPIRStep
from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.samplers.sequential import draw_chain_noise, sample_sequential
from deqir.operators import make_operator

SIZE, T = 8, 6
SCHED = NoiseSchedule.create()
MODEL = TinyEps()
PARAMS = {"ddnm": {}, "ddrm": {"eta": 0.85, "eta_b": 1.0}, "pigdm": {"eta": 0.5}, "diffpir": {"zeta": 0.3},
          "dps": {"zeta": 0.5, "eta": 0.5}}
TASKS = {"sr_avgpool": {"scale": 2}, "inpaint": {"mask_type": "random", "missing_ratio": 0.5, "seed": 1},
         "deblur_gauss": {}}


def problem(task, sigma_y=0.0, B=2, etw=1.0, nw=1.0, T=T):
    op = make_operator(task, (3, SIZE, SIZE), **TASKS.get(task, {})).double() if task else None
    coeffs = make_chain(SCHED, SamplingGrid.create(T), etw=etw, nw=nw)
    gens = [torch.Generator().manual_seed(10 + b) for b in range(B)]
    x_T, z = draw_chain_noise((B, 3, SIZE, SIZE), T, gens, per_step_noise=True, dtype=torch.float64)
    gt = torch.rand((B, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    y = op.measure(gt, sigma_y, generator=torch.Generator().manual_seed(4)) if op is not None else None
    return coeffs, x_T, z, op, y


def step(name, coeffs, op, y, z, sigma_y=0.0, **kw):
    return make_step(name, coeffs, operator=op, y=y, z=z, sigma_y=sigma_y, **{**PARAMS[name], **kw})


@pytest.mark.parametrize("task", [None, *TASKS])
@pytest.mark.parametrize("name", CHAINS)
def test_picard_T_rounds_is_the_sequential_chain(name, task):
    coeffs, x_T, z, op, y = problem(task, sigma_y=0.05 if task == "inpaint" else 0.0)
    fn = step(name, coeffs, op, y, z, sigma_y=0.05 if task == "inpaint" else 0.0)
    x0, _, traj = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z, return_trajectory=True, step_fn=fn)
    res = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, z=z, solver="picard", max_iter=T, tol=0.0, form="step",
                     step_fn=fn)
    assert res.stats.rounds == T
    assert (res.states - traj).abs().max() < 1e-10
    assert torch.isfinite(x0).all() and (res.x0 - x0).abs().max() < 1e-10


def test_ddnm_step_is_todays_chain():
    coeffs, x_T, z, op, y = problem("sr_avgpool", etw=0.7, nw=0.4)
    ref, _ = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z)
    new, _ = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z, step_fn=step("ddnm", coeffs, op, y, z))
    assert (ref - new).abs().max() < 1e-12


@pytest.mark.parametrize("task", list(TASKS))
def test_ddrm_eta_one_is_ddnm_eta_one_before_the_last_rectification(task):
    """DDRM with eta = eta_b = 1, noiseless, equals DDNM with etw = nw = 1 (same z) on every state but the last,
    where DDNM's output is DDRM's x0_hat projected onto A x = y (DDRM keeps x0_hat)."""
    coeffs, x_T, z, op, y = problem(task)
    ddnm, _, t1 = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z, return_trajectory=True)
    fn = make_step("ddrm", coeffs, operator=op, y=y, z=z, eta=1.0, eta_b=1.0)
    ddrm, _, t2 = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z, return_trajectory=True, step_fn=fn)
    assert (t1[:, :-1] - t2[:, :-1]).abs().max() < 1e-10
    assert (ddnm - (ddrm - op.A_pinv(op.A(ddrm) - y))).abs().max() < 1e-10
    assert (op.A(ddnm) - y).abs().max() < 1e-10


def test_ddrm_noiseless_state_is_consistent_with_y():
    """Case (B) with eta_b = 1: the observed coordinates of x_{j+1} / sqrt(a') are y_bar + sigma' z_bar."""
    coeffs, x_T, z, op, y = problem("sr_avgpool")
    fn = make_step("ddrm", coeffs, operator=op, y=y, z=z, eta=0.3, eta_b=1.0)
    _, _, traj = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z, return_trajectory=True, step_fn=fn)
    for j in range(T - 1):
        an = float(coeffs.a_next[j])
        sig = ((1 - an) / an) ** 0.5
        assert (op.A(traj[:, j] / an**0.5) - (y + sig * op.A(z[:, j]))).abs().max() < 1e-10


@pytest.mark.parametrize("task", [*TASKS, "compose"])
def test_diffpir_data_step_solves_its_quadratic(task):
    if task == "compose":  # no SVD: conjugate gradients
        op = make_operator("compose", (3, SIZE, SIZE), operators=[{"name": "colorize"},
                                                                  {"name": "inpaint", "mask_type": "box"}]).double()
    else:
        op = make_operator(task, (3, SIZE, SIZE), **TASKS[task]).double()
    coeffs = problem(None)[0]
    y = op.A(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))
    fn = DiffPIRStep(coeffs, operator=op, y=y, lam=3.0, cg_iter=200, cg_tol=1e-13)
    x0 = torch.randn(2, 3, 3, SIZE, SIZE, dtype=torch.float64)
    rho = torch.tensor([0.01, 0.5, 4.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    x = fn.data_step(x0, rho)
    for j in range(3):  # gradient of |y - A x|^2 + rho |x - x0|^2 vanishes
        g = op.A_adjoint(op.A(x[:, j]) - y) + rho[0, j] * (x[:, j] - x0[:, j])
        assert g.abs().max() < 1e-8


def test_guided_chains_pull_toward_y():
    """PiGDM and DPS guidance reduce |A x0 - y| relative to the unguided chain (weight/zeta 0)."""
    coeffs, x_T, z, op, y = problem("sr_avgpool", T=10)
    for name, off in (("pigdm", {"weight": 0.0}), ("dps", {"zeta": 0.0})):
        on = sample_sequential(MODEL, coeffs, x_T, step_fn=step(name, coeffs, op, y, z))[0]
        base = sample_sequential(MODEL, coeffs, x_T, step_fn=step(name, coeffs, op, y, z, **off))[0]
        assert (op.A(on) - y).norm() < 0.9 * (op.A(base) - y).norm()


def test_dps_gradient_matches_autograd():
    coeffs, x_T, z, op, y = problem("deblur_gauss")
    fn = make_step("dps", coeffs, operator=op, y=y, z=z, zeta=1.0, clip_x0=True)
    j = 2
    t = torch.full((2,), int(coeffs.t[j]), dtype=torch.long)
    x = (x_T * 0.8).requires_grad_(True)
    a = float(coeffs.a[j])
    x0 = ((x - (1 - a) ** 0.5 * MODEL(x, t)) / a**0.5).clamp(-1, 1)
    (g_ref,) = torch.autograd.grad((op.A(x0) - y).flatten(1).norm(dim=1).sum(), x)
    from deqir.chains import eps_and_vjp, slot_vjp
    eps, vjp = eps_and_vjp(MODEL, x.detach(), t)
    g = fn.residual_gradient(x.detach().unsqueeze(1), eps.unsqueeze(1), fn.scalars(j, j + 1, x.unsqueeze(1))[0],
                             slot_vjp(vjp))[:, 0]
    assert (g - g_ref).abs().max() < 1e-10


def test_bad_chain_settings_name_the_options():
    coeffs, x_T, z, op, y = problem("sr_avgpool")
    with pytest.raises(ValueError, match="valid: ddnm, ddrm"):
        make_step("ddpm", coeffs)
    with pytest.raises(ValueError, match="valid: eta, eta_b"):
        make_step("ddrm", coeffs, operator=op, y=y, etab=1)
    comp = make_operator("compose", (3, SIZE, SIZE), operators=[{"name": "colorize"},
                                                                {"name": "inpaint", "mask_type": "box"}])
    with pytest.raises(ValueError, match="SVD"):
        make_step("ddrm", coeffs, operator=comp, y=comp.A(x_T.float()))
    with pytest.raises(ValueError, match="step form"):
        paper_deq(MODEL, coeffs, x_T, operator=op, y=y, z=z, form="cumsum", step_fn=step("ddrm", coeffs, op, y, z))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["ddrm", "dps"])
def test_invert_runs_every_chain_deq_equals_sequential(name, tmp_path):
    """chain=<name> through invert.py: Picard with T rounds reproduces the sequential chain (float32)."""
    import json

    from app_support import TINY, run_inprocess

    run = tmp_path / name
    run_inprocess([*TINY, "dataset.limit=1", f"chain={name}", "solver=picard", "solver.tol=0",
                   "eval.compare_sequential=true"], run)
    rec = json.loads((run / "records" / "000000.json").read_text())
    assert rec["rounds"] == 4 and rec["psnr_to_sequential"] > 60


def test_chain_config_errors_list_the_options():
    from app_support import compose_cfg

    from deqir.lit.builders import chain_settings

    cfg = compose_cfg(["chain=diffpir"])
    plain = {k: dict(cfg[k]) for k in ("sampler", "solver", "chain")}
    st = chain_settings(plain["sampler"], plain["solver"], plain["chain"])
    assert st.chain == "diffpir" and st.form == "step" and st.chain_params["clip_x0"] is True
    assert st.per_step_noise  # fresh noise every step even where a task asks DDNM for one shared image
    denoise = compose_cfg(["task=denoise", "chain=ddrm"])
    assert chain_settings(dict(denoise.sampler), dict(denoise.solver), dict(denoise.chain)).per_step_noise
    with pytest.raises(ValueError, match="valid: lam, zeta"):
        chain_settings(plain["sampler"], plain["solver"], {**plain["chain"], "lamda": 2})
    with pytest.raises(ValueError, match="valid: ddnm, ddrm"):
        chain_settings(plain["sampler"], plain["solver"], {"name": "red"})
