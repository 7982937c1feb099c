"""Fixed-point solvers (deqir.deq.solvers): known fixed points, triangular maps, robustness, contract."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from deqir.deq.protocols import TriangularMap
from deqir.deq.solvers import (
    SOLVERS,
    SolverStats,
    anderson,
    anderson_weights,
    get_solver,
    picard,
    residuals,
    sliding_window,
    solver_options,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------- maps
class AffineMap:
    """z -> A_b vec(z) + c_b per image, ||A_b||_2 = rho < 1; fixed point (I - A_b)^{-1} c_b."""

    def __init__(self, B: int, S: int, rest: tuple[int, ...], rho: float = 0.6, dtype=F64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.shape = (B, S, *rest)
        N = S * math.prod(rest)
        A = torch.randn(B, N, N, generator=g, dtype=F64)
        A = rho * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
        c = torch.randn(B, N, generator=g, dtype=F64)
        self.A, self.c = A.to(dtype), c.to(dtype)
        self.z_star = torch.linalg.solve(torch.eye(N, dtype=F64) - A, c).reshape(self.shape).to(dtype)
        self.calls = 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return (torch.einsum("bij,bj->bi", self.A, z.flatten(1)) + self.c).view_as(z)


class ToyChain:
    """Strictly lower-triangular toy chain with an "eps" part and an explicit cumulative-sum part.

    eps_j = W2_j tanh(W1_j u_j) with u_0 = x_T, u_j = z[:, j-1];
    state_j = a_j x_T + sum_{i<=j} c_i eps_i + b_j   (the shape of DeqIR's analytic form, docs/solvers.md).
    """

    def __init__(self, B: int, S: int, rest=(2, 3), hidden: int = 6, gain: float = 0.4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        D = math.prod(rest)
        self.rest, self.num_slots, self.B = rest, S, B
        self.W1 = torch.randn(S, D, hidden, generator=g, dtype=F64) / math.sqrt(D)
        self.W2 = gain * torch.randn(S, hidden, D, generator=g, dtype=F64) / math.sqrt(hidden)
        self.a = torch.rand(S, generator=g, dtype=F64).view(1, S, *[1] * len(rest))
        self.c = (0.5 + torch.rand(S, generator=g, dtype=F64)).view(1, S, *[1] * len(rest))
        self.b = torch.randn(1, S, *rest, generator=g, dtype=F64)
        self.x_T = torch.randn(B, *rest, generator=g, dtype=F64)
        self.slot_evals = 0

    def _eps(self, u: Tensor, lo: int, hi: int) -> Tensor:  # u (B, J, *rest)
        h = torch.tanh(torch.einsum("bjd,jdh->bjh", u.flatten(2), self.W1[lo:hi]))
        return torch.einsum("bjh,jhd->bjd", h, self.W2[lo:hi]).view(u.shape)

    def eval_eps(self, z: Tensor, lo: int, hi: int) -> Tensor:
        self.slot_evals += z.shape[0] * (hi - lo)
        u = torch.cat([self.x_T[:, None], z[:, :-1]], dim=1)[:, lo:hi]
        return self._eps(u, lo, hi)

    def states(self, E: Tensor) -> Tensor:
        J = E.shape[1]
        return self.a[:, :J] * self.x_T[:, None] + torch.cumsum(self.c[:, :J] * E, dim=1) + self.b[:, :J]

    def __call__(self, z: Tensor) -> Tensor:
        return self.states(self.eval_eps(z, 0, self.num_slots))

    def sequential(self) -> Tensor:
        eps, u = [], self.x_T
        for j in range(self.num_slots):
            eps.append(self._eps(u[:, None], j, j + 1)[:, 0])
            u = self.states(torch.stack(eps, dim=1))[:, j]
        return self.states(torch.stack(eps, dim=1))


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ registry, contract
def test_registry_lists_solvers_and_rejects_unknown_names():
    assert set(SOLVERS) == {"anderson", "picard", "sliding_window", "quasi_newton"}
    assert get_solver("anderson") is anderson
    with pytest.raises(ValueError, match="'anderson', 'picard', 'sliding_window'"):
        get_solver("broyden")
    opts = solver_options("anderson")
    assert {"max_iter", "tol", "stop_mode", "callback", "history_size", "lam", "beta", "mixing"} <= set(opts)
    assert "window" in solver_options("sliding_window")


@pytest.mark.parametrize(
    "solver, kwargs, match",
    [
        (anderson, {"stop_mode": "relative"}, "'rel', 'abs'"),
        (anderson, {"mixing": "pixel"}, "'image', 'slot'"),
        (anderson, {"return_value": "z"}, "'f', 'x'"),
        (anderson, {"select": "first"}, "'best', 'last'"),
        (anderson, {"lam_mode": "scaled"}, "'absolute', 'relative'"),
        (anderson, {"history_size": 0}, "history_size"),
        (anderson, {"lam": -1.0}, "lam"),
        (anderson, {"beta": 0.0}, "beta"),
        (anderson, {"max_iter": 0}, "max_iter"),
        (picard, {"tol": -1e-3}, "tol"),
        (picard, {"beta": 1.5}, "beta"),
        (picard, {"stop_mode": "max"}, "'rel', 'abs'"),
    ],
)
def test_bad_options_raise_value_error_listing_valid_values(solver, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solver(lambda z: 0.5 * z, torch.ones(1, 2, 3), **{"max_iter": 15, **kwargs})


def test_unknown_keyword_and_bad_map_output_fail_loudly():
    with pytest.raises(TypeError):
        picard(lambda z: z, torch.ones(1, 2, 3), max_iter=50, history_size=3)  # not a picard option
    with pytest.raises(ValueError, match="shape"):
        anderson(lambda z: z[:, :1], torch.ones(1, 2, 3), max_iter=15)
    with pytest.raises(ValueError, match="dtype"):
        picard(lambda z: z.double(), torch.ones(1, 2, 3), max_iter=50)
    with pytest.raises(ValueError, match=r"\(B, S, \.\.\.\)"):
        picard(lambda z: z, torch.ones(3), max_iter=50)


def test_sliding_window_requires_a_triangular_map():
    toy = ToyChain(B=1, S=4)
    with pytest.raises(TypeError, match="TriangularMap"):
        sliding_window(lambda z: z, torch.zeros(1, 4, 2, 3, dtype=F64), window=None)
    with pytest.raises(ValueError, match="num_slots"):
        sliding_window(toy, torch.zeros(1, 5, 2, 3, dtype=F64), window=None)
    with pytest.raises(ValueError, match="window"):
        sliding_window(toy, torch.zeros(1, 4, 2, 3, dtype=F64), window=0)


def test_residual_definition_matches_spec():
    old = torch.zeros(1, 2, 3, dtype=F64)
    new = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]], dtype=F64)
    r = residuals(old, new)
    assert torch.allclose(r.abs, torch.tensor([5.0], dtype=F64))
    assert torch.allclose(r.rel, torch.tensor([5.0 / (1e-5 + 5.0)], dtype=F64))
    assert torch.allclose(r.abs_slot, torch.tensor([[5.0, 0.0]], dtype=F64))
    assert torch.allclose(r.rel_slot, torch.tensor([[5.0 / (1e-5 + 5.0), 0.0]], dtype=F64))


# -------------------------------------------------------------------------- known fixed points
@pytest.mark.parametrize(
    "solver, kwargs",
    [
        (anderson, {"lam_mode": "relative", "lam": 1e-8}),
        (anderson, {"lam_mode": "relative", "lam": 1e-8, "mixing": "slot"}),
        (anderson, {"lam": 1e-12, "beta": 0.8, "return_value": "x"}),
        (picard, {}),
    ],
)
def test_affine_contraction_reaches_closed_form_fixed_point(solver, kwargs):
    f = AffineMap(B=3, S=4, rest=(3,), rho=0.6)
    z, stats = solver(f, torch.zeros(f.shape, dtype=F64), max_iter=200, tol=1e-11, **kwargs)
    assert stats.status == "converged" and bool(stats.converged.all())
    assert rel_err(z, f.z_star) < 1e-9
    assert stats.nfe == stats.rounds * 3 * 4 == f.calls * 12
    if solver is anderson and kwargs.get("beta", 1.0) == 1.0 and kwargs.get("mixing", "image") == "image":
        # Per-image Anderson beats Picard on a linear map. (Per-slot mixing does not: A couples the slots,
        # and separate weights per slot lose Anderson's secant property; it converges, slowly.)
        f2 = AffineMap(B=3, S=4, rest=(3,), rho=0.6)
        _, pstats = picard(f2, torch.zeros(f.shape, dtype=F64), max_iter=200, tol=1e-11)
        assert stats.rounds < pstats.rounds


def test_float32_states_converge():
    f = AffineMap(B=2, S=3, rest=(2, 2), rho=0.5, dtype=torch.float32)
    for solve in (anderson, picard):
        opts = {"lam_mode": "relative"} if solve is anderson else {}
        z, stats = solve(f, torch.zeros(f.shape), max_iter=60, tol=1e-6, **opts)
        assert z.dtype == torch.float32 and stats.status == "converged"
        assert rel_err(z.double(), f.z_star.double()) < 1e-5


@pytest.mark.parametrize("mixing", ["image", "slot"])
def test_nonlinear_maps_converge_with_both_mixings(mixing):
    # torchdeq's example: the Babylonian map 0.5 (z + 2 / z) -> sqrt(2).
    z0 = 1.0 + torch.rand(2, 3, 4, dtype=F64)
    z, stats = anderson(lambda z: 0.5 * (z + 2 / z), z0, max_iter=30, tol=1e-12, lam=1e-14, mixing=mixing)
    assert stats.status == "converged"
    assert torch.allclose(z, torch.full_like(z, math.sqrt(2.0)), atol=1e-12)
    # A tanh map, contractive, pixels coupled within each slot: compare with a long Picard run.
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 4, 4, generator=g, dtype=F64)
    W = 0.8 * W / torch.linalg.matrix_norm(W, ord=2)[:, None, None]  # contraction: unique fixed point
    b = torch.randn(2, 3, 4, generator=g, dtype=F64)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(torch.einsum("sij,bsj->bsi", W, z) + b)

    ref, _ = picard(f, torch.zeros(2, 3, 4, dtype=F64), max_iter=2000, tol=1e-14)
    z0 = torch.zeros(2, 3, 4, dtype=F64)
    z, stats = anderson(f, z0, max_iter=60, tol=1e-11, mixing=mixing, lam_mode="relative", lam=1e-10)
    assert stats.status == "converged" and rel_err(z, ref) < 1e-9


def test_per_image_mixing_handles_slot_coupling():
    # A map that couples the slots: per-image weights converge faster than Picard; per-slot weights lose
    # Anderson's secant property (each slot extrapolates alone) and stall with weak regularisation.
    g = torch.Generator().manual_seed(1)
    W = 0.9 * torch.randn(12, 12, generator=g, dtype=F64) / math.sqrt(12)
    b = torch.randn(2, 12, generator=g, dtype=F64)

    def f(z: Tensor) -> Tensor:
        return torch.tanh(z.flatten(1) @ W.T + b).view_as(z)

    z0 = torch.zeros(2, 3, 4, dtype=F64)
    ref, pstats = picard(f, z0, max_iter=2000, tol=1e-14)
    z, stats = anderson(f, z0, max_iter=60, tol=1e-11, lam_mode="relative", lam=1e-10)
    assert stats.status == "converged" and rel_err(z, ref) < 1e-9 and stats.rounds < pstats.rounds / 2
    _, slot = anderson(f, z0, max_iter=60, tol=1e-11, lam_mode="relative", lam=1e-10, mixing="slot")
    assert slot.status == "max_iter"


# ------------------------------------------------------------------------------ triangular maps
def test_picard_is_exact_after_S_rounds_on_triangular_map():
    toy = ToyChain(B=3, S=8)
    assert isinstance(toy, TriangularMap)
    ref = toy.sequential()
    z, stats = picard(toy, toy.x_T[:, None].expand(3, 8, 2, 3).clone(), max_iter=8, tol=0.0)
    assert stats.rounds == 8 and stats.status == "max_iter"
    assert rel_err(z, ref) < 1e-13
    # One round short: the last slot is still wrong, all earlier ones exact.
    z7, _ = picard(toy, toy.x_T[:, None].expand(3, 8, 2, 3).clone(), max_iter=7, tol=0.0)
    assert rel_err(z7[:, :7], ref[:, :7]) < 1e-13 and rel_err(z7[:, 7:], ref[:, 7:]) > 1e-8


def test_anderson_and_sliding_window_reach_the_sequential_chain():
    S, B = 16, 2
    toy = ToyChain(B=B, S=S, gain=0.3)
    ref = toy.sequential()
    z0 = toy.x_T[:, None].expand(B, S, 2, 3).clone()
    for mixing in ("image", "slot"):
        z, stats = anderson(toy, z0, max_iter=40, tol=1e-10, mixing=mixing, lam_mode="relative", lam=1e-10)
        assert stats.status == "converged" and rel_err(z, ref) < 1e-4, (mixing, stats.summary())

    _, pstats = picard(toy, z0, max_iter=100, tol=1e-10)
    toy.slot_evals = 0
    z, stats = sliding_window(toy, z0, tol=1e-10, window=None)
    assert stats.status == "converged" and rel_err(z, ref) < 1e-4
    assert stats.nfe == toy.slot_evals
    assert stats.nfe < 0.7 * pstats.nfe  # the converged prefix is not re-evaluated
    lo = stats.window_trace[:, 0]
    assert bool((lo[1:] > lo[:-1]).all()) and int(lo[0]) == 0  # advances at least one slot per round

    # A narrow window: about as many rounds, a quarter of the model work per round at most.
    zw, wstats = sliding_window(toy, z0, tol=1e-10, window=4)
    assert wstats.status == "converged" and rel_err(zw, ref) < 1e-4
    assert int((wstats.window_trace[:, 1] - wstats.window_trace[:, 0]).max()) <= 4
    assert wstats.nfe <= wstats.rounds * 4 * B and wstats.nfe < 0.3 * pstats.nfe
    assert wstats.rounds <= pstats.rounds + 2
    assert wstats.abs_slot_trace.shape == (wstats.rounds, B, S)
    assert bool(torch.isnan(wstats.abs_slot_trace[0, :, 4:]).all())  # not evaluated in round 0


def test_sliding_window_with_zero_tol_is_picard():
    toy = ToyChain(B=2, S=6)
    z0 = torch.zeros(2, 6, 2, 3, dtype=F64)
    z, stats = sliding_window(toy, z0, tol=0.0, window=None)
    assert stats.rounds == 6 and stats.status == "converged"
    assert stats.nfe == 2 * (6 + 5 + 4 + 3 + 2 + 1)
    assert rel_err(z, toy.sequential()) < 1e-13
    _, short = sliding_window(toy, z0, tol=0.0, max_iter=3, window=None)
    assert short.status == "max_iter" and short.image_status == ("max_iter", "max_iter")


def test_sliding_window_callback_and_abs_mode():
    toy = ToyChain(B=2, S=6, gain=0.1)
    seen = []
    z0 = torch.zeros(2, 6, 2, 3, dtype=F64)
    z, stats = sliding_window(toy, z0, tol=1e-9, stop_mode="abs", window=3, callback=seen.append)
    assert stats.status == "converged" and rel_err(z, toy.sequential()) < 1e-6
    assert [info["round"] for info in seen] == list(range(stats.rounds))
    assert [info["window"] for info in seen] == [tuple(w) for w in stats.window_trace.tolist()]
    assert seen[-1]["nfe"] == stats.nfe and seen[-1]["prefix"].tolist() == [6, 6]
    assert torch.equal(stats.trace, stats.abs_trace)


# ------------------------------------------------------------------------- batching, robustness
def test_batch_of_problems_equals_solving_each_alone():
    f = AffineMap(B=3, S=4, rest=(3,), rho=0.8)
    z0 = torch.randn(f.shape, dtype=F64)
    z, stats = anderson(f, z0, max_iter=50, tol=1e-9)
    for b in range(3):
        fb = AffineMap(B=3, S=4, rest=(3,), rho=0.8)
        fb.A, fb.c = f.A[b : b + 1], f.c[b : b + 1]
        zb, sb = anderson(fb, z0[b : b + 1], max_iter=50, tol=1e-9)
        assert torch.allclose(z[b], zb[0], rtol=0, atol=1e-12)
        assert int(stats.image_rounds[b]) == sb.rounds
    assert torch.isnan(stats.rel_trace[int(stats.image_rounds.min()) :, int(stats.image_rounds.argmin())]).all()


class NaNAfter:
    """0.5 z + 1, but image ``bad`` turns NaN from call ``start`` on (``bad=None``: all images)."""

    def __init__(self, start: int, bad: int | None = 1):
        self.start, self.bad, self.calls = start, bad, 0

    def __call__(self, z: Tensor) -> Tensor:
        out = 0.5 * z + 1.0
        if self.calls >= self.start:
            if self.bad is None:
                out = out * math.nan
            else:
                out[self.bad] = math.nan
        self.calls += 1
        return out


@pytest.mark.parametrize("solver", ["anderson", "picard"])
def test_nan_map_ends_with_nonfinite_status_and_finite_result(solver):
    z0 = torch.zeros(3, 2, 4, dtype=F64)
    opts = {"lam_mode": "relative"} if solver == "anderson" else {}
    z, stats = get_solver(solver)(NaNAfter(start=3), z0, max_iter=40, tol=1e-9, **opts)
    assert stats.status == "nonfinite"
    assert stats.image_status == ("converged", "nonfinite", "converged")
    assert bool(torch.isfinite(z).all())
    assert torch.allclose(z[0], torch.full_like(z[0], 2.0), atol=1e-8)
    assert int(stats.best_round[1]) == 2 and stats.fallbacks == 0

    z, stats = get_solver(solver)(NaNAfter(start=0, bad=None), z0, max_iter=5, tol=1e-9)
    assert stats.status == "nonfinite" and stats.rounds == 1 and torch.equal(z, z0)
    assert bool((stats.best_round == -1).all()) and bool(torch.isinf(stats.best_residual).all())


def test_nan_in_sliding_window_freezes_only_that_image():
    toy = ToyChain(B=2, S=6)
    calls = {"n": 0}
    eval_eps = toy.eval_eps

    def bad_eval(z, lo, hi):
        E = eval_eps(z, lo, hi)
        calls["n"] += 1
        if calls["n"] >= 2:
            E[1] = math.nan
        return E

    toy.eval_eps = bad_eval
    z, stats = sliding_window(toy, torch.zeros(2, 6, 2, 3, dtype=F64), tol=1e-12, window=None)
    assert stats.image_status == ("converged", "nonfinite") and stats.status == "nonfinite"
    assert bool(torch.isfinite(z).all())
    toy.eval_eps = eval_eps
    assert rel_err(z[0], toy.sequential()[0]) < 1e-10


def test_singular_gram_falls_back_without_exception():
    # f(z) = z + 1: every residual G_i is the same vector, so with lam = 0 the bordered system is singular.
    z0 = torch.zeros(2, 3, 4)
    for mixing in ("image", "slot"):
        z, stats = anderson(
            lambda z: z + 1.0, z0, max_iter=8, tol=0.0, lam=0.0, mixing=mixing, stop_mode="abs", select="last"
        )
        per_round = 2 if mixing == "image" else 6
        assert stats.status == "max_iter" and bool(torch.isfinite(z).all())
        assert stats.fallbacks == per_round * 6  # mixing steps k = 1..6 (k = 0 has one pair, no system)
        assert torch.allclose(z, torch.full_like(z, 8.0))  # the fallback is the Picard step
    alpha, ok = anderson_weights(torch.ones(3, 2, 5), lam=0.0)
    assert not bool(ok.any())
    alpha, ok = anderson_weights(torch.full((1, 3, 5), math.inf), lam=1e-3)
    assert not bool(ok.any())
    alpha, ok = anderson_weights(torch.randn(4, 3, 5, dtype=F64), lam=0.0)
    assert bool(ok.all()) and torch.allclose(alpha.sum(1), torch.ones(4, dtype=F64))


def test_constant_map_converges_at_second_round():
    c = torch.randn(2, 3, 4)
    z, stats = anderson(lambda z: c.clone(), torch.zeros(2, 3, 4), max_iter=15, lam=0.0)
    assert stats.status == "converged" and stats.rounds == 2 and torch.equal(z, c)


def test_best_iterate_is_kept():
    class GoodThenBad:
        def __init__(self):
            self.calls = 0

        def __call__(self, z):
            self.calls += 1
            return 0.5 * z + 1.0 if self.calls <= 4 else 50.0 * z - 3.0

    z0 = torch.zeros(1, 2, 3, dtype=F64)
    z, stats = anderson(GoodThenBad(), z0, max_iter=10, tol=0.0, history_size=1)  # m = 1: Picard steps
    best = int(stats.best_round[0])
    assert best == 3 and float(stats.best_residual[0]) == pytest.approx(float(stats.rel_trace[3, 0]))
    assert float(stats.rel_trace[:, 0].min()) == pytest.approx(float(stats.best_residual[0]))
    assert torch.allclose(z, torch.full_like(z, 2.0 - 2.0**-3))  # f(X^(3)), X^(3) = 2 - 2^-2
    z_last, s_last = anderson(GoodThenBad(), z0, max_iter=10, tol=0.0, history_size=1, select="last")
    assert int(s_last.best_round[0]) == 9 and float((z_last - z).abs().max()) > 1.0


# ------------------------------------------------------------------------- iteration structure
class Recorder:
    def __init__(self, f):
        self.f, self.inputs, self.outputs = f, [], []

    def __call__(self, z):
        out = self.f(z)
        self.inputs.append(z.clone())
        self.outputs.append(out.clone())
        return out


def test_anderson_follows_the_official_iteration_structure():
    f = Recorder(AffineMap(B=2, S=3, rest=(2,), rho=0.9))
    z0 = torch.randn(2, 3, 2, dtype=F64)
    rounds_seen = []
    z, stats = anderson(f, z0, max_iter=15, tol=0.0, return_value="x", select="last", callback=rounds_seen.append)
    assert len(f.inputs) == 15 == stats.rounds and stats.nfe == 15 * 2 * 3
    assert torch.equal(f.inputs[0], z0) and torch.equal(f.inputs[1], f.outputs[0])  # X^(1) = F^(0)
    assert torch.equal(z, f.inputs[-1])  # "x": the last mixed iterate (official)
    assert [info["round"] for info in rounds_seen] == list(range(15))
    assert rounds_seen[-1]["nfe"] == stats.nfe
    assert set(rounds_seen[0]) >= {"round", "abs_residual", "rel_residual", "nfe"}
    assert rounds_seen[0]["rel_residual"].shape == (2,)
    # "f" (default) returns f of the returned mixed iterate: one Picard step further for free.
    f2 = Recorder(AffineMap(B=2, S=3, rest=(2,), rho=0.9))
    z_f, _ = anderson(f2, z0, max_iter=15, tol=0.0, select="last")
    assert torch.equal(z_f, f2.outputs[-1])


def test_stats_shapes_and_summary():
    f = AffineMap(B=2, S=3, rest=(2,), rho=0.5)
    z, stats = anderson(f, torch.zeros(f.shape, dtype=F64), max_iter=15, tol=1e-6, lam_mode="relative")
    assert isinstance(stats, SolverStats)
    R = stats.rounds
    assert stats.abs_trace.shape == stats.rel_trace.shape == stats.fallback_trace.shape == (R, 2)
    assert stats.abs_slot_trace.shape == stats.rel_slot_trace.shape == (R, 2, 3)
    assert stats.converged.dtype == torch.bool and stats.best_residual.shape == (2,)
    assert torch.equal(stats.trace, stats.rel_trace)
    # per-image residual = root sum of squares of the per-slot ones
    fin = torch.isfinite(stats.abs_trace)
    assert torch.allclose(stats.abs_trace[fin], stats.abs_slot_trace.square().sum(-1).sqrt()[fin])
    s = stats.summary()
    assert s["status"] == "converged" and s["nfe"] == stats.nfe and s["max_residual"] < 1e-6


def test_no_autograd_and_inputs_untouched():
    w = torch.nn.Parameter(torch.tensor(0.5, dtype=F64))
    z0 = torch.zeros(1, 2, 3, dtype=F64, requires_grad=True)
    for name in ("anderson", "picard"):
        z, _ = get_solver(name)(lambda z: w * z + 1.0, z0, max_iter=5)
        assert not z.requires_grad and bool((z0 == 0).all())
    toy = ToyChain(B=1, S=3)
    z0 = torch.zeros(1, 3, 2, 3, dtype=F64)
    z, _ = sliding_window(toy, z0, window=None)
    assert bool((z0 == 0).all()) and not z.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_solvers_run_on_cuda_in_float32():
    dev = torch.device("cuda")
    f = AffineMap(B=2, S=3, rest=(4,), rho=0.5, dtype=torch.float32)
    f.A, f.c = f.A.to(dev), f.c.to(dev)
    for mixing in ("image", "slot"):
        z0 = torch.zeros(f.shape, device=dev)
        z, stats = anderson(f, z0, max_iter=40, tol=1e-5, mixing=mixing, lam_mode="relative")
        assert z.device.type == "cuda" and stats.converged.device.type == "cuda"
        assert stats.status == "converged" and rel_err(z.double().cpu(), f.z_star.double()) < 1e-4
    z, stats = anderson(lambda z: z + 1.0, torch.zeros(2, 3, 4, device=dev), max_iter=5, tol=0.0, lam=0.0)
    assert stats.fallbacks > 0 and bool(torch.isfinite(z).all())
    toy = ToyChain(B=2, S=6)
    for name in ("W1", "W2", "a", "c", "b", "x_T"):
        setattr(toy, name, getattr(toy, name).to(dev).float())
    z, stats = sliding_window(toy, torch.zeros(2, 6, 2, 3, device=dev), tol=1e-5, window=3)
    assert stats.status == "converged" and z.device.type == "cuda"
