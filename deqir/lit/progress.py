"""A progress bar in images (not batches) that also shows the image being solved and its solver round and
residual (the sequential chain: its step; the optimisation modes: the optimisation step and loss)."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar
from tqdm.auto import tqdm


class ImageProgressBar(ProgressBar):
    """``images done / total`` on rank 0 with ``round k, residual r`` of the image(s) being solved.

    Args:
        total: callable ``(rank, world_size) -> images the bar counts`` (all ranks' with ``done``).
        desc: label in front of the bar.
        done: optional callable returning how many images all ranks have finished so far (e.g. from the run
            directory); without it the bar counts rank 0's own batches.
    """

    def __init__(self, total: Callable[[int, int], int], desc: str = "restoring",
                 done: Callable[[], int] | None = None):
        super().__init__()
        self.total_fn, self.desc, self.done_fn = total, desc, done
        self.labels = ("round", "residual")
        self.image = ""  # the image(s) being solved, shown before the round
        self._enabled = True
        self.bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(pl_module, "round_hook"):
            pl_module.round_hook = self.set_round
        self.labels = getattr(pl_module, "progress_labels", ("round", "residual"))
        if not (self._enabled and trainer.is_global_zero):
            return
        self.bar = tqdm(total=self.total_fn(trainer.global_rank, trainer.world_size), desc=self.desc, unit="img",
                        file=sys.stderr, dynamic_ncols=True, leave=False)
        if self.done_fn is not None:  # a later group of photos (one Trainer per group): the images done so far
            self.bar.n = min(int(self.bar.total or 0), self.done_fn())

    def set_round(self, round_: int, residual: float) -> None:
        """Called by the module after every solver round (or sequential step: ``residual`` NaN)."""
        if self.bar is not None:
            text = (f"{self.labels[0]} {round_}, {self.labels[1]} {residual:.2e}" if math.isfinite(residual)
                    else f"step {round_}")
            self.bar.set_postfix_str(f"{self.image}{text}", refresh=True)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        names = list(batch.get("name", []))
        self.image = (f"{names[0]}" + (f" +{len(names) - 1}" if len(names) > 1 else "") + ": ") if names else ""
        if self.bar is not None:
            self.bar.set_postfix_str(self.image.rstrip(": "), refresh=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.bar is None:
            return
        if self.done_fn is None:
            self.bar.update(len(batch["index"]))
        else:
            self.bar.n = min(int(self.bar.total or 0), self.done_fn())
            self.bar.refresh()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_predict_end(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
