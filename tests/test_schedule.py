"""Beta schedules, alpha_bar, timestep grids and timestep embeddings (docs/solvers.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid, make_betas, timestep_embedding, timestep_grid

from manifests import GOLDEN


def reference_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """DDRM/DDNM/DeqIR: float64 numpy linspace -> float32 torch; cumprod over [0, betas] indexed at t + 1."""
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000, dtype=np.float64)).float()
    betas = torch.cat([torch.zeros(1), betas], dim=0)
    return (1 - betas).cumprod(dim=0).index_select(0, t + 1)


def test_linear_betas_are_float32_of_float64_linspace():
    betas = make_betas("linear", 1000, 1e-4, 0.02)
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    assert torch.equal(betas, torch.from_numpy(np.linspace(1e-4, 0.02, 1000)).float())
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_alpha_bar_matches_reference_bit_exactly_and_minus_one_is_one():
    sched = NoiseSchedule.create("linear", 1000)
    t = torch.arange(-1, 1000)
    assert torch.equal(sched.alpha_bar(t, dtype=torch.float32), reference_alpha_bar(t))
    assert sched.alpha_bar(-1).item() == 1.0
    with pytest.raises(ValueError):
        sched.alpha_bar(1000)


def test_quad_and_cosine_schedules():
    quad = make_betas("quad", 1000, 1e-4, 0.02)
    assert quad[0].item() == pytest.approx(1e-4) and quad[-1].item() == pytest.approx(0.02)
    assert torch.all(quad[1:] > quad[:-1])
    cos = make_betas("cosine", 1000)
    assert cos.dtype == torch.float32 and torch.all(cos > 0) and cos.max().item() == pytest.approx(0.999)
    s = 8e-3
    f = lambda t: math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert cos[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-6)
    ab = NoiseSchedule.create("cosine", 1000).alpha_bar(torch.arange(1000))
    assert torch.all(ab[1:] < ab[:-1])
    with pytest.raises(ValueError, match="valid: linear, quad, cosine"):
        make_betas("sigmoid")


@pytest.mark.parametrize(("T", "skip", "last"), [(25, 40, 960), (20, 50, 950), (15, 66, 924), (100, 10, 990)])
def test_uniform_grid_with_deqir_trimming(T, skip, last):
    seq = timestep_grid(T)
    assert len(seq) == T and seq[0] == 0 and seq[-1] == last
    assert all(b - a == skip for a, b in zip(seq, seq[1:]))


def test_quad_grid_and_invalid_options():
    seq = timestep_grid(25, skip_type="quad")
    assert len(seq) == 25 and seq[0] == 0 and seq[-1] == int(np.sqrt(800) ** 2)
    assert all(b > a for a, b in zip(seq, seq[1:]))
    with pytest.raises(ValueError):
        timestep_grid(0)
    with pytest.raises(ValueError, match="valid: uniform, quad"):
        timestep_grid(25, skip_type="log")


def test_sampling_grid_next_timestep_convention():
    grid = SamplingGrid.create(25)
    assert len(grid) == 25
    assert grid.t[0] == 960 and grid.t[-1] == 0 and grid.t_next[0] == 920 and grid.t_next[-1] == -1
    assert grid.t_next[:-1] == grid.t[1:]


def test_deqir_sanity_values_for_25_steps():
    """The values quoted in DeqIR's own comments (float64 arithmetic on the float32 table)."""
    grid, sched = SamplingGrid.create(25), NoiseSchedule.create()
    a, a_next = sched.alpha_bar(list(grid.t)), sched.alpha_bar(list(grid.t_next))
    assert a[0].item() == pytest.approx(8.741e-5, rel=1e-3)
    assert a_next[0].item() == pytest.approx(1.870e-4, rel=1e-3)
    assert a_next[0].sqrt().item() == pytest.approx(0.0137, rel=1e-2)
    ratio = (a_next / a[0]).sqrt()
    assert ratio[0].item() == pytest.approx(1.4627, rel=1e-4) and ratio[-1].item() == pytest.approx(106.958, rel=1e-5)
    e1 = ((1 - a) / a).sqrt()
    assert e1[0].item() == pytest.approx(106.95, rel=1e-4) and e1[-1].item() == pytest.approx(0.0100, rel=1e-2)
    e2 = (1 - a_next).sqrt() / a_next.sqrt()  # etw = 0
    assert e2[0].item() == pytest.approx(73.12, rel=1e-4) and e2[-1].item() == 0.0
    assert torch.allclose(a_next[:-1], a[1:]) and a_next[-1].item() == 1.0


@pytest.mark.parametrize(("arch", "flavor", "dim"), [("ddpm", "ddpm", 32), ("ddpm", "ddpm", 128),
                                                     ("adm", "adm", 32), ("adm", "adm", 256)])
def test_timestep_embeddings_are_exact(arch, flavor, dim):
    ref = torch.load(GOLDEN / f"{arch}_small_io.pt", weights_only=True)["timestep_embedding"]
    assert torch.equal(timestep_embedding(ref["t"], dim, flavor), ref[f"dim{dim}"])
    assert torch.equal(timestep_embedding(ref["t"].long(), dim, flavor), ref[f"dim{dim}"])


def test_ddpm_embedding_float32_trap_is_avoided():
    """The manifest's trap: forming ln(1e4)/(half-1) in float32 changes the embedding by ~3e-5 at t = 999."""
    ref = torch.load(GOLDEN / "ddpm_small_io.pt", weights_only=True)["timestep_embedding"]
    half = 64
    naive_freqs = torch.exp(-torch.tensor(math.log(10000), dtype=torch.float32) * torch.arange(half) / (half - 1))
    args = ref["t"][:, None] * naive_freqs[None]
    naive = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    assert (naive - ref["dim128"]).abs().max().item() > 1e-6
    assert torch.equal(timestep_embedding(ref["t"], 128, "ddpm"), ref["dim128"])
