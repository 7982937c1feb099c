"""Adapters for cross-checking the chains against deepinv (optional extra ``peers``; docs/chains.md).

deepinv's samplers take a sigma-denoiser D(x, sigma) on the [0, 1] scale. :class:`EpsDenoiser` turns our
eps-model into one the way deepinv's own DiffUNet does (facts in docs/chains.md): alpha_bar' = 1 / (1 + 4 sigma^2),
t = the grid timestep whose sqrt(1 - alpha_bar_t) is nearest, x_t = sqrt(alpha_bar') (2 x - 1), and the DDIM
x0 prediction clamped to [-1, 1], returned on [0, 1].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from deqir.diffusion.chain import ChainCoefficients
from deqir.diffusion.schedule import NoiseSchedule


class EpsDenoiser(nn.Module):
    """D(x, sigma): x (B, C, H, W) on [0, 1], sigma (VE level on the [0, 1] scale) -> x0 (B, C, H, W) on [0, 1]."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule | None = None):
        super().__init__()
        self.model = model
        self.schedule = schedule or NoiseSchedule.create()
        self.sqrt_1m = torch.sqrt(1 - self.schedule.alpha_bar(list(range(self.schedule.num_steps))))

    def timestep(self, sigma: float) -> int:
        """The discrete t whose noise level matches deepinv's sigma (nearest sqrt(1 - alpha_bar))."""
        a = 1.0 / (1.0 + 4.0 * sigma * sigma)
        return int(torch.argmin((self.sqrt_1m - (1 - a) ** 0.5).abs()))

    def forward(self, x: Tensor, sigma, *args, **kwargs) -> Tensor:
        sig = float(torch.as_tensor(sigma).flatten()[0])
        a = 1.0 / (1.0 + 4.0 * sig * sig)
        t = self.timestep(sig)
        param = next(self.model.parameters(), None)
        x_t = (a**0.5 * (2 * x - 1)).to(param.dtype if param is not None else x.dtype)
        eps = self.model(x_t, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).to(x_t.dtype)
        x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5
        return ((x0.clamp(-1, 1) + 1) / 2).to(x.dtype)


def coefficients_on(t: list[int], t_next: list[int], schedule: NoiseSchedule | None = None) -> ChainCoefficients:
    """ChainCoefficients of an arbitrary grid (t_j -> t'_j; t' = -1 means alpha_bar = 1), DDIM (etw = nw = 0)."""
    sched = schedule or NoiseSchedule.create()
    a = sched.alpha_bar(list(t))
    a_next = torch.tensor([1.0 if s < 0 else float(sched.alpha_bar([s])[0]) for s in t_next], dtype=torch.float64)
    return ChainCoefficients(t=torch.tensor(t, dtype=torch.long), a=a, a_next=a_next, c1=torch.zeros_like(a),
                             c2=torch.sqrt(1 - a_next), lam=torch.ones_like(a))


def diffpir_grid(num_steps: int, num_train: int = 1000) -> tuple[list[int], list[int]]:
    """DiffPIR's 'quad' grid as deepinv builds it (docs/chains.md): t_i = T - 1 - floor(sqrt(i / (N - 1)) T), the
    last forced to 0; our chain runs steps t_0 .. t_{N-2} (deepinv's last model call is unused)."""
    seq = torch.sqrt(torch.linspace(0.0, float(num_train**2), num_steps)).to(torch.int32).tolist()
    seq[-1] -= 1
    ts = [num_train - 1 - s for s in seq]
    return ts[:-1], ts[1:]


def vp_times(coeffs: ChainCoefficients) -> Tensor:
    """deepinv VP-SDE times landing exactly on our grid: alpha_bar(t) = exp(-0.1 t - 9.95 t^2) solved for each
    alpha_bar(t_j), then 0 (alpha_bar = 1). (T + 1,) float64."""
    ab = coeffs.a
    t = (-0.1 + torch.sqrt(0.01 + 39.8 * (-torch.log(ab)))) / 19.9
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def dps_deepinv_zeta(coeffs: ChainCoefficients, weight: float) -> list[float]:
    """Our per-step DPS zeta_j equal to deepinv's DDIM-solver guidance with ``weight``: its score correction
    (weight/2) grad |A x0 - y| (the residual on [0, 1]) enters a DDIM step as sqrt(a a') sigma (sigma - sigma')."""
    a, an = coeffs.a, coeffs.a_next
    sig, sig_n = torch.sqrt((1 - a) / a), torch.sqrt((1 - an) / an)
    return (0.5 * weight * torch.sqrt(a * an) * sig * (sig - sig_n)).tolist()
