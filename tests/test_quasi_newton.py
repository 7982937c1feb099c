"""quasi_newton (Newton-like sweeps, frontier window, per-slot freezing), the zero-cost inits, solver=auto."""
from __future__ import annotations

import math

import pytest
import torch
from test_deq_sampler import MODEL, problem, rel
from paper_settings import paper_deq
from tiny_models import TinyEps

from deqir.deq.joint_map import ChainMap
from deqir.deq.linearize import SpectralGaussianPrior, radial_bins
from deqir.deq.solvers import quasi_newton
from deqir.samplers.sequential import sample_sequential
from deqir.lit.autotune import choose_schedule, measure_batch_costs

SCORE_MODEL = TinyEps(seed=3, scale=0.2)


def _solve(model, T, task, sigma_y=0.0, **opts):
    coeffs, x_T, z, op, y = problem(T, task, etw=1.0, nw=1.0, per_step=True, sigma_y=sigma_y)
    x0_seq, _, traj = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z, return_trajectory=True)
    init = opts.pop("init", "surrogate")
    res = paper_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver="quasi_newton", options=opts,
                     max_iter=opts.pop("max_iter", None) or T, tol=opts.pop("tol", 1e-12), stop_mode="noise",
                     form="step", init=init)
    return res, x0_seq, traj


@pytest.mark.parametrize("task", [None, "sr_bicubic", "inpaint", "denoise"])
@pytest.mark.parametrize("window,history", [(None, 0), (None, 2), (3, 2)])
def test_exact_tolerance_gives_the_sequential_chain(task, window, history):
    """With tol = 0 and output_tol = 0 the solver can only stop once the prefix covers the chain: the result
    is the sequential chain (float64), for every window and secant history."""
    T = 12
    res, _, traj = _solve(MODEL, T, task, sigma_y=0.1 if task == "denoise" else 0.0, window=window,
                               history_size=history, output_tol=0.0, error_tol=0.0, tol=0.0)
    assert res.stats.status == "converged"
    assert (res.states - traj).abs().max() < 1e-9
    assert res.stats.rounds <= T
    B = traj.shape[0]
    w = T if window is None else window
    # work is counted exactly: the evaluated window of every round (frozen slots are never re-evaluated), plus
    # the first round's probes of the measured linearisation (7 levels, at most T // 3 = 4, one evaluation each)
    # on the full window
    probes = B * 4 if window is None else 0
    assert res.stats.nfe == B * sum(hi - lo for lo, hi in res.stats.window_trace.tolist()) + probes
    assert all(hi - lo <= w for lo, hi in res.stats.window_trace.tolist())


def test_window_one_is_the_sequential_schedule():
    T = 10
    res, x0_seq, _ = _solve(MODEL, T, "sr_bicubic", window=1, output_tol=0.0, error_tol=0.0, tol=0.0)
    assert res.stats.rounds == T and res.nfe == T * x0_seq.shape[0]
    assert rel(res.x0, x0_seq) < 1e-12


@pytest.mark.parametrize("task", ["sr_bicubic", "inpaint"])
def test_fewer_rounds_than_picard_on_a_score_like_model(task):
    """On a model whose Jacobian has a trained prior's scale (TinyEps: a white Gaussian prior of variance 0.25
    plus a nonlinearity), with the linearisation's prior set to match its Gaussian part, the sweeps need fewer
    rounds than Picard to the same accuracy, and the stop rule (x0 change < half an 8-bit level) lands inside
    45 dB of the sequential chain."""
    prior = {"prior_slope": 1e-3, "prior_variance": 0.25}  # ~ white spectrum, TinyEps' Gaussian part
    T = 25
    coeffs, x_T, z, op, y = problem(T, task, etw=1.0, nw=1.0, per_step=True)
    x0_seq, _ = sample_sequential(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z)

    def rounds_to(solver, init, **options):
        errs = []
        paper_deq(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z, solver=solver, options=options, max_iter=T,
                   tol=0.0, stop_mode="noise" if solver == "quasi_newton" else "abs", form="step", init=init,
                   callback=lambda info: errs.append(float((info["last_slot"] - x0_seq).abs().max())))
        return next(i + 1 for i, e in enumerate(errs) if e < 1e-4)

    qn = rounds_to("quasi_newton", "surrogate", output_tol=0.0, error_tol=0.0, **prior)
    pic = rounds_to("picard", "x_T")
    assert qn < pic
    res = paper_deq(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z, solver="quasi_newton", max_iter=T, tol=0.05,
                     stop_mode="noise", form="step", init="surrogate", options=prior)
    assert res.stats.status == "converged" and res.stats.rounds < T
    psnr = -20 * math.log10(float(((res.x0 - x0_seq) / 2).pow(2).mean().sqrt()))
    assert psnr > 45


def test_zero_cost_inits_call_no_model_and_keep_data_consistency():
    T = 8
    coeffs, x_T, z, op, y = problem(T, "inpaint", etw=1.0, nw=1.0, per_step=True)

    def boom(x, t):
        raise AssertionError("the init must not call the model")

    fmap = ChainMap(boom, coeffs, x_T, operator=op, y=y, z=z, form="step")
    for X in (fmap.surrogate_state(SpectralGaussianPrior()), fmap.extrapolated_state()):
        assert X.shape == (x_T.shape[0], T, *x_T.shape[1:])
        assert (op.A(X[:, -1]) - y).abs().max() < 1e-9  # the last slot is x0: A x0 = y (noiseless DDNM)


def test_linear_step_matches_the_gaussian_model_jacobian():
    """For an eps-model that *is* the Gaussian prior's posterior denoiser, M_j is the exact step Jacobian."""
    prior = SpectralGaussianPrior(slope=2.0, variance=0.3)
    T = 6
    coeffs, x_T, z, op, y = problem(T, "sr_bicubic", etw=0.5, nw=0.5, per_step=True)

    def gaussian_eps(x, t):
        a = float(coeffs.a[(coeffs.t == int(t[0])).nonzero()[0, 0]])
        return (x - a**0.5 * prior.gain(x, a)) / (1 - a) ** 0.5

    fmap = ChainMap(gaussian_eps, coeffs, x_T, operator=op, y=y, z=z, form="step")
    X = fmap.surrogate_state(prior)
    v = torch.randn_like(X[:, 0])
    j = 3
    Xp = X.clone()
    Xp[:, j - 1] += 1e-3 * v
    jvp = (fmap.eval_eps(Xp, j, j + 1) - fmap.eval_eps(X, j, j + 1))[:, 0] / 1e-3
    assert rel(fmap.linear_step(v, j, prior), jvp) < 1e-6


def _ring_model(coeffs, k):
    """An affine eps-model whose denoiser is a fixed ring-wise Fourier multiplier k[ring] (any level)."""
    def eps(x, t):
        ring = radial_bins(x.shape[-2], x.shape[-1], k.numel())
        idx = torch.stack([(coeffs.t == int(ti)).nonzero()[0, 0] for ti in t])
        a = coeffs.a[idx].to(x.dtype).view(-1, 1, 1, 1)
        x0 = torch.fft.ifft2(torch.fft.fft2(x, norm="ortho") * k[ring].to(x.dtype), norm="ortho").real
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return eps


def test_measured_gain_recovers_the_models_fourier_gain():
    """eval_eps_calibrated returns eval_eps' states and, for a model whose denoiser is a ring multiplier, that
    multiplier at every probed level (finite differences are exact for an affine model)."""
    T = 8
    coeffs, x_T, z, op, y = problem(T, "inpaint", etw=1.0, nw=1.0, per_step=True)
    k = torch.linspace(1.0, 0.1, 24, dtype=torch.float64) ** 2
    fmap = ChainMap(_ring_model(coeffs, k), coeffs, x_T, operator=op, y=y, z=z, form="step")
    X = fmap.surrogate_state(SpectralGaussianPrior())
    new, gain = fmap.eval_eps_calibrated(X, 0, T, levels=4, nbins=24)
    assert rel(new, fmap.eval_eps(X, 0, T)) < 1e-12
    C = x_T.shape[1]
    assert gain.K.shape == (x_T.shape[0], 4, C, C, 24) and gain.levels.numel() == 4
    present = torch.bincount(radial_bins(*x_T.shape[-2:], 24).flatten(), minlength=24) > 0
    eye = torch.eye(C, dtype=torch.float64)[:, :, None]  # the model does not mix channels
    assert (gain.K[..., present] - eye * k[present]).abs().max() < 1e-9
    v = torch.randn_like(X[:, 0])
    a = float(coeffs.a[3])  # between probed levels: interpolated, still k
    ring = radial_bins(*v.shape[-2:], 24)
    ref = torch.fft.ifft2(torch.fft.fft2(v, norm="ortho") * k[ring], norm="ortho").real
    assert rel(gain.gain(v, a), ref) < 1e-9
    with pytest.raises(ValueError, match="levels"):
        fmap.eval_eps_calibrated(X, 0, T, levels=0)


def test_measured_linearisation_makes_newton_exact_on_an_affine_model():
    """With the model's own gain the sweep is Newton's method with the exact Jacobian: on an affine model the
    first round already gives the sequential chain; the Gaussian prior's linearisation needs more rounds."""
    T = 10
    coeffs, x_T, z, op, y = problem(T, "inpaint", etw=1.0, nw=1.0, per_step=True)
    # 4 rings: what eval_eps_calibrated measures on the 16-px test images (min(H, W) // 5, at least 4)
    model = _ring_model(coeffs, torch.linspace(1.0, 0.2, 4, dtype=torch.float64))
    x0_seq, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z)

    def errors(levels):
        errs = []
        paper_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver="quasi_newton", max_iter=T, tol=0.0,
                  stop_mode="noise", form="step", init="surrogate",
                  options={"output_tol": 0.0, "error_tol": 0.0, "calibration_levels": levels, "history_size": 0},
                  callback=lambda info: errs.append(float((info["last_slot"] - x0_seq).abs().max())))
        return errs

    assert errors(5)[0] < 1e-9
    assert errors(0)[0] > 1e-3


def test_options_are_validated():
    coeffs, x_T, z, op, y = problem(4, "sr_bicubic", etw=1.0, nw=1.0, per_step=True)
    kw = dict(operator=op, y=y, z=z, solver="quasi_newton", max_iter=4, form="step")
    with pytest.raises(ValueError, match="noise"):
        paper_deq(MODEL, coeffs, x_T, stop_mode="rel", **kw)
    for bad in ({"window": 0}, {"history_size": -1}, {"output_tol": -1.0}, {"prior_slope": 0.0},
                {"calibration_levels": -1}, {"calibration_levels": 1.5}, {"error_tol": -1.0},
                {"error_tol": float("nan")}, {"error_tol": True}, {"error_tol": "1"}):
        with pytest.raises(ValueError):
            paper_deq(MODEL, coeffs, x_T, stop_mode="noise", options=bad, **kw)
    fmap = ChainMap(MODEL, coeffs, x_T, operator=op, y=y, z=z, form="cumsum")
    with pytest.raises(ValueError, match="step"):
        quasi_newton(fmap, fmap.initial_state(), stop_mode="noise")


def test_auto_schedule_from_measured_costs():
    T = 25
    gpu = choose_schedule({1: 1.0, 2: 1.0, 4: 1.02, 8: 1.05, 16: 1.1, 32: 1.3}, T, 1)
    assert gpu.schedule == "all_slots" and gpu.window is None
    cpu = choose_schedule({1: 1.0, 2: 1.95}, T, 1)
    assert cpu.schedule == "sequential" and "no idle batch capacity" in cpu.reason
    mid = choose_schedule({1: 1.0, 2: 1.0, 4: 1.1, 8: 1.4, 16: 2.6}, T, 2)
    assert mid.schedule == "window" and mid.window == 4 and mid.max_batch == 8
    calls = []

    def fake(x, t):
        calls.append(x.shape[0])
        return x

    costs = measure_batch_costs(fake, torch.zeros(1, 3, 8, 8), 500, max_size=6, knee_factor=1e9)
    assert sorted(costs) == [1, 2, 4, 6] and calls[0] == 1  # warm-up, then doubling up to the cap


def test_app_solver_auto_reports_its_choice_and_quasi_newton_matches_sequential(tmp_path, capsys):
    """invert.py: solver=auto (the default) records what it chose and why; quasi_newton at zero tolerance gives
    the sequential sampler's images."""
    import json

    from app_support import TINY, pixels, run_inprocess

    run_inprocess(TINY + ["solver=auto"], tmp_path / "auto")
    choice = json.loads((tmp_path / "auto" / "metrics.json").read_text())["solver_choice"]
    assert choice["schedule"] in ("all_slots", "window", "sequential") and choice["reason"]
    assert "1" in choice["batch_cost_s"]
    assert "solver=auto ->" in capsys.readouterr().out
    run_inprocess(TINY + ["solver=quasi_newton", "solver.tol=0", "solver.output_tol=0", "solver.error_tol=0"], tmp_path / "qn")
    run_inprocess(TINY + ["sampler=sequential"], tmp_path / "seq")
    for png in sorted((tmp_path / "seq" / "images").glob("*.png")):
        diff = pixels(png).astype(int) - pixels(tmp_path / "qn" / "images" / png.name).astype(int)
        assert abs(diff).max() <= 1


def test_deterministic_chains_use_the_deterministic_tolerance():
    """A chain without fresh noise (DDIM eta = 0) cannot hide accepted errors under noise: quasi_newton then
    solves with ``deterministic_tol`` (the same result as passing it as ``tol``); stochastic chains use ``tol``."""
    from deqir.chains import make_step

    T = 8
    for nw, fresh in ((0.0, False), (1.0, True)):
        coeffs, x_T, z, op, y = problem(T, "sr_bicubic", etw=1.0, nw=nw, per_step=True)
        fmap = ChainMap(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z, form="step")
        assert fmap.fresh_noise is fresh
        z0 = x_T[:, None].expand(-1, T, -1, -1, -1).clone()
        a, sa = quasi_newton(fmap, z0, tol=0.3, deterministic_tol=0.01)
        b, sb = quasi_newton(fmap, z0, tol=0.3 if fresh else 0.01, deterministic_tol=0.3 if fresh else 0.01)
        assert torch.equal(a, b) and sa.rounds == sb.rounds
    coeffs, x_T, z, op, y = problem(T, "sr_bicubic", etw=1.0, nw=1.0, per_step=True)
    flags = {name: make_step(name, coeffs, operator=op, y=y, z=z, **kw).fresh_noise for name, kw in (
        ("ddrm", {"eta": 0.0}), ("diffpir", {"zeta": 0.0}), ("diffpir", {"zeta": 0.3}), ("pigdm", {"eta": 0.0}),
        ("dps", {"eta": 0.5}))}
    assert flags == {"ddrm": True, "diffpir": True, "pigdm": False, "dps": True}  # (diffpir: the last one, 0.3)
    assert make_step("diffpir", coeffs, operator=op, y=y, z=z, zeta=0.0).fresh_noise is False
    with pytest.raises(ValueError, match="deterministic_tol"):
        quasi_newton(fmap, z0, deterministic_tol=-1.0)


def test_deterministic_chains_freeze_only_what_stays_invisible_at_the_output():
    """carried_tol: on a chain without fresh noise a slot joins the converged prefix only when its change, carried
    to x0 by the sweep's linear model, is below carried_tol 8-bit levels RMS. With a loose slot tolerance the
    noise rule alone freezes slots whose errors reach x0; the carried test keeps them in the solve. A chain with
    fresh noise is untouched (its noise washes accepted errors out)."""
    from deqir.deq.solvers.newton import LEVEL

    T = 10
    errors = {}
    for nw in (0.0, 1.0):
        coeffs, x_T, z, op, y = problem(T, None, etw=1.0, nw=nw, per_step=True)
        fmap = ChainMap(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z, form="step")
        x0_seq, _ = sample_sequential(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z)
        z0 = fmap.surrogate_state(SpectralGaussianPrior())
        for carried in (math.inf, 0.05):
            x, st = quasi_newton(fmap, z0, tol=0.3, deterministic_tol=0.3, carried_tol=carried)
            assert st.status == "converged"
            rms = float(((x[:, -1] - x0_seq) ** 2).mean().sqrt())
            errors[nw, carried] = (rms / LEVEL, st.rounds, x)
    off, on = errors[0.0, math.inf], errors[0.0, 0.05]
    assert off[0] > 0.8 and on[0] < 0.4 * off[0] and on[1] >= off[1]  # (1.08 and 0.22 levels here)
    assert torch.equal(errors[1.0, math.inf][2], errors[1.0, 0.05][2])  # fresh noise: no change
    for bad in (-1.0, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="carried_tol"):
            quasi_newton(fmap, z0, carried_tol=bad)


@pytest.mark.parametrize("task", ["sr_bicubic", "inpaint", None])
def test_error_estimate_stops_at_its_tolerance(task):
    """error_tol: with every other stop off (tol = output_tol = 0: no slot freezes, the frontier covers the chain only
    after T rounds), the solve stops once x0's estimated remaining error, d_k q / (1 - q), is below error_tol 8-bit
    levels RMS. It then stops long before T, its true error to the sequential chain is below error_tol, and a
    tighter error_tol never stops sooner; error_tol = inf runs the T rounds."""
    from deqir.deq.solvers.newton import LEVEL

    T = 10
    coeffs, x_T, z, op, y = problem(T, task, etw=1.0, nw=1.0, per_step=True)
    fmap = ChainMap(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z, form="step")
    x0_seq, _ = sample_sequential(SCORE_MODEL, coeffs, x_T, operator=op, y=y, z=z)
    z0 = fmap.surrogate_state(SpectralGaussianPrior(1e-3, 0.25))
    rounds = []
    for error_tol in (math.inf, 1.0, 0.3, 0.1):
        x, st = quasi_newton(fmap, z0, tol=0.0, output_tol=0.0, error_tol=error_tol, prior_slope=1e-3,
                             prior_variance=0.25)
        assert st.status == "converged"
        err = float(((x[:, -1] - x0_seq) ** 2).mean().sqrt()) / LEVEL
        assert err < min(error_tol, 1e9)
        rounds.append(st.rounds)
    assert rounds[0] == T and max(rounds[1:]) <= T // 2
    assert rounds[1:] == sorted(rounds[1:])
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="error_tol"):
            quasi_newton(fmap, z0, error_tol=bad)
    with pytest.raises(ValueError, match=r"on the command line write solver.error_tol=inf"):
        quasi_newton(fmap, z0, error_tol=".inf")  # what `solver.error_tol=.inf` passes: the fix is in the message


class _ShiftChain:
    """X_j = X_{j-1} + b_j (X_{-1} = x_T) with a zero linear model, so the sweep is Picard's: every round moves each
    slot's error one slot down, and x0's error after round k is the start's error at slot S - 1 - k (a convergence
    history chosen by the start)."""

    fresh_noise = True
    linearizable = False

    def __init__(self, x_T, b):
        self.x_T, self.b = x_T, b  # (B, *img), (S, *img)
        self.num_slots = b.shape[0]
        self.slot_noise_std = torch.ones(self.num_slots)

    def solution(self):
        return self.x_T[:, None] + torch.cumsum(self.b, dim=0)[None]

    def eval_eps(self, z, lo, hi):
        prev = torch.cat([self.x_T[:, None], z[:, :-1]], dim=1)
        return prev[:, lo:hi] + self.b[None, lo:hi]

    def linear_step(self, v, j, prior):
        return torch.zeros_like(v)


def test_error_estimate_trusts_the_slower_of_the_last_two_rates():
    """A sudden drop of x0's change (box inpainting, docs/solvers.md "The error estimate") must not stop the solve:
    x0's error after rounds 1, 2, ... is 64, 32, 4, 2, 1, 0.5 levels, so after round 4 the last rate alone (2 / 28)
    would estimate 0.15 levels left while 2 are; with the slower of the last two rates the solve stops at round 6,
    0.5 levels from the solution, below error_tol."""
    from deqir.deq.solvers.newton import LEVEL

    S = 12
    g = torch.Generator().manual_seed(0)
    f = _ShiftChain(torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64),
                    0.1 * torch.randn(S, 1, 4, 4, generator=g, dtype=torch.float64))
    errors = [128.0 / 2 ** (S - 1 - j) for j in range(S)]  # start's error per slot, in levels ...
    for j, e in zip((S - 1, S - 2, S - 3, S - 4, S - 5, S - 6, S - 7), (128, 64, 32, 4, 2, 1, 0.5)):
        errors[j] = e  # ... so that x0's error after round k is errors[S - 1 - k]
    z0 = f.solution() + torch.tensor(errors, dtype=torch.float64).view(1, S, 1, 1, 1) * LEVEL
    x, st = quasi_newton(f, z0, tol=0.0, output_tol=0.0, error_tol=0.9, history_size=0, calibration_levels=0)
    err = float((x[:, -1] - f.solution()[:, -1]).pow(2).mean().sqrt()) / LEVEL
    assert st.rounds == 6 and abs(err - 0.5) < 1e-9
    x, st = quasi_newton(f, z0, tol=0.0, output_tol=0.0, error_tol=math.inf, history_size=0, calibration_levels=0)
    assert st.rounds == S and float((x - f.solution()).abs().max()) < 1e-12  # off: Picard's S rounds, exact


@pytest.mark.parametrize("S", [25, 100])
def test_the_slot_floor_shrinks_with_the_chain_so_accepted_errors_do_not_add_up(S):
    """Each low-noise slot freezes once its change is below the floor, and its accepted error reaches x0 along a
    near-identity transport, so on a long chain those errors add up (inpainting at T = 100 stopped 42.7 dB from its
    sequential result, docs/solvers.md "The slot floor"). On a shift chain started e = 0.3 levels off per slot
    (residual -e everywhere), a floor of 0.5 levels accepts the whole chain in one round with x0 (S - 2) e off; the
    default floor, 0.5 x sqrt(25 / S) beyond 25 slots, still accepts it at S = 25 but not at S = 100, where the solve
    runs on to the exact chain."""
    from deqir.deq.solvers.newton import LEVEL, slot_floor_levels

    assert slot_floor_levels(0.5, S) == (0.5 if S == 25 else 0.25)
    assert slot_floor_levels(0.5, 10) == 0.5 and slot_floor_levels(0.5, 100, slot_floor=0.1) == 0.1
    g = torch.Generator().manual_seed(1)
    f = _ShiftChain(torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64),
                    0.1 * torch.randn(S, 1, 4, 4, generator=g, dtype=torch.float64))
    f.slot_noise_std = torch.full((S,), 1e-6)  # tol * sigma far below the floor: the floor decides
    e = 0.3
    z0 = f.solution() + e * LEVEL * torch.arange(S, dtype=torch.float64).view(1, S, 1, 1, 1)
    opts = dict(tol=0.02, error_tol=math.inf, history_size=0, calibration_levels=0)

    def x0_error(x):
        return float((x[:, -1] - f.solution()[:, -1]).pow(2).mean().sqrt()) / LEVEL

    x, st = quasi_newton(f, z0, slot_floor=0.5, **opts)
    assert st.rounds == 1 and abs(x0_error(x) - (S - 2) * e) < 1e-6
    x, st = quasi_newton(f, z0, **opts)
    if S == 25:
        assert st.rounds == 1
    else:
        assert st.rounds > 1 and x0_error(x) < 1e-9
    for bad in (-1.0, float("inf"), float("nan"), "1", True):
        with pytest.raises(ValueError, match="slot_floor"):
            quasi_newton(f, z0, slot_floor=bad)
