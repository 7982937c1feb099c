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
SkipType = Literal["uniform", "quad", "linear_sigma", "karras"]

SCHEDULES = ("linear", "quad", "cosine")
SKIP_TYPES = ("uniform", "quad", "linear_sigma", "karras")


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


def level(table_or_schedule, t: int) -> float:
    """VE noise level of timestep t on [-1, 1] images: sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t)."""
    a = float(table_or_schedule.alpha_bar(int(t)))
    return math.sqrt((1.0 - a) / a)


def _nearest_timesteps(schedule: NoiseSchedule, sigmas: np.ndarray, horizon: int) -> list[int]:
    """Each VE level sigma_i -> the timestep t in [0, horizon) whose sigma(t) is nearest in log-space."""
    a = schedule.table[1 : horizon + 1].double().numpy()
    log_levels = 0.5 * np.log((1.0 - a) / a)  # log sigma(t), increasing in t
    target = np.log(np.maximum(sigmas, 1e-12))
    idx = np.searchsorted(log_levels, target).clip(1, horizon - 1)
    left_closer = (target - log_levels[idx - 1]) < (log_levels[idx] - target)
    return (idx - left_closer).astype(np.int64).tolist()


def _strictly_increasing(raw: list[int], horizon: int, name: str, T: int) -> list[int]:
    """Repeated timesteps (small T-step differences near the data) pushed up by one each, kept below horizon."""
    seq: list[int] = []
    for t in sorted(int(v) for v in raw):
        seq.append(max(t, seq[-1] + 1) if seq else max(t, 0))
    if seq[-1] >= horizon:
        raise ValueError(f"the {name} grid with T={T} does not fit below t_start={horizon}: use fewer steps")
    return seq


def timestep_grid(
    num_sampling_steps: int,
    num_train_steps: int = 1000,
    skip_type: str = "uniform",
    trim: bool = True,
    *,
    t_start: int | None = None,
    rho: float = 7.0,
    schedule: NoiseSchedule | None = None,
) -> list[int]:
    """Ascending timestep grid ``seq`` of a T-step sampler on the horizon H = ``t_start`` (None: N), all in [0, H).

    ``uniform``: skip = H // T, seq = 0, skip, 2 skip, ... (< H); with ``trim`` (DeqIR's rule) the last element
    is dropped when H mod T != 0 so len(seq) = T (T = 25, H = 1000 gives 0 ... 960).
    ``quad``: int(linspace(0, sqrt(0.8 H), T) ** 2) (DDIM's CIFAR-10 grid; its top is 0.8 H).
    ``linear_sigma``: VE levels linear from sigma(H - 1) down to 0, sigma_i = sigma_top (T - i) / T for
    i = 0 .. T - 1 (the chain then steps to the clean image), each mapped to the nearest timestep (deepinv's DDRM
    grid with H at its top level; the level <-> timestep map of docs/solvers.md "Grids").
    ``karras``: EDM's rho-spacing (Karras et al. 2022, eq. 5) between sigma(H - 1) and sigma(0),
    sigma_i = (sigma_max^(1/rho) + i / (T - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, mapped likewise.
    The level-based grids need the model's ``schedule``. Every grid is made strictly increasing.
    """
    T, N = num_sampling_steps, num_train_steps
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= N:
        raise ValueError(f"number of sampling steps must be an integer in [1, {N}], got {T!r}")
    if t_start is None:
        H = N
    elif isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 < t_start <= N:
        raise ValueError(f"t_start must be an integer timestep in (0, {N}] (null = {N}, the pure-noise start), "
                         f"got {t_start!r}")
    else:
        H = int(t_start)
    if T > H:
        raise ValueError(f"{T} sampling steps do not fit below t_start={H}: use sampler.timesteps <= {H} or a "
                         f"higher t_start")
    if skip_type == "uniform":
        skip = H // T
        seq = list(range(0, H, skip))
        if trim and H % T != 0:
            seq = seq[:-1]
        seq = seq[:T] if trim else seq
    elif skip_type == "quad":
        raw = (np.linspace(0, np.sqrt(H * 0.8), T) ** 2).astype(np.int64).tolist()
        seq = _strictly_increasing(raw, H, "quad", T)
    elif skip_type in ("linear_sigma", "karras"):
        if schedule is None:
            raise ValueError(f"the {skip_type} grid places steps by noise level: pass the model's schedule")
        if schedule.num_steps != N:
            raise ValueError(f"schedule has {schedule.num_steps} steps, the grid {N}")
        top, bottom = level(schedule, H - 1), level(schedule, 0)
        i = np.arange(T, dtype=np.float64)
        if skip_type == "linear_sigma":
            sigmas = top * (T - i) / T
        else:
            if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
                raise ValueError(f"rho (the karras grid's exponent) must be a finite number > 0, got {rho!r}")
            frac = i / max(T - 1, 1)
            sigmas = (top ** (1 / rho) + frac * (bottom ** (1 / rho) - top ** (1 / rho))) ** rho
        seq = _strictly_increasing(_nearest_timesteps(schedule, sigmas, H), H, skip_type, T)
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; valid: {', '.join(SKIP_TYPES)}")
    return seq


@dataclass(frozen=True)
class SamplingGrid:
    """Processing-order timesteps of a T-step chain: ``t[j]`` descending, ``t_next[j] = t[j + 1]``, last -1.

    ``from_measurement``: the chain starts below the pure-noise level (``t_start`` < N), from the measurement's
    estimate diffused to ``t[0]`` (:func:`deqir.diffusion.chain.diffuse`), as CCDF and DDRM start.
    """

    t: tuple[int, ...]
    t_next: tuple[int, ...]
    from_measurement: bool = False

    @classmethod
    def create(
        cls,
        num_sampling_steps: int,
        num_train_steps: int = 1000,
        skip_type: str = "uniform",
        trim: bool = True,
        *,
        t_start: int | None = None,
        rho: float = 7.0,
        schedule: NoiseSchedule | None = None,
    ) -> "SamplingGrid":
        seq = timestep_grid(num_sampling_steps, num_train_steps, skip_type, trim, t_start=t_start, rho=rho,
                            schedule=schedule)
        t = tuple(reversed(seq))
        t_next = tuple(reversed([-1] + seq[:-1]))
        return cls(t=t, t_next=t_next, from_measurement=t_start is not None and int(t_start) < num_train_steps)

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
