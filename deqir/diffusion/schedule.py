"""Noise schedules, timestep grids and timestep embeddings.

Conventions (docs/models.md):

* ``betas`` are built in float64 and cast to float32, exactly as DDRM/DDNM/DeqIR do.
* ``alpha_bar(t)`` is the float32 ``cumprod(1 - beta)`` indexed at ``t + 1`` over the betas with a
  0 prepended, so ``alpha_bar(-1) = 1``.
* A sampling grid of ``T`` steps is processed from noisy to clean: ``t_j`` (descending) and the
  "next" time ``t'_j = t_{j+1}``, with ``t'_{T-1} = -1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ScheduleName = Literal["linear", "quad", "cosine"]
SkipType = Literal["uniform", "quad"]

SCHEDULES = ("linear", "quad", "cosine")
SKIP_TYPES = ("uniform", "quad")


def make_betas(
    name: str = "linear",
    num_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Beta schedule, computed in float64 and returned as a float32 tensor of shape (num_steps,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    elif name == "cosine":
        # Nichol & Dhariwal (2021), eq. 17, betas clipped at 0.999.
        steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        f = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return torch.from_numpy(betas).float()


def alpha_bar_table(betas: Tensor) -> Tensor:
    """Float32 table of shape (num_steps + 1,): entry ``t + 1`` holds alpha_bar(t), entry 0 is 1."""
    padded = torch.cat([torch.zeros(1, dtype=betas.dtype), betas])
    return torch.cumprod(1.0 - padded, dim=0)


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete diffusion schedule of a pretrained model.

    Attributes:
        betas: (N,) float32.
        table: (N + 1,) float32, ``table[t + 1] = alpha_bar(t)``.
    """

    betas: Tensor
    table: Tensor

    @classmethod
    def create(cls, name: str = "linear", num_steps: int = 1000, **kwargs) -> "NoiseSchedule":
        betas = make_betas(name, num_steps, **kwargs)
        return cls(betas=betas, table=alpha_bar_table(betas))

    @property
    def num_steps(self) -> int:
        return int(self.betas.numel())

    def alpha_bar(self, t: Tensor | int | list[int], dtype: torch.dtype = torch.float64) -> Tensor:
        """alpha_bar at integer timesteps ``t`` (``-1`` allowed, giving 1), cast to ``dtype``."""
        t = torch.as_tensor(t, dtype=torch.long)
        if (t < -1).any() or (t >= self.num_steps).any():
            raise ValueError(f"timesteps must lie in [-1, {self.num_steps - 1}], got {t.tolist()}")
        return self.table[t + 1].to(dtype)


def timestep_grid(
    num_sampling_steps: int,
    num_train_steps: int = 1000,
    skip_type: str = "uniform",
    trim: bool = True,
) -> list[int]:
    """Ascending timestep grid ``seq`` of a T-step sampler.

    ``uniform``: skip = N // T, seq = 0, skip, 2 skip, ... (< N); with ``trim`` (DeqIR's rule) the
    last element is dropped when N mod T != 0 so len(seq) = T (T = 25 gives 0 ... 960).
    ``quad``: int(linspace(0, sqrt(0.8 N), T) ** 2), made strictly increasing.
    """
    T, N = num_sampling_steps, num_train_steps
    if not 1 <= T <= N:
        raise ValueError(f"number of sampling steps must be in [1, {N}], got {T}")
    if skip_type == "uniform":
        skip = N // T
        seq = list(range(0, N, skip))
        if trim and N % T != 0:
            seq = seq[:-1]
        seq = seq[:T] if trim else seq
    elif skip_type == "quad":
        raw = (np.linspace(0, np.sqrt(N * 0.8), T) ** 2).astype(np.int64).tolist()
        seq = []
        for t in raw:  # DDIM's quad grid repeats small values when T is large; keep it strictly increasing
            seq.append(max(int(t), seq[-1] + 1) if seq else int(t))
        if seq[-1] >= N:
            raise ValueError(f"quad grid with T={T} does not fit in {N} training steps")
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; valid: {', '.join(SKIP_TYPES)}")
    return seq


@dataclass(frozen=True)
class SamplingGrid:
    """Processing-order timesteps of a T-step chain: ``t[j]`` descending, ``t_next[j] = t[j + 1]``, last -1."""

    t: tuple[int, ...]
    t_next: tuple[int, ...]

    @classmethod
    def create(
        cls,
        num_sampling_steps: int,
        num_train_steps: int = 1000,
        skip_type: str = "uniform",
        trim: bool = True,
    ) -> "SamplingGrid":
        seq = timestep_grid(num_sampling_steps, num_train_steps, skip_type, trim)
        t = tuple(reversed(seq))
        t_next = tuple(reversed([-1] + seq[:-1]))
        return cls(t=t, t_next=t_next)

    def __len__(self) -> int:
        return len(self.t)


def timestep_embedding(t: Tensor, dim: int, flavor: Literal["ddpm", "adm"] = "ddpm") -> Tensor:
    """Sinusoidal timestep embedding (B,) -> (B, dim), float32, bit-exact to the references.

    ``ddpm``: freq_i = exp(-i ln(1e4) / (half - 1)), constant formed in float64 first, [sin, cos]
    (pesser/DDIM ``get_timestep_embedding``). ``adm``: freq_i = exp(-ln(1e4) i / half), [cos, sin]
    (guided-diffusion ``timestep_embedding``). Odd ``dim`` is zero-padded.
    """
    half = dim // 2
    t = t.float()
    if flavor == "ddpm":
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
        args = t[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    elif flavor == "adm":
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None] * freqs[None, :]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    else:
        raise ValueError(f"unknown embedding flavor {flavor!r}; valid: ddpm, adm")
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
