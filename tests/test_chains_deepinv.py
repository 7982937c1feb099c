"""The chains against an independent implementation: deepinv 0.5 (dev extra ``peers``; docs/chains.md).

Deterministic where deepinv allows it: DiffPIR with zeta = 0 (its one initial draw replayed) and DPS with the
DDIM solver from a given x_T, both with our eps-model behind deepinv's sigma-denoiser interface, on deepinv's
own grids. DDRM re-noises every step with deepinv's global RNG and its own noise scaling, so it is compared
statistically in benchmarks/peers.py instead.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import TinyEps

from deqir.chains import make_step
from deqir.chains.peers import (
    EpsDenoiser,
    coefficients_on,
    diffpir_grid,
    dps_deepinv_zeta,
    vp_times,
)
from deqir.diffusion.schedule import SamplingGrid
from deqir.samplers.sequential import sample_sequential
from deqir.operators import make_operator

dinv = pytest.importorskip("deepinv")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

S = 8
MODEL = TinyEps()


def inpainting():
    op = make_operator("inpaint", (3, S, S), mask_type="random", missing_ratio=0.5, seed=1).double()
    gt = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    y = op.A(gt)
    y01 = (y + op.A(torch.ones_like(gt))) / 2  # the same measurement on the [0, 1] scale
    return op, y, y01, op.mask.double().expand(1, 3, S, S).clone()


def test_diffpir_matches_deepinv():
    op, y, y01, mask = inpainting()
    N, sigma, lam = 20, 0.05, 3.0
    physics = dinv.physics.Inpainting(img_size=(3, S, S), mask=mask, noise_model=dinv.physics.GaussianNoise(sigma))
    den = EpsDenoiser(MODEL)
    algo = dinv.sampling.DiffPIR(den, dinv.optim.data_fidelity.L2(), sigma=sigma, max_iter=N, zeta=0.0, lambda_=lam)
    ref = algo(y01.clone(), physics, seed=5)
    torch.manual_seed(5)  # replay deepinv's only effective draw (the initial noise)
    x = 2 * physics.A_adjoint(y01) - 1
    n = torch.randn_like(x)
    t, t_next = diffpir_grid(N)
    co = coefficients_on(t, t_next)
    sb = float(((1 - co.a[0]) / co.a[0]).sqrt())
    ab999 = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)[-1]
    x_T = (x + (sb**2 - 4 * sigma**2) ** 0.5 * n) * float(ab999.sqrt())
    # deepinv's prox weighs |x - x0|^2 by 2 rho: its lambda is half the official (our) lambda
    fn = make_step("diffpir", co, operator=op, y=y, sigma_y=sigma, lam=2 * lam, zeta=0.0)
    ours, _ = sample_sequential(MODEL, co, x_T, step_fn=fn)
    assert (ours / 2 + 0.5 - ref).abs().max() < 1e-4


def test_dps_matches_deepinv_ddim():
    op, y, y01, mask = inpainting()
    T, weight = 10, 2.0
    physics = dinv.physics.Inpainting(img_size=(3, S, S), mask=mask)
    grid = SamplingGrid.create(T)
    co = coefficients_on(list(grid.t), list(grid.t_next))
    solver = dinv.sampling.DDIMSolver(timesteps=vp_times(co), rng=torch.Generator().manual_seed(1))
    algo = dinv.sampling.DPS(EpsDenoiser(MODEL), solver=solver, weight=weight, dtype=torch.float64)
    x_T = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref = algo(y01.clone(), physics, x_init=x_T.clone(), denoise_output=False)
    fn = make_step("dps", co, operator=op, y=y, zeta=dps_deepinv_zeta(co, weight), clip_x0=True)
    ours, _ = sample_sequential(MODEL, co, x_T, step_fn=fn)
    assert (ours / 2 + 0.5 - ref).abs().max() < 1e-4
    unguided, _ = sample_sequential(MODEL, co, x_T, step_fn=make_step("dps", co, operator=op, y=y, zeta=0.0))
    assert (unguided / 2 + 0.5 - ref).abs().max() > 1e-2  # the check sees the guidance


@pytest.mark.slow
def test_peers_benchmark_runs(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "peers.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks/peers.py"), "--size", "32", "--images", "1", "--T", "4",
                          "--peer-steps", "4", "--ddrm-seeds", "1", "--tasks", "inpaint_random", "--chains", "ddrm",
                          "--override", "solver=picard",
                          "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=root,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"deqir ddrm seq", "deqir ddrm DEQ", "deepinv DDRM (4)", "deepinv DiffPIR (4)", "deepinv DPS (4)"} <= methods
    assert set(data["ddrm_agreement"]) == {"inpaint_random"}
