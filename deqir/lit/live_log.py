"""Per-image logging while a run goes on (long runs stay watchable in W&B / the CSV logger)."""
from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl

#: per_image.csv columns logged as ``image/<column>`` when each image finishes.
LIVE_COLUMNS = ("psnr", "ssim", "lpips", "consistency", "psnr_to_sequential", "rounds", "nfe", "residual",
                "seconds", "psnr_init", "loss_best")


class PerImageLogger(pl.Callback):
    """After each predict batch, log every finished image's numbers (``image/psnr``, ...; step = images done
    on this rank) and, for W&B, the restored image with its name and PSNR as caption. Lightning loggers log
    on rank 0 only: under DDP the live curve shows rank 0's images, the end-of-run table all of them."""

    def __init__(self, max_images: int = 64):
        self.count, self.max_images = 0, max_images

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        logger = trainer.logger
        if logger is None or outputs is None or not trainer.is_global_zero:
            return
        wandb_run = _wandb_run(logger)
        for b, row in enumerate(outputs.rows):
            numbers = {f"image/{k}": float(row[k]) for k in LIVE_COLUMNS
                       if isinstance(row.get(k), (int, float)) and math.isfinite(float(row[k]))}
            if numbers:
                logger.log_metrics(numbers, step=self.count)
            if wandb_run is not None and self.count < self.max_images:
                import wandb

                caption = f"{row['name']}" + (f" {row['psnr']:.2f} dB" if row.get("psnr") is not None else "")
                image = outputs.restored[b].permute(1, 2, 0).clamp(0, 1).mul(255).round().byte().numpy()
                wandb_run.log({"image/restored": wandb.Image(image, caption=caption)}, step=self.count)
            self.count += 1


def _wandb_run(logger) -> Any:
    from pytorch_lightning.loggers import WandbLogger

    return logger.experiment if isinstance(logger, WandbLogger) else None
