"""Training callbacks: periodic sample grids from the EMA model, and the fp16 EMA export."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.samplers.sequential import draw_chain_noise, sample_sequential
from deqir.models.export import save_eps_model
from deqir.utils.images import grid, save_png, to_unit


class SampleGridCallback(pl.Callback):
    """Every ``every_n_steps`` steps, sample ``num_images`` images with DDIM (``steps`` steps) from the EMA."""

    def __init__(self, out_dir: str, every_n_steps: int = 1000, num_images: int = 16, size: int = 32,
                 steps: int = 25, seed: int = 0):
        self.out_dir, self.every = Path(out_dir), every_n_steps
        self.num_images, self.size, self.steps, self.seed = num_images, size, steps, seed

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every <= 0 or step % self.every != 0 or step == 0:
            return
        images = sample_ema_grid(pl_module, self.num_images, self.size, self.steps, self.seed)
        path = save_png(grid(images, nrow=int(self.num_images**0.5)), self.out_dir / f"step_{step:07d}.png")
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="samples", images=[str(path)], step=step)


@torch.no_grad()
def sample_ema_grid(pl_module, num_images: int, size: int, steps: int, seed: int) -> torch.Tensor:
    """(N, 3, size, size) images on [0, 1] sampled from ``pl_module.ema`` with deterministic DDIM."""
    sched = NoiseSchedule.create(**pl_module.schedule_config)
    coeffs = make_chain(sched, SamplingGrid.create(steps, sched.num_steps), etw=0.0, nw=0.0)  # deterministic DDIM
    gens = [torch.Generator().manual_seed(seed * 100003 + i) for i in range(num_images)]
    x_T, _ = draw_chain_noise((num_images, 3, size, size), steps, gens, per_step_noise=False, device=pl_module.device)
    ema = pl_module.ema
    was_training = ema.training
    ema.eval()
    x0, _ = sample_sequential(lambda x, t: ema(x, t).float(), coeffs, x_T)
    ema.train(was_training)
    return to_unit(x0).cpu()


def export_ema(pl_module, path: str | Path, meta: dict | None = None) -> Path:
    """Write the EMA weights in fp16 in deqir's model format (loads in ``invert.py``)."""
    hp = pl_module.hparams
    return save_eps_model(path, hp.arch, dict(hp.model_config), pl_module.ema_state_dict(),
                          schedule=pl_module.schedule_config, meta=meta or {}, dtype=torch.float16)
