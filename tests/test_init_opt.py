"""Initialization optimization and inversion (deqir.optim) on a tiny float64 eps-model."""
from __future__ import annotations

import math

import pytest
import torch

from deqir.deq.grad import DEQGradientConfig
from deqir.deq.joint_map import ChainMap
from deqir.deq.solvers import picard
from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.samplers.sequential import sample_sequential
from deqir.metrics import lpips_available
from deqir.operators import make_operator
from paper_settings import paper_invert_image, paper_optimize_init, paper_solve
from tiny_models import TinyEps
from deqir.optim import (
    InitOptResult,
    LossTerms,
    ddim_invert,
    prior_loss,
)

DT = torch.float64
SCHEDULE = NoiseSchedule.create()
SHAPE = (3, 16, 16)
T = 6
EXACT = paper_solve(solver="picard", max_iter=T, tol=0.0)  # exact equilibrium every step


@pytest.fixture(scope="module")
def model():
    return TinyEps()


def _images(B: int = 2) -> torch.Tensor:
    u = torch.linspace(-1, 1, SHAPE[1], dtype=DT)
    base = 0.6 * torch.sin(3 * u)[:, None] * torch.cos(2 * u)[None, :]
    imgs = torch.stack([base, base.T, -base])[None].repeat(B, 1, 1, 1)
    for b in range(1, B):
        imgs[b] = -0.8 * imgs[b].flip(-1)
    return imgs


def _noisy_sr(B: int = 2, sigma: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gt = _images(B)
    op = make_operator("sr_avgpool", SHAPE, scale=2).to(DT)
    y = op.A(gt) + sigma * torch.randn(op.A(gt).shape, generator=g, dtype=DT)
    co = make_chain(SCHEDULE, SamplingGrid.create(T), sigma_y_eff=sigma * op.pinv_noise_gain(), etw=0.0, nw=0.0)
    x_T0 = torch.randn(B, *SHAPE, generator=g, dtype=DT)
    return co, op, y, gt, x_T0


def _column(res: InitOptResult, key: str, b: int) -> list[float]:
    return [h[key][b] for h in res.history]


def test_consistency_decreases_on_noisy_problem(model):
    co, op, y, gt, x_T0 = _noisy_sr()
    assert bool((co.lam < 1).any())  # noise-aware chain: A x0 != y, the term is informative
    res = paper_optimize_init(model, co, x_T0, losses={"consistency": 1.0}, operator=op, y=y, steps=6, lr=0.1,
                        solve=EXACT)
    assert len(res.history) == 7 and not res.uses_oracle
    for b in range(2):
        c = _column(res, "consistency", b)
        assert c[-1] < 0.6 * c[0]
        assert res.best_loss[b] == pytest.approx(min(c))
    assert res.x_T_best.shape == x_T0.shape and res.states.shape == (2, T, *SHAPE)
    assert all(h["uses_oracle"] is False for h in res.history)
    assert all(h["adjoint_rounds"] is not None for h in res.history[:-1])


GRADIENTS = [DEQGradientConfig(mode="ift"), DEQGradientConfig(mode="phantom"),
             DEQGradientConfig(mode="unroll", unroll_rounds=T)]


@pytest.mark.parametrize("gradient", GRADIENTS, ids=["ift", "phantom", "unroll"])
def test_oracle_decreases_and_is_flagged(model, gradient):
    # (a truncated unroll, k = 2, ascends on this score-like model: docs/gradients.md)
    co, op, y, gt, x_T0 = _noisy_sr()
    res = paper_optimize_init(model, co, x_T0, losses={"oracle": 1.0, "prior": 0.01}, operator=op, y=y, ground_truth=gt,
                        steps=5, lr=0.1, solve=EXACT, gradient=gradient)
    assert res.uses_oracle and all(h["uses_oracle"] for h in res.history)
    for b in range(2):
        o = _column(res, "oracle", b)
        assert o[-1] < 0.8 * o[0]
        psnr = _column(res, "psnr", b)
        assert psnr[-1] > psnr[0]
    assert set(res.history[0]) >= {"step", "loss", "oracle", "prior", "psnr", "active", "solver_rounds", "nfe",
                                   "image_nfe", "solver_residual", "solver_converged", "adjoint_rounds", "uses_oracle"}
    rows = res.summary()
    assert len(rows) == 2 and rows[0]["uses_oracle"] and rows[0]["evaluations"] == 6
    attach = gradient.unroll_rounds if gradient.mode == "unroll" else gradient.phantom_steps if \
        gradient.mode == "phantom" else 1
    assert rows[0]["nfe"] == sum(h["image_nfe"][0] for h in res.history) == 6 * (T + attach) * T  # T Picard rounds
    assert rows[0]["psnr_best"] >= rows[0]["psnr_init"]


def test_keeps_best_and_states_match_best_x_T(model):
    co, op, y, gt, x_T0 = _noisy_sr()
    # a huge learning rate makes the objective non-monotone; the result must still be the best evaluation
    res = paper_optimize_init(model, co, x_T0, losses={"oracle": 1.0}, operator=op, y=y, ground_truth=gt, steps=6,
                        lr=3.0, solve=EXACT)
    for b in range(2):
        losses = _column(res, "loss", b)
        assert res.best_loss[b] == min(losses) and losses[res.best_step[b]] == min(losses)
    # x0_best is the chain restored from x_T_best
    x0, _ = sample_sequential(model, co, res.x_T_best, operator=op, y=y)
    torch.testing.assert_close(res.x0_best, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.states[:, -1], res.x0_best, rtol=0, atol=0)


def test_step_zero_is_the_start(model):
    co, op, y, gt, x_T0 = _noisy_sr()
    res = paper_optimize_init(model, co, x_T0, losses={"oracle": 1.0}, operator=op, y=y, ground_truth=gt, steps=0,
                        solve=EXACT)
    assert len(res.history) == 1 and res.best_step == [0, 0]
    torch.testing.assert_close(res.x_T_best, x_T0, rtol=0, atol=0)


def test_images_are_independent(model):
    """B = 2 optimised together == each alone, including per-image early stopping."""
    co, op, y, gt, x_T0 = _noisy_sr()
    gt[1] *= 3.0  # a harder target: image 1 keeps a larger loss than image 0
    common = dict(losses={"oracle": 1.0}, operator=op, steps=6, lr=0.1, solve=paper_solve(tol=1e-6),
                  patience=2, min_improvement=0.0)
    alone = [paper_optimize_init(model, co, x_T0[b:b + 1], y=y[b:b + 1], ground_truth=gt[b:b + 1], **common)
             for b in range(2)]
    # stop image 0 early: threshold between its losses at steps 2 and 3
    l0 = _column(alone[0], "loss", 0)
    stop = 0.5 * (l0[2] + l0[3])
    alone = [paper_optimize_init(model, co, x_T0[b:b + 1], y=y[b:b + 1], ground_truth=gt[b:b + 1], stop_below=stop,
                           **common) for b in range(2)]
    both = paper_optimize_init(model, co, x_T0, y=y, ground_truth=gt, stop_below=stop, **common)
    assert both.status[0] == "stop_below" and alone[0].status == ["stop_below"]
    assert both.status[1] == alone[1].status[0] != "stop_below"
    for b in range(2):
        torch.testing.assert_close(both.x_T_best[b:b + 1], alone[b].x_T_best, rtol=0, atol=1e-12)
        torch.testing.assert_close(both.x0_best[b:b + 1], alone[b].x0_best, rtol=0, atol=1e-12)
        assert both.best_step[b] == alone[b].best_step[0]
        mine = [v for v in _column(both, "loss", b) if not math.isnan(v)]
        assert mine == pytest.approx(_column(alone[b], "loss", 0), rel=1e-10)


def test_warm_start_saves_rounds(model):
    co, op, y, gt, x_T0 = _noisy_sr()
    T_long = 20
    co = make_chain(SCHEDULE, SamplingGrid.create(T_long), sigma_y_eff=0.1 * op.pinv_noise_gain(), etw=0.0, nw=0.0)
    kw = dict(losses={"oracle": 1.0}, operator=op, y=y, ground_truth=gt, steps=3, lr=0.01)
    rounds = {}
    for warm in (True, False):
        res = paper_optimize_init(model, co, x_T0, solve=paper_solve(tol=1e-3, max_iter=2 * T_long, warm_start=warm), **kw)
        rounds[warm] = [h["solver_rounds"] for h in res.history]
    assert rounds[True][0] == rounds[False][0]
    assert sum(rounds[True][1:]) < sum(rounds[False][1:])


def test_callback_and_no_grad_context(model):
    co, op, y, gt, x_T0 = _noisy_sr()
    seen = []
    with torch.no_grad():  # autograd is enabled inside
        res = paper_optimize_init(model, co, x_T0, losses={"oracle": 1.0}, operator=op, y=y, ground_truth=gt, steps=3,
                            lr=0.1, solve=EXACT, callback=seen.append)
    assert [s["step"] for s in seen] == [0, 1, 2, 3]
    assert seen[0]["x0"].shape == (2, *SHAPE) and seen[0]["index"].tolist() == [0, 1]
    assert _column(res, "oracle", 0)[-1] < _column(res, "oracle", 0)[0]


def test_inference_mode_raises(model):
    co, op, y, gt, x_T0 = _noisy_sr()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            paper_optimize_init(model, co, x_T0, losses={"oracle": 1.0}, ground_truth=gt, steps=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"losses": {"fidelity": 1.0}}, "unknown loss"),
    ({"losses": {"oracle": 0.0}}, "positive"),
    ({"losses": {"oracle": -1.0}, "ground_truth": "gt"}, ">= 0"),
    ({"losses": {"oracle": 1.0}}, "ground_truth"),
    ({"losses": {"reference": 1.0}}, "reference"),
    ({"losses": {"consistency": 1.0}}, "operator and y"),
    ({"losses": {"prior": 1.0}, "steps": -1}, "steps"),
    ({"losses": {"prior": 1.0}, "reference_kind": "ssim", "reference": "gt"}, None),
])
def test_argument_validation(model, kwargs, match):
    co, op, y, gt, x_T0 = _noisy_sr()
    kwargs = {k: (gt if v == "gt" else v) for k, v in kwargs.items()}
    if match is None:  # reference_kind is only checked when the reference term is used
        paper_optimize_init(model, co, x_T0, steps=0, solve=EXACT, **kwargs)
        with pytest.raises(ValueError, match="reference_kind"):
            paper_optimize_init(model, co, x_T0, steps=0, **{**kwargs, "losses": {"reference": 1.0}})
        return
    with pytest.raises(ValueError, match=match):
        paper_optimize_init(model, co, x_T0, **kwargs)


def test_prior_loss_and_reference_l2(model):
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert float(prior_loss(x).max()) < 1e-3  # Gaussian samples sit on the shell
    assert float(prior_loss(2 * x).min()) > 8.0  # (4 - 1)^2 = 9
    terms = LossTerms({"reference": 2.0, "prior": 1.0}, reference=x[:2], reference_kind="l2")
    out = terms(x[:2] + 0.1, x[:2])
    torch.testing.assert_close(out["reference"], torch.full((2,), 0.01, dtype=DT))
    torch.testing.assert_close(out["total"], 2 * out["reference"] + out["prior"])
    # "steer the generation direction": an l2 reference pulls x0 towards it
    co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.0, nw=0.0)
    ref = _images(1)
    res = paper_optimize_init(model, co, torch.randn(1, *SHAPE, dtype=DT), losses={"reference": 1.0}, reference=ref,
                        reference_kind="l2", steps=4, lr=0.1, solve=EXACT)
    r = _column(res, "reference", 0)
    assert r[-1] < r[0] and not res.uses_oracle


def test_lpips_missing_weights_message(monkeypatch):
    import deqir.metrics as metrics

    class Missing:
        def __init__(self, *a, **k):
            raise FileNotFoundError("no backbone")

    monkeypatch.setattr(metrics, "LPIPSLoss", Missing)
    with pytest.raises(FileNotFoundError, match="reference_kind='l2'"):
        LossTerms({"reference": 1.0}, reference=torch.zeros(1, *SHAPE))


@pytest.mark.skipif(not lpips_available("vgg"), reason="no offline LPIPS-VGG weights")
def test_lpips_reference_steers_colorization(model):
    """Colorization: x0 keeps A x0 = y (gray), the LPIPS reference moves the colours (docs/gradients.md; the paper's Fig. 5)."""
    op = make_operator("colorize", SHAPE).to(DT)
    gt = _images(1)
    y = op.A(gt)
    ref = torch.stack([gt[0, 0].abs(), -gt[0, 1].abs(), gt[0, 2]])[None]
    co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.0, nw=0.0)
    res = paper_optimize_init(model, co, torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=DT),
                        losses={"reference": 1.0}, operator=op, y=y, reference=ref, steps=4, lr=0.2, solve=EXACT)
    r = _column(res, "reference", 0)
    assert min(r[1:]) < r[0]
    torch.testing.assert_close(op.A(res.x0_best), y, rtol=0, atol=1e-8)


def test_ddim_inversion_path(model):
    x = _images(2)
    co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.0, nw=0.0)
    x_T, states = ddim_invert(model, co, x, return_states=True)
    assert x_T.shape == x.shape and states.shape == (2, T, *SHAPE)
    torch.testing.assert_close(states[:, -1], x, rtol=0, atol=0)
    # the DDIM path is nearly a fixed point of the chain map from the inverted x_T
    fmap = ChainMap(model, co, x_T, form="cumsum")
    exact, _ = picard(fmap, states, max_iter=T, tol=0.0)
    assert float((exact[:, -1] - x).abs().max()) < 1.0


@pytest.mark.parametrize("etw, nw", [(0.0, 0.0), (0.5, 0.5)])
def test_fixed_point_inversion_inverts_the_chain(model, etw, nw):
    """fixed_point_invert solves Phi_j(h_j) = h_{j+1} step by step: the chain run from its x_T reproduces the
    image, far better than DDIM inversion, and better with more iterations; its states are that chain's."""
    from deqir.optim import fixed_point_invert

    x = _images(2)
    n = 10  # the fixed point (3) contracts faster the finer the grid
    co = make_chain(SCHEDULE, SamplingGrid.create(n), etw=etw, nw=nw)
    z = torch.randn(2, n, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=DT) if nw else None
    err = {}
    for k in (1, 3, 20):
        x_T, states = fixed_point_invert(model, co, x, iters=k, z=z, return_states=True)
        x0, _ = sample_sequential(model, co, x_T, z=z)
        err[k] = float((x0 - x).abs().max())
    assert err[20] < 1e-3 and err[20] < err[3] < err[1]  # geometric convergence
    torch.testing.assert_close(states[:, -1], x, rtol=0, atol=0)
    _, traj_states = fixed_point_invert(model, co, x, iters=20, z=z, return_states=True)
    seq, _, traj = sample_sequential(model, co, x_T, z=z, return_trajectory=True)
    torch.testing.assert_close(traj, traj_states, rtol=0, atol=5e-3)
    if not nw:
        x0_ddim, _ = sample_sequential(model, co, ddim_invert(model, co, x))
        assert float((x0_ddim - x).abs().max()) > 100 * err[20]
    with pytest.raises(ValueError, match="iters"):
        fixed_point_invert(model, co, x, iters=0, z=z)


def test_inversion_improves_reconstruction(model):
    x = _images(2)
    co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.0, nw=0.0)
    res = paper_invert_image(model, co, x, init="ddim", steps=6, lr=0.05, solve=EXACT)
    start = _column(res, "psnr", 0)[0]
    x0_start, _ = sample_sequential(model, co, res.x_T_init)
    mse = float(((x0_start[:1] - x[:1]) / 2).square().mean())
    assert start == pytest.approx(-10 * math.log10(mse), abs=1e-6)  # step 0 = the DDIM-inversion start
    for b in range(2):
        p = _column(res, "psnr", b)
        assert max(p) > p[0] + 1.0
    assert not res.uses_oracle and set(res.loss_weights) == {"reference"}


def test_inversion_with_operator_and_noise_init(model):
    x = _images(1)
    op = make_operator("sr_avgpool", SHAPE, scale=2).to(DT)
    co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.0, nw=0.0)
    res = paper_invert_image(model, co, x, operator=op, init="noise", generator=torch.Generator().manual_seed(0), steps=4,
                       lr=0.1, solve=EXACT)
    p = _column(res, "psnr", 0)
    assert p[-1] > p[0]
    torch.testing.assert_close(op.A(res.x0_best), op.A(x), rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="unknown init"):
        paper_invert_image(model, co, x, init="zeros")


def test_patience_stops_an_image(model):
    co, op, y, gt, x_T0 = _noisy_sr()
    res = paper_optimize_init(model, co, x_T0, losses={"oracle": 1.0}, operator=op, y=y, ground_truth=gt, steps=30,
                        lr=3.0, patience=2, solve=EXACT)
    assert "patience" in res.status
    for b, st in enumerate(res.status):
        losses = [v for v in _column(res, "loss", b) if not math.isnan(v)]
        if st == "patience":  # the last two evaluations did not beat the best one before them
            assert len(losses) < 31 and min(losses[-2:]) >= min(losses[:-2])
