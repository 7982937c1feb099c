"""Build an eps-model from an architecture name and the reference constructor arguments."""
from __future__ import annotations

from typing import Any

from torch import nn

ARCHITECTURES = ("ddpm", "adm")


def build_model(arch: str, **config: Any) -> nn.Module:
    """``arch``: ``ddpm`` (:class:`DDPMUNet`, celeba_hq.yml keys) or ``adm`` (:class:`ADMUNet`)."""
    if arch == "ddpm":
        from deqir.models.ddpm_unet import DDPMUNet

        return DDPMUNet(**config)
    if arch == "adm":
        from deqir.models.adm_unet import ADMUNet

        return ADMUNet(**config)
    raise ValueError(f"unknown model architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
