"""Small ε-models shared by the tests (float64)."""
from __future__ import annotations

import torch
from torch import nn

from deqir.diffusion.schedule import NoiseSchedule
from deqir.models import DDPMUNet, init_random_

DT = torch.float64
SCHEDULE = NoiseSchedule.create()


class TinyEps(nn.Module):
    """eps = Gaussian-prior score (data ~ N(0, s^2 I)) + scale * conv(tanh(conv(x) + emb(t))).

    Score-like: its Jacobian has the scale of a trained model's (the Gaussian part), plus a nonlinearity.
    """

    def __init__(self, seed: int = 0, scale: float = 0.3, s: float = 0.5, hidden: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(hidden, 3, 3, 3, generator=g, dtype=DT) / 27**0.5, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(3, hidden, 3, 3, generator=g, dtype=DT) / (9 * hidden) ** 0.5,
                               requires_grad=False)
        self.emb = nn.Parameter(torch.randn(hidden, generator=g, dtype=DT), requires_grad=False)
        self.scale, self.s2 = scale, s * s

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = SCHEDULE.alpha_bar(t.cpu()).to(x).view(-1, 1, 1, 1)
        h = torch.tanh(nn.functional.conv2d(x, self.w1, padding=1) + (t.to(x) / 1000).view(-1, 1, 1, 1)
                       * self.emb.view(1, -1, 1, 1))
        return (1 - a).sqrt() * x / (a * self.s2 + 1 - a) + self.scale * nn.functional.conv2d(h, self.w2, padding=1)


def tiny_unet(size: int = 16, seed: int = 0) -> DDPMUNet:
    """A random 2-level DDPMUNet with the manifests' "scaled" init (eps depends strongly on x), float64."""
    net = DDPMUNet(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], mid_attn=False, resolution=size)
    init_random_(net, seed)
    return net.to(DT).eval().requires_grad_(False)
