"""Lightning module that trains an eps-prediction diffusion model (DDPM objective, EMA weights)."""
from __future__ import annotations

import copy
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from deqir.diffusion.schedule import NoiseSchedule
from deqir.models.factory import build_model


class DiffusionTrainingModule(pl.LightningModule):
    """eps-MSE on a discrete schedule; ``self.ema`` holds the exponential moving average of ``self.model``.

    Args:
        arch, model_config: architecture name and constructor kwargs (see :func:`build_model`).
        schedule: ``{"name", "num_steps", "beta_start", "beta_end"}``.
        lr, weight_decay, betas: AdamW. ``warmup_steps``: linear LR warm-up.
        ema_decay: EMA decay (with the usual (1 + n) / (10 + n) warm-up; why not Lightning's EMA callback:
            docs/models.md "Loading").
    """

    def __init__(
        self,
        arch: str,
        model_config: dict[str, Any],
        schedule: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 500,
        ema_decay: float = 0.999,
        max_steps: int | None = None,
        cosine_decay: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        schedule = schedule or {"name": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
        self.schedule_config = dict(schedule)
        sched = NoiseSchedule.create(**schedule)
        self.register_buffer("alpha_bar", sched.table[1:].clone(), persistent=False)
        self.model = build_model(arch, **model_config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model(x, t)

    def diffusion_loss(self, x0: Tensor) -> Tensor:
        """E_t,eps || eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t) ||^2 (Ho et al. 2020, eq. 14)."""
        b = x0.shape[0]
        t = torch.randint(0, self.alpha_bar.numel(), (b,), device=x0.device)
        eps = torch.randn_like(x0)
        a = self.alpha_bar[t].view(b, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return F.mse_loss(self.model(x_t, t).float(), eps)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.diffusion_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}; lower the learning rate")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.global_step
        decay = min(self.hparams.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1 - decay)
            for e, b in zip(self.ema.buffers(), self.model.buffers()):
                e.copy_(b)

    def on_train_epoch_start(self) -> None:
        ds = self.trainer.train_dataloader.dataset if self.trainer.train_dataloader is not None else None
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                weight_decay=self.hparams.weight_decay)
        warm, total, cosine = self.hparams.warmup_steps, self.hparams.max_steps, self.hparams.cosine_decay

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / max(1, warm))
            if cosine and total and step > warm:
                f *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def ema_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.ema.state_dict().items()}
