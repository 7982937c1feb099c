"""Per-step coefficients of the DDIM/DDNM restoration chain that DeqIR solves (DDIM eq. 12, DDNM eq. 13; docs/solvers.md).

Step j (noisy -> clean), input state x_j (x_0 := x_T), eps_j = eps_theta(x_j, t_j):

    x0_hat   = (x_j - sqrt(1 - a_j) eps_j) / sqrt(a_j)                         (DDIM x0 prediction)
    x0_tilde = x0_hat - lam_j A^+ (A x0_hat - y)                               (DDNM rectification)
    x_{j+1}  = sqrt(a'_j) x0_tilde + c2_j eps_j + c1_j z_j

with a_j = alpha_bar(t_j), a'_j = alpha_bar(t'_j), c1_j = sqrt(1 - a'_j) nw, c2_j = sqrt(1 - a'_j) sqrt(1 - etw^2).
``lam_j = 1`` is DDNM's hard range-space replacement (the official DeqIR chain). With measurement noise
(``sigma_y > 0``) and ``noise_aware=True`` we use a DDNM+-style schedule (Wang et al. 2023, eq. 19):
the range-space correction injects noise of std ``sqrt(a'_j) lam_j sigma_y_eff``; we cap it at the noise
level the next state expects, ``lam_j = min(1, sqrt(1 - a'_j) / (sqrt(a'_j) sigma_y_eff))``, and shrink the
eps term so the total variance stays ``c2_j^2 + (sqrt(a'_j) lam_j sigma_y_eff)^2`` (the noise term c1 is
kept). ``sigma_y_eff`` is sigma_y in [-1, 1] units times the operator's pseudo-inverse noise gain.

All coefficients are float64 tensors of shape (T,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid


@dataclass(frozen=True)
class ChainCoefficients:
    """Scalars of a T-step chain (all (T,) float64 except ``t``, a (T,) long tensor of timesteps)."""

    t: Tensor
    a: Tensor  # alpha_bar(t_j)
    a_next: Tensor  # alpha_bar(t'_j)
    c1: Tensor  # fresh-noise coefficient
    c2: Tensor  # eps coefficient
    lam: Tensor  # range-space correction weight (1 = hard DDNM)
    from_measurement: bool = False  # the chain starts at t[0] < N from the measurement (SamplingGrid.from_measurement)

    def __len__(self) -> int:
        return int(self.t.numel())

    @property
    def x0_eps(self) -> Tensor:
        """sqrt((1 - a_j) / a_j): x0_hat = x_j / sqrt(a_j) - x0_eps_j eps_j."""
        return torch.sqrt((1 - self.a) / self.a)

    @property
    def ratio(self) -> Tensor:
        """r_j = sqrt(a'_j / a_j): coefficient of x_j in x_{j+1} (null space)."""
        return torch.sqrt(self.a_next / self.a)


def make_chain(
    schedule: NoiseSchedule,
    grid: SamplingGrid,
    *,
    etw: float,
    nw: float,
    sigma_y_eff: float = 0.0,
    noise_aware: bool = True,
) -> ChainCoefficients:
    """Chain coefficients for ``grid`` on ``schedule`` (see module docstring).

    Args:
        etw: shrinks the eps term, c2 = sqrt(1 - a') sqrt(1 - etw^2) (official ``--etw``), in [0, 1].
        nw: scales the fresh-noise term, c1 = sqrt(1 - a') nw (official ``--nw``), >= 0.
        sigma_y_eff: measurement noise std in [-1, 1] units as seen through A^+ (0 = noiseless).
        noise_aware: use the DDNM+-style lam_j when ``sigma_y_eff > 0``; else lam_j = 1 (official).
    """
    if not 0.0 <= etw <= 1.0:
        raise ValueError(f"etw must lie in [0, 1], got {etw}")
    if nw < 0:
        raise ValueError(f"nw must be >= 0, got {nw}")
    if sigma_y_eff < 0 or not math.isfinite(sigma_y_eff):
        raise ValueError(f"sigma_y_eff (2 sigma_y times the pseudo-inverse noise gain, [-1, 1] units) must be a "
                         f"finite value >= 0, got {sigma_y_eff}")
    t = torch.tensor(grid.t, dtype=torch.long)
    a = schedule.alpha_bar(list(grid.t))
    a_next = schedule.alpha_bar(list(grid.t_next))
    s_next = torch.sqrt(1 - a_next)
    c1 = s_next * nw
    c2 = s_next * math.sqrt(1 - etw**2)
    lam = torch.ones_like(a)
    if noise_aware and sigma_y_eff > 0:
        injected = torch.sqrt(a_next) * sigma_y_eff
        lam = torch.clamp(s_next / injected, max=1.0)
        c2 = torch.sqrt(torch.clamp(c2**2 - (lam * injected) ** 2, min=0.0))
    return ChainCoefficients(t=t, a=a, a_next=a_next, c1=c1, c2=c2, lam=lam,
                             from_measurement=bool(getattr(grid, "from_measurement", False)))


def diffuse(x0: Tensor, noise: Tensor, a: float) -> Tensor:
    """The forward process to level a = alpha_bar(t): sqrt(a) x0 + sqrt(1 - a) noise (DDPM eq. 4), shapes of x0.

    A chain truncated at t_start < N starts from its measurement this way (CCDF, Chung et al. 2022; DDRM): x0 is
    the estimate A^+ y and the noise is the image's own x_T draw, so the randomness stays per image.
    """
    return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise
