"""Initialization optimization through chains that do not project onto y (DDRM, DiffPIR, PiGDM, DPS; docs/chains.md)."""
from __future__ import annotations

import pytest
import torch

from deqir.chains import make_step
from deqir.deq.grad import attach_gradient
from deqir.deq.joint_map import ChainMap
from deqir.deq.solvers import picard
from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.operators import make_operator
from deqir.optim import SolveConfig, optimize_init
from deqir.optim.init_opt import OPTIMIZABLE_CHAINS
from tiny_models import TinyEps

DT = torch.float64
SHAPE = (3, 16, 16)
T = 6
SIGMA = 0.05  # on [0, 1]; y on [-1, 1] carries 2 sigma
EXACT = SolveConfig(solver="picard", max_iter=T, tol=0.0, stop_mode="rel")
CHAINS = {"ddrm": {"eta": 0.85, "eta_b": 0.5}, "diffpir": {"lam": 7.0, "zeta": 0.3, "clip_x0": True}}


@pytest.fixture(scope="module")
def model():
    return TinyEps()


def _problem(B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linspace(-1, 1, SHAPE[1], dtype=DT)
    base = 0.6 * torch.sin(3 * u)[:, None] * torch.cos(2 * u)[None, :]
    gt = torch.stack([base, base.T, -base])[None].repeat(B, 1, 1, 1)
    gt[1:] = -0.8 * gt[1:].flip(-1)
    op = make_operator("sr_avgpool", SHAPE, scale=2).to(DT)
    y = op.A(gt) + 2 * SIGMA * torch.randn(op.A(gt).shape, generator=g, dtype=DT)
    co = make_chain(NoiseSchedule.create(), SamplingGrid.create(T), etw=0.0, nw=0.0)
    x_T = torch.randn(B, *SHAPE, generator=g, dtype=DT)
    z = torch.randn(B, T, *SHAPE, generator=g, dtype=DT)
    return co, op, y, gt, x_T, z


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_consistency_decreases_through_non_projecting_chain(model, chain):
    co, op, y, gt, x_T, z = _problem()
    res = optimize_init(model, co, x_T, losses={"consistency": 1.0}, operator=op, y=y, z=z, steps=8, lr=0.3,
                        solve=EXACT, map_form="step", chain=chain, chain_params=CHAINS[chain], sigma_y=SIGMA)
    for b in range(2):
        c = [h["consistency"][b] for h in res.history]
        assert all(c1 < c0 for c0, c1 in zip(c, c[1:]))  # the chain does not project: the term has work to do
        assert res.best_loss[b] == c[-1] < 0.85 * c[0]
    # the best x_T, re-sampled sequentially through the same chain, gives the reported x0
    step = make_step(chain, co, operator=op, y=y, z=z, sigma_y=SIGMA, **CHAINS[chain])
    x = res.x_T_best
    for j in range(T):
        eps = model(x, co.t[j : j + 1].repeat(x.shape[0]))
        x = step(x.unsqueeze(1), eps.unsqueeze(1), j, j + 1)[:, 0]
    torch.testing.assert_close(x, res.x0_best, rtol=0, atol=1e-9)


def ift_gradient(model, co, op, y, z, x_T, W, step):
    """x_T (leaf) whose .grad is d(W . x0)/d x_T through the exact step-form equilibrium (IFT, exact adjoint)."""
    x_deq = x_T.clone().requires_grad_(True)
    with torch.enable_grad():
        fmap = ChainMap(model, co, x_deq, operator=op, y=y, z=z, form="step", step_fn=step)
        z_star, _ = picard(fmap, fmap.initial_state(), max_iter=T, tol=0.0)
        states = attach_gradient(fmap, z_star, "ift", adjoint_tol=0.0)
    (W * states[:, -1]).sum().backward()
    return x_deq


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_ift_gradient_matches_unrolled_chain(model, chain):
    """IFT through the step-form equilibrium == autograd through the T sequential steps (docs/gradients.md)."""
    co, op, y, gt, x_T, z = _problem()
    W = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    step = make_step(chain, co, operator=op, y=y, z=z, sigma_y=SIGMA, **CHAINS[chain])
    x_ref = x_T.clone().requires_grad_(True)
    x = x_ref
    for j in range(T):
        x = step(x.unsqueeze(1), model(x, co.t[j : j + 1].repeat(x.shape[0])).unsqueeze(1), j, j + 1)[:, 0]
    (W * x).sum().backward()
    x_deq = ift_gradient(model, co, op, y, z, x_T, W, step)
    rel = float((x_deq.grad - x_ref.grad).norm() / x_ref.grad.norm())
    assert rel < 1e-10


VJP_CHAINS = {"pigdm": {"weight": 1.0}, "dps": {"zeta": 0.5, "clip_x0": False}}


@pytest.mark.parametrize("chain", sorted(VJP_CHAINS))
def test_ift_gradient_through_vjp_chains(model, chain):
    """PiGDM / DPS: the step holds a VJP through the model, so the gradient needs double backward. IFT through
    the equilibrium == autograd through the unrolled chain (its own create_graph VJP) == finite differences."""
    co, op, y, gt, x_T, z = _problem()
    W = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    step = make_step(chain, co, operator=op, y=y, z=z, sigma_y=SIGMA, **VJP_CHAINS[chain])

    def unrolled(x):
        for j in range(T):
            eps, xj = model(x, co.t[j : j + 1].repeat(x.shape[0])), x

            def vjp(w, eps=eps, xj=xj):
                (g,) = torch.autograd.grad(eps, xj, w.reshape(eps.shape), create_graph=True)
                return g.reshape(w.shape)

            x = step(x.unsqueeze(1), eps.unsqueeze(1), j, j + 1, vjp=vjp)[:, 0]
        return (W * x).sum()

    x_ref = x_T.clone().requires_grad_(True)
    unrolled(x_ref).backward()
    x_deq = ift_gradient(model, co, op, y, z, x_T, W, step)
    assert float((x_deq.grad - x_ref.grad).norm() / x_ref.grad.norm()) < 1e-10
    v = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    h = 1e-5
    fd = (unrolled((x_T + h * v).requires_grad_(True)) - unrolled((x_T - h * v).requires_grad_(True))) / (2 * h)
    assert float(fd.detach()) == pytest.approx(float((x_deq.grad * v).sum()), rel=1e-7)
    res = optimize_init(model, co, x_T, losses={"consistency": 1.0}, operator=op, y=y, z=z, steps=3, lr=0.3,
                        solve=EXACT, map_form="step", chain=chain, chain_params=VJP_CHAINS[chain], sigma_y=SIGMA)
    for b in range(2):
        assert res.best_loss[b] < res.history[0]["consistency"][b]


def test_unknown_chain_is_refused(model):
    co, op, y, gt, x_T, z = _problem()
    assert set(OPTIMIZABLE_CHAINS) == {"ddnm", "ddrm", "diffpir", "pigdm", "dps"}
    with pytest.raises(ValueError, match="supported: ddnm, ddrm, diffpir, pigdm, dps"):
        optimize_init(model, co, x_T, losses={"consistency": 1.0}, operator=op, y=y, z=z, steps=1, lr=0.1,
                      solve=EXACT, map_form="step", chain="ddnmm")


def test_app_builders_accept_optimizable_chains():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from deqir.lit.builders import optimization_kwargs

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="invert", overrides=["mode=optimize_init", "chain=ddrm"])
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert "optimization" in optimization_kwargs("optimize_init", plain, SHAPE)
    assert "optimization" in optimization_kwargs("optimize_init", {**plain, "chain": {"name": "pigdm"}}, SHAPE)
    assert "optimization" in optimization_kwargs("invert", plain, SHAPE)  # unconditional: the chain plays no part
    with_op = {**plain, "optimize": {**plain["optimize"], "invert_with_operator": True}}
    with pytest.raises(ValueError, match="DDNM chain only"):
        optimization_kwargs("invert", with_op, SHAPE)


@pytest.mark.slow
def test_app_optimize_init_through_ddrm(tmp_path):
    """mode=optimize_init chain=ddrm through the real app: the consistency loss decreases (no oracle)."""
    import csv

    from test_app_optimize import TINY, run_inprocess

    run = tmp_path / "ddrm"
    run_inprocess([*TINY, "mode=optimize_init", "task=sr4", "task.sigma_y=0.05", "chain=ddrm", "chain.eta_b=0.5",
                   "optimize.steps=3", "optimize.lr=0.3"], run)
    with open(run / "per_image.csv") as f:
        for r in csv.DictReader(f):
            assert r["uses_oracle"] == "False"
            assert float(r["loss_best"]) < float(r["loss_init"])


@pytest.mark.slow
def test_benchmarks_run(tmp_path):
    """benchmarks/init_opt_chains.py and quality.py --samplers seq (the README's chain grids) still run."""
    from test_benchmarks_smoke import run_bench

    data = run_bench("init_opt_chains.py", ["--chains", "diffpir", "--tasks", "sr4", "--size", "32", "--T", "3",
                                            "--steps", "1"], tmp_path / "io.json")
    (row,) = data["rows"]
    assert row["chain"] == "diffpir" and row["steps"] <= 1 and row["lpips_before"] >= 0
    data = run_bench("quality.py", ["--chains", "ddrm", "--tasks", "deblur", "--size", "32", "--images", "1",
                                    "--T", "3", "--samplers", "seq"], tmp_path / "q.json")
    (row,) = data["rows"]
    assert "psnr_seq" in row and "psnr_deq" not in row and row["work_seq"] == 3
