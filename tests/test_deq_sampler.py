"""The defining invariants of the DEQ sampler: its fixed point is the sequential chain (docs/solvers.md)."""
from __future__ import annotations

import math

import pytest
import torch

from deqir.deq.joint_map import ChainMap
from deqir.samplers.deq import coarse_warm_start
from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.samplers.sequential import draw_chain_noise, sample_sequential
from deqir.operators import OPERATOR_NAMES, make_operator
from paper_settings import paper_deq
from tiny_models import tiny_unet

SIZE = 16
SCHED = NoiseSchedule.create()

# One case per operator name (params sized for 16x16 test images).
TASKS: dict[str, dict] = {
    "sr_bicubic": {"scale": 2},
    "sr_avgpool": {"scale": 4},
    "deblur_gauss": {},
    "deblur_uniform": {"kernel_size": 5},
    "deblur_aniso": {"kernel_size": 5, "legacy_svd": True},
    "deblur_kernel": {"kernel": [[0.0, 0.2, 0.0], [0.1, 0.4, 0.1], [0.0, 0.2, 0.0]]},
    "inpaint": {"mask_type": "random", "missing_ratio": 0.6, "seed": 1},
    "colorize": {},
    "cs_walsh_hadamard": {"ratio": 2},
    "denoise": {},
    "generate": {},
    "compose": {"operators": [{"name": "colorize"}, {"name": "inpaint", "mask_type": "box"}]},
}


def test_every_operator_has_a_case():
    assert set(TASKS) == set(OPERATOR_NAMES)


MODEL = tiny_unet(SIZE)


def problem(T: int, task: str | None, B: int = 2, etw: float = 0.1, nw: float = 0.0, sigma_y: float = 0.0,
            per_step: bool = False, seed: int = 0):
    op = make_operator(task, (3, SIZE, SIZE), **TASKS[task]).double() if task else None
    gain = op.pinv_noise_gain() if (op is not None and sigma_y > 0) else 1.0
    coeffs = make_chain(SCHED, SamplingGrid.create(T), etw=etw, nw=nw, sigma_y_eff=2 * sigma_y * gain)
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(B)]
    x_T, z = draw_chain_noise((B, 3, SIZE, SIZE), T, gens, per_step_noise=per_step, dtype=torch.float64)
    gt = torch.rand((B, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(99), dtype=torch.float64) * 2 - 1
    y = op.measure(gt, sigma_y, generator=torch.Generator().manual_seed(7)) if op is not None else None
    return coeffs, x_T, z, op, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("task", [None, *TASKS])
def test_picard_T_rounds_is_the_sequential_chain(task):
    T = 10
    coeffs, x_T, z, op, y = problem(T, task, etw=0.3, nw=0.2)
    x0_seq, _, traj = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z, return_trajectory=True)
    res = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, z=z, solver="picard", max_iter=T, tol=0.0)
    assert res.stats.rounds == T
    assert (res.states - traj).abs().max() < 1e-6
    assert rel(res.x0, x0_seq) < 1e-9
    if op is not None and y.numel():  # (generate measures nothing)
        # noiseless tasks: measurement consistency holds by construction (docs/solvers.md)
        assert (op.A(res.x0) - y).abs().max() < 1e-5


def test_picard_error_contracts_round_by_round():
    """Slot j is exact after j + 1 rounds; before that its error shrinks geometrically (DDIM is contractive)."""
    T = 10
    coeffs, x_T, z, op, y = problem(T, "sr_avgpool")
    _, _, traj = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, return_trajectory=True)
    fmap = ChainMap(MODEL, coeffs, x_T, operator=op, y=y, form="cumsum")
    X = fmap.initial_state()
    errs = []
    with torch.no_grad():
        for k in range(1, T + 1):
            X = fmap(X)
            errs.append(float((X - traj).abs().max()))
            assert (X[:, :k] - traj[:, :k]).abs().max() < 1e-9  # the first k slots are exact
    assert errs[0] > 1e-2
    assert all(b <= a * 1.0001 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-9


SOLVER_CASES = [pytest.param(T, task, solver, options, max_iter, marks=[pytest.mark.slow] if T == 50 else [])
                for T in (10, 25, 50) for task in ("sr_bicubic", "inpaint")
                for solver, options, max_iter in [("anderson", {}, 40), ("anderson", {"mixing": "slot"}, 40),
                                                  ("sliding_window", {"window": 8}, None)]
                if not (options.get("mixing") == "slot" and T != 25)]


@pytest.mark.parametrize("T,task,solver,options,max_iter", SOLVER_CASES)
def test_solvers_reach_the_sequential_fixed_point(T, task, solver, options, max_iter):
    coeffs, x_T, z, op, y = problem(T, task)
    x0_seq, _ = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y)
    res = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, solver=solver, options=options, max_iter=max_iter, tol=1e-7)
    assert res.stats.status == "converged"
    assert rel(res.x0, x0_seq) < 1e-4
    if solver == "sliding_window":
        assert res.nfe < res.stats.rounds * T * x_T.shape[0]  # converged slots stop being evaluated


def test_batch_equals_one_at_a_time_and_max_batch_changes_nothing():
    T = 12
    coeffs, x_T, z, op, y = problem(T, "deblur_gauss", B=3)
    full = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, max_iter=8)
    for b in range(3):
        single = paper_deq(MODEL, coeffs, x_T[b : b + 1], operator=op, y=y[b : b + 1], max_iter=8)
        assert (single.x0[0] - full.x0[b]).abs().max() < 1e-9
    for mb in (1, 5, 7):
        chunked = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, max_iter=8, max_batch=mb)
        assert (chunked.x0 - full.x0).abs().max() < 1e-9


def test_per_step_noise_and_shared_noise_differ_and_both_match_sequential():
    T = 8
    for per_step in (False, True):
        coeffs, x_T, z, op, y = problem(T, "colorize", nw=0.5, per_step=per_step)
        assert z.shape[1] == (T if per_step else 1)
        x0_seq, _ = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z)
        res = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, z=z, solver="picard", max_iter=T, tol=0.0)
        assert rel(res.x0, x0_seq) < 1e-9


def test_noise_requires_z():
    coeffs, x_T, z, op, y = problem(5, "denoise", nw=0.5)
    with pytest.raises(ValueError, match="pass z"):
        paper_deq(MODEL, coeffs, x_T, operator=op, y=y)


def test_coarse_warm_start_is_closer_and_converges():
    T = 25
    coeffs, x_T, z, op, y = problem(T, "sr_bicubic")
    _, _, traj = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, return_trajectory=True)
    fmap = ChainMap(MODEL, coeffs, x_T, operator=op, y=y, form="cumsum")
    warm = coarse_warm_start(MODEL, coeffs, x_T, 5, operator=op, y=y)
    assert rel(warm, traj) < rel(fmap.initial_state(), traj)
    res = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, init="coarse", coarse_steps=5, max_iter=30, tol=1e-7)
    assert res.init_nfe == 2 * 5 and res.nfe == res.init_nfe + res.stats.nfe
    assert rel(res.x0, traj[:, -1]) < 1e-4


# ---- analytic Gaussian prior: eps is affine, so the whole chain is a per-pixel scalar recursion ------------
MU, S = 0.2, 0.5  # data x ~ N(MU, S^2) independently per pixel (on [-1, 1])


class GaussianEps(torch.nn.Module):
    """Exact eps(x_t, t) = E[eps | x_t] = sqrt(1 - a)(x_t - sqrt(a) MU) / (a S^2 + 1 - a)."""

    def forward(self, x, t):
        a = SCHED.alpha_bar(t.long().cpu()).to(x)[:, None, None, None]
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


def closed_form_denoise(coeffs, x_T: float, y: float) -> float:
    """The chain with A = I run as a scalar affine recursion in Python floats (independent of deqir code)."""
    x = x_T
    for j in range(len(coeffs)):
        a, an = float(coeffs.a[j]), float(coeffs.a_next[j])
        lam, c2 = float(coeffs.lam[j]), float(coeffs.c2[j])
        eps = math.sqrt(1 - a) * (x - math.sqrt(a) * MU) / (a * S**2 + 1 - a)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x0 = x0 - lam * (x0 - y)
        x = math.sqrt(an) * x0 + c2 * eps
    return x


@pytest.mark.parametrize("noise_aware", [False, True])
def test_gaussian_prior_denoising_matches_closed_form(noise_aware):
    T, sigma_y = 25, 0.25  # sigma_y on [0, 1] -> 0.5 on [-1, 1]
    op = make_operator("denoise", (3, SIZE, SIZE)).double()
    coeffs = make_chain(SCHED, SamplingGrid.create(T), etw=0.0, nw=0.0, sigma_y_eff=2 * sigma_y, noise_aware=noise_aware)
    g = torch.Generator().manual_seed(3)
    gt = MU + S * torch.randn((4, 3, SIZE, SIZE), generator=g, dtype=torch.float64)
    y = op.measure(gt, sigma_y, generator=g)
    x_T = torch.randn(gt.shape, generator=g, dtype=torch.float64)
    res = paper_deq(GaussianEps(), coeffs, x_T, operator=op, y=y, solver="picard", max_iter=T, tol=0.0)
    fast = paper_deq(GaussianEps(), coeffs, x_T, operator=op, y=y, max_iter=30, tol=1e-10,
                      options={"lam_mode": "relative"})
    assert rel(fast.x0, res.x0) < 1e-5
    idx = [(0, 0, 0, 0), (1, 2, 5, 7), (3, 1, 15, 15)]
    for i in idx:
        assert abs(float(res.x0[i]) - closed_form_denoise(coeffs, float(x_T[i]), float(y[i]))) < 1e-8
    mse_y = float(((y - gt) ** 2).mean())
    mse = float(((res.x0 - gt) ** 2).mean())
    if noise_aware:
        # DDNM+-style weighting actually denoises: well below the noise of y, and not better than Bayes
        mmse = S**2 * (2 * sigma_y) ** 2 / (S**2 + (2 * sigma_y) ** 2)  # posterior variance: 0.125 vs 0.25 for y
        assert 0.98 * mmse < mse < 0.8 * mse_y
    else:
        # the official hard replacement returns y itself (A = I: x0 = A^+ y), ignoring sigma_y
        assert abs(mse - mse_y) < 1e-12


# ---- failure handling ---------------------------------------------------------------------------------------
class NaNModel(torch.nn.Module):
    def forward(self, x, t):
        out = torch.zeros_like(x)
        out[:, 0, 0, 0] = float("nan")
        return out


class ZeroModel(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def test_nan_model_ends_with_a_status_not_an_exception():
    coeffs, x_T, z, op, y = problem(6, "inpaint")
    res = paper_deq(NaNModel(), coeffs, x_T, operator=op, y=y, max_iter=6)
    assert res.stats.status == "nonfinite"


def test_singular_gram_is_handled():
    coeffs, x_T, z, op, y = problem(6, "inpaint")
    res = paper_deq(ZeroModel(), coeffs, x_T, operator=op, y=y, max_iter=8, tol=0.0, options={"lam": 0.0})
    assert torch.isfinite(res.x0).all()
    x0_seq, _ = sample_sequential(ZeroModel(), coeffs, x_T, operator=op, y=y)
    assert rel(res.x0, x0_seq) < 1e-9


def test_bad_options_are_clear():
    coeffs, x_T, z, op, y = problem(4, "denoise")
    with pytest.raises(ValueError, match="history_size|no option"):
        paper_deq(MODEL, coeffs, x_T, operator=op, y=y, options={"m": 3})
    with pytest.raises(ValueError, match="init"):
        paper_deq(MODEL, coeffs, x_T, operator=op, y=y, init="zeros")
    with pytest.raises(ValueError, match="solver"):
        paper_deq(MODEL, coeffs, x_T, operator=op, y=y, solver="broyden")


# ---- the step form of the map (same fixed point, one-step Jacobian, allows clipping) ---------------------
@pytest.mark.parametrize("task", [None, "sr_bicubic", "inpaint", "denoise"])
@pytest.mark.parametrize("clip", [False, True])
def test_step_form_picard_T_rounds_is_the_sequential_chain(task, clip):
    T = 10
    sigma_y = 0.1 if task == "denoise" else 0.0
    coeffs, x_T, z, op, y = problem(T, task, etw=1.0, nw=1.0, per_step=True, sigma_y=sigma_y)
    x0_seq, _, traj = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z, return_trajectory=True,
                                        clip_x0=clip)
    res = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, z=z, solver="picard", max_iter=T, tol=0.0, form="step",
                     clip_x0=clip)
    assert (res.states - traj).abs().max() < 1e-9
    if op is not None and sigma_y == 0:
        assert (op.A(res.x0) - y).abs().max() < 1e-5


@pytest.mark.parametrize("solver,options,max_iter", [pytest.param("picard", {}, 40, marks=pytest.mark.slow),
                                                     ("sliding_window", {"window": 4}, None)])
def test_step_form_solvers_reach_the_stochastic_chain(solver, options, max_iter):
    """(Anderson on this random, strongly expansive UNet does not converge in the step form; on the trained
    default model it reaches 45 dB to the sequential chain in 6-8 rounds — benchmarks/deq_vs_sequential.py.)"""
    T = 25
    coeffs, x_T, z, op, y = problem(T, "sr_bicubic", etw=1.0, nw=1.0, per_step=True)
    x0_seq, _ = sample_sequential(MODEL, coeffs, x_T, operator=op, y=y, z=z)
    res = paper_deq(MODEL, coeffs, x_T, operator=op, y=y, z=z, solver=solver, options=options, max_iter=max_iter,
                     tol=1e-7, form="step")
    assert res.stats.status == "converged"
    assert rel(res.x0, x0_seq) < 1e-4


def test_map_form_options_are_validated():
    coeffs, x_T, z, op, y = problem(4, "denoise")
    with pytest.raises(ValueError, match="form"):
        paper_deq(MODEL, coeffs, x_T, operator=op, y=y, form="jacobi")
    with pytest.raises(ValueError, match="step"):
        paper_deq(MODEL, coeffs, x_T, operator=op, y=y, clip_x0=True)
