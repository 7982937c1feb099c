"""Gradients through the equilibrium (deqir.deq.grad) against autograd through the sequential chain.

Tiny eps-models in float64: the random-init DDPMUNet (16x16) for the headline checks, a two-conv model
elsewhere. The forward solve is T Picard rounds (exact on the triangular map), so every deviation comes
from the gradient attachment.
"""
from __future__ import annotations

import pytest
import torch

from deqir.deq.grad import DEQGradientConfig, attach_gradient
from deqir.deq.joint_map import ChainMap
from deqir.deq.solvers import picard
from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.samplers.sequential import sample_sequential_with_grad
from deqir.operators import make_operator
from tiny_models import TinyEps, tiny_unet

DT = torch.float64
SCHEDULE = NoiseSchedule.create()
SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def unet():
    net = tiny_unet(16, 0)
    return lambda x, t: net(x, t)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _problem(case: str, T: int, B: int = 2, seed: int = 0):
    """coeffs, x_T, operator, y, z, per-slot loss weights W (B, T, C, H, W) for a named setting."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(B, *SHAPE, generator=g, dtype=DT)
    gt = (0.5 * torch.randn(B, *SHAPE, generator=g, dtype=DT)).clamp(-1, 1)
    W = torch.randn(B, T, *SHAPE, generator=g, dtype=DT)
    W[:, :-1] *= 0.1  # mostly a loss on x0, some weight on every state
    op = y = z = None
    if case == "uncond":
        co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.1, nw=0.0)
    elif case == "sr":
        co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.1, nw=0.0)
        op = make_operator("sr_avgpool", SHAPE, scale=2).to(DT)
        y = op.A(gt)
    elif case == "inpaint_noisy":  # lam < 1 (x_T also enters the range part) and a noise term (nw > 0)
        op = _mask_operator(g)
        sigma = 0.1
        y = op.A(gt) + sigma * torch.randn(op.A(gt).shape, generator=g, dtype=DT)
        co = make_chain(SCHEDULE, SamplingGrid.create(T), etw=0.3, nw=0.2, sigma_y_eff=sigma)
        assert bool((co.lam < 1).any())
        z = torch.randn(B, 1, *SHAPE, generator=g, dtype=DT)
    else:
        raise ValueError(case)
    return co, x_T, op, y, z, W


class _Mask:
    """Inline inpainting operator: A x = m * x (measurement kept in image layout), A^+ = A^T = A."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.m = mask

    def A(self, x):
        return x * self.m

    def A_pinv(self, y):
        return y * self.m

    def A_adjoint(self, y):
        return y * self.m


def _mask_operator(g: torch.Generator) -> _Mask:
    return _Mask((torch.rand(1, 1, *SHAPE[1:], generator=g) < 0.5).to(DT))


def _sequential_grad(model, co, x_T, op, y, z, W) -> torch.Tensor:
    x = x_T.clone().requires_grad_(True)
    _, _, traj = sample_sequential_with_grad(model, co, x, operator=op, y=y, z=z, return_trajectory=True)
    (W * traj).sum().backward()
    return x.grad


def _deq_grad(model, co, x_T, op, y, z, W, mode: str, *, info: dict | None = None, **kw):
    """Gradient w.r.t. x_T of sum(W * states) through the exact equilibrium, and the attached states."""
    x = x_T.clone().requires_grad_(True)
    fmap = ChainMap(model, co, x, operator=op, y=y, z=z, form="cumsum")
    z_star, _ = picard(fmap, fmap.initial_state(), max_iter=len(co), tol=0.0)
    states = attach_gradient(fmap, z_star, mode, on_backward=None if info is None else info.update, **kw)
    (W * states).sum().backward()
    return x.grad, states.detach(), z_star


@pytest.mark.parametrize("case", ["uncond", "sr", "inpaint_noisy"])
def test_ift_matches_sequential_autograd(unet, case):
    T = 6
    co, x_T, op, y, z, W = _problem(case, T)
    g_seq = _sequential_grad(unet, co, x_T, op, y, z, W)
    # exact adjoint (T Picard rounds) and the default settings (Picard, tol 1e-4)
    g_exact, states, z_star = _deq_grad(unet, co, x_T, op, y, z, W, "ift", adjoint_tol=0.0)
    info: dict = {}
    g_default, _, _ = _deq_grad(unet, co, x_T, op, y, z, W, "ift", info=info)
    torch.testing.assert_close(states, z_star, rtol=0, atol=1e-10)  # value: F(z*) = z*
    for g in (g_exact, g_default):
        assert _cos(g, g_seq) > 0.9999
        assert _rel(g, g_seq) < 1e-4
    assert _rel(g_exact, g_seq) < 1e-10
    assert 1 <= info["adjoint_rounds"] <= T and info["adjoint_stats"].solver == "picard"


def test_ift_anderson_adjoint(unet):
    T = 6
    co, x_T, op, y, z, W = _problem("sr", T)
    g_seq = _sequential_grad(unet, co, x_T, op, y, z, W)
    g, _, _ = _deq_grad(unet, co, x_T, op, y, z, W, "ift", adjoint_solver="anderson", adjoint_tol=1e-8,
                        adjoint_max_iter=3 * T)
    assert _cos(g, g_seq) > 0.9999 and _rel(g, g_seq) < 1e-4


@pytest.mark.parametrize("case", ["uncond", "sr"])
def test_phantom_k1_cosine(unet, case, record_property):
    """Phantom k = 1, tau = 0.1 vs the exact gradient of a loss on x0 (cosines are reported, see docs)."""
    T = 10
    co, x_T, op, y, z, W = _problem(case, T)
    W[:, :-1] = 0.0  # loss on x0 only, as in initialization optimization
    g_seq = _sequential_grad(unet, co, x_T, op, y, z, W)
    g_ph, _, _ = _deq_grad(unet, co, x_T, op, y, z, W, "phantom")
    g_an, _, _ = _deq_grad(unet, co, x_T, op, y, z, W, "phantom", phantom_analytic=True)
    c_ph, c_an = _cos(g_ph, g_seq), _cos(g_an, g_seq)
    record_property("phantom_cosine", c_ph)
    record_property("phantom_analytic_cosine", c_an)
    print(f"phantom k=1 cosine ({case}, T={T}): with slot-0 model Jacobian {c_ph:.4f}, analytic {c_an:.4f}")
    assert c_ph > 0.9
    assert c_an > 0.5  # a descent direction; 0.84-0.91 on random UNets (docs/gradients.md)
    # the analytic form is exactly tau * sqrt(a'_{T-1} / a_0) N dL/dx0 = tau / sqrt(a_0) N W_x0  (docs/gradients.md)
    dx0 = W[:, -1]
    N_dx0 = dx0 if op is None else dx0 - op.A_pinv(op.A(dx0))
    torch.testing.assert_close(g_an, 0.1 / float(co.a[0]) ** 0.5 * N_dx0, rtol=1e-10, atol=1e-10)


def test_unroll_all_rounds_equals_sequential(unet):
    T = 5
    co, x_T, op, y, z, W = _problem("sr", T)
    g_seq = _sequential_grad(unet, co, x_T, op, y, z, W)
    g, states, z_star = _deq_grad(unet, co, x_T, op, y, z, W, "unroll", unroll_rounds=T)
    assert _rel(g, g_seq) < 1e-10
    torch.testing.assert_close(states, z_star, rtol=0, atol=1e-10)
    g2, _, _ = _deq_grad(unet, co, x_T, op, y, z, W, "unroll", unroll_rounds=2)
    assert _cos(g2, g_seq) > 0.5  # truncated: an approximation (reported in docs)


def test_ift_model_parameter_gradient():
    """IFT also differentiates the model's parameters: (dF/dtheta)^T g equals sequential backprop."""
    T = 5
    co, x_T, op, y, z, W = _problem("sr", T)
    model = TinyEps(scale=1.0).requires_grad_(True)
    seq = _sequential_grad(model, co, x_T, op, y, z, W)
    g_seq = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    g, _, _ = _deq_grad(model, co, x_T, op, y, z, W, "ift", adjoint_tol=0.0)
    assert _rel(g, seq) < 1e-10
    for p, ref in zip(model.parameters(), g_seq):
        assert _rel(p.grad, ref) < 1e-10


def test_gradient_inside_no_grad_and_no_leaks():
    """Attaching under torch.no_grad() works (autograd is enabled inside); repeated calls agree."""
    T = 5
    co, x_T, op, y, z, W = _problem("uncond", T)
    model = TinyEps()
    x = x_T.clone().requires_grad_(True)
    grads = []
    for _ in range(2):
        with torch.enable_grad():
            fmap = ChainMap(model, co, x, form="cumsum")
        with torch.no_grad():
            z_star, _ = picard(fmap, fmap.initial_state(), max_iter=T, tol=0.0)
            states = attach_gradient(fmap, z_star, "ift")
        assert states.requires_grad
        (W * states).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], _sequential_grad(model, co, x_T, op, y, z, W), rtol=1e-9, atol=1e-9)


def test_map_built_under_no_grad_is_rejected():
    co, x_T, *_ = _problem("uncond", 4)
    x = x_T.clone().requires_grad_(True)
    with torch.no_grad():
        fmap = ChainMap(TinyEps(), co, x, form="cumsum")
    with pytest.raises(ValueError, match="enable_grad"):
        attach_gradient(fmap, fmap.initial_state(), "ift")


def test_inference_mode_is_rejected():
    co, x_T, *_ = _problem("uncond", 4)
    x = x_T.clone().requires_grad_(True)
    fmap = ChainMap(TinyEps(), co, x, form="cumsum")
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            attach_gradient(fmap, fmap.initial_state(), "ift")
    with torch.inference_mode():
        z_inf = torch.zeros(2, 4, *SHAPE, dtype=DT)
    with pytest.raises(RuntimeError, match="inference"):
        attach_gradient(fmap, z_inf, "phantom")


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "implicit"}, "unknown gradient mode"),
    ({"tau": 0.0}, "tau"),
    ({"phantom_steps": 0}, "phantom_steps"),
    ({"adjoint_solver": "sliding_window"}, "adjoint_solver"),
    ({"adjoint_options": {"history": 3}}, "no option"),
    ({"adjoint_max_iter": 0}, "adjoint_max_iter"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DEQGradientConfig(**kwargs)


def test_config_attach_equals_function():
    T = 4
    co, x_T, op, y, z, W = _problem("uncond", T)
    model = TinyEps()
    g_fn, _, _ = _deq_grad(model, co, x_T, op, y, z, W, "phantom", phantom_steps=2, tau=0.5)
    x = x_T.clone().requires_grad_(True)
    fmap = ChainMap(model, co, x, form="cumsum")
    z_star, _ = picard(fmap, fmap.initial_state(), max_iter=T, tol=0.0)
    (W * DEQGradientConfig(mode="phantom", phantom_steps=2, tau=0.5).attach(fmap, z_star)).sum().backward()
    torch.testing.assert_close(x.grad, g_fn, rtol=0, atol=0)


# ---------------------------------------------------------------- the step form: back-substitution adjoint
def _step_grad(model, co, x_T, op, y, z, W, *, sweep: bool = False, **kw):
    """Gradient of sum(W * states) through the exact step-form equilibrium (or the sequential sweep)."""
    from deqir.deq.grad import sequential_with_gradient

    x = x_T.clone().requires_grad_(True)
    fmap = ChainMap(model, co, x, operator=op, y=y, z=z, form="step")
    z_star, _ = picard(fmap, fmap.initial_state(), max_iter=len(co), tol=0.0)
    states = sequential_with_gradient(fmap) if sweep else attach_gradient(fmap, z_star, "ift", **kw)
    (W * states).sum().backward()
    return x.grad, states.detach(), z_star


@pytest.mark.parametrize("case", ["uncond", "sr", "inpaint_noisy"])
def test_back_substitution_matches_sequential_autograd_and_picard(unet, case):
    """Eq. (2) of deqir.deq.grad solves the adjoint exactly: autograd through the sequential chain, the exact
    Picard adjoint (T rounds) and the one-sweep form all agree; the value is F(z*) = z*."""
    T = 6
    co, x_T, op, y, z, W = _problem(case, T)
    g_seq = _sequential_grad(unet, co, x_T, op, y, z, W)
    g_bs, states, z_star = _step_grad(unet, co, x_T, op, y, z, W, adjoint_solver="back_substitution")
    g_auto, _, _ = _step_grad(unet, co, x_T, op, y, z, W)  # auto = back_substitution on the step form
    g_pic, _, _ = _step_grad(unet, co, x_T, op, y, z, W, adjoint_solver="picard", adjoint_tol=0.0)
    g_sw, states_sw, _ = _step_grad(unet, co, x_T, op, y, z, W, sweep=True)
    torch.testing.assert_close(states, z_star, rtol=0, atol=1e-10)
    torch.testing.assert_close(states_sw, z_star, rtol=0, atol=1e-10)
    assert _rel(g_bs, g_seq) < 1e-10
    assert _rel(g_pic, g_bs) < 1e-10
    torch.testing.assert_close(g_auto, g_bs, rtol=0, atol=0)
    assert _rel(g_sw, g_seq) < 1e-10


def test_back_substitution_model_parameter_gradient():
    T = 5
    co, x_T, op, y, z, W = _problem("sr", T)
    model = TinyEps(scale=1.0).requires_grad_(True)
    seq = _sequential_grad(model, co, x_T, op, y, z, W)
    g_seq = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    g, _, _ = _step_grad(model, co, x_T, op, y, z, W, adjoint_solver="back_substitution")
    assert _rel(g, seq) < 1e-10
    for p, ref in zip(model.parameters(), g_seq):
        assert _rel(p.grad, ref) < 1e-10


def test_back_substitution_needs_the_step_form():
    co, x_T, op, y, z, W = _problem("uncond", 4)
    with pytest.raises(ValueError, match="step form"):
        _deq_grad(TinyEps(), co, x_T, op, y, z, W, "ift", adjoint_solver="back_substitution")


def test_optimize_init_sequential_sweep_equals_solve_plus_back_substitution():
    """solve.sequential_sweep (one sweep with autograd) takes the same Adam steps as an exact no-grad solve plus
    the back-substitution gradient, at T model calls per step instead of T + T."""
    from deqir.optim import SolveConfig, optimize_init

    T = 5
    co, x_T, op, y, z, _ = _problem("sr", T, B=2)
    runs = {}
    for sweep in (False, True):
        solve = SolveConfig(solver="picard", max_iter=T, tol=0.0, stop_mode="rel", sequential_sweep=sweep)
        res = optimize_init(TinyEps(scale=1.0), co, x_T, losses={"consistency": 1.0, "prior": 0.1}, operator=op,
                            y=y, steps=3, lr=0.05, solve=solve, gradient=DEQGradientConfig(mode="ift"),
                            map_form="step")
        runs[sweep] = res
    torch.testing.assert_close(runs[True].x_T_best, runs[False].x_T_best, rtol=1e-9, atol=1e-9)
    for a, b in zip(runs[True].history, runs[False].history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)
    assert runs[True].history[1]["nfe"] == 2 * T and runs[False].history[1]["nfe"] > 2 * T
    with pytest.raises(ValueError, match="sequential_sweep"):
        optimize_init(TinyEps(), co, x_T, losses={"consistency": 1.0}, operator=op, y=y, steps=1, lr=0.05,
                      solve=SolveConfig(solver="picard", max_iter=T, tol=0.0, stop_mode="rel", sequential_sweep=True),
                      gradient=DEQGradientConfig(mode="phantom"), map_form="step")
