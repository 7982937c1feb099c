"""The work behind ``train.py``: data, module, trainer, resume and export."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from deqir.datasets.photos import (
    PatchPyramidDataset,
    load_default_photos,
    load_folder_photos,
)
from deqir.lit.instantiate import build_callbacks, instantiate_strict
from deqir.lit.training import DiffusionTrainingModule
from deqir.lit.training_callbacks import SampleGridCallback, export_ema
from deqir.utils.runtime import resolve_precision, tune_allocator


class WallClock(pl.Callback):
    """Accumulates training wall time across resumes (stored in the checkpoint)."""

    def __init__(self):
        self.seconds = 0.0
        self._t = None

    def on_train_start(self, trainer, pl_module):
        self._t = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.time()
        self.seconds += now - self._t
        self._t = now

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds = float(state["seconds"])


def build_logger(cfg_logger: dict[str, Any] | None):
    if not cfg_logger or "_target_" not in cfg_logger:
        return False
    return instantiate_strict("logger", cfg_logger)


def run_training(cfg: DictConfig) -> Path:
    tune_allocator()
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    pl.seed_everything(cfg.seed, workers=True)

    data = cfg.train_data
    if data.folder:
        photos = load_folder_photos(data.folder)
    else:
        photos = load_default_photos(lomiri=data.lomiri)
    dataset = PatchPyramidDataset(photos, crop=data.crop, scales=list(data.scales), length=data.epoch_length,
                                  seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        drop_last=True, persistent_workers=cfg.num_workers > 0)

    tr = cfg.trainer
    module = DiffusionTrainingModule(
        arch=cfg.model.arch,
        model_config=OmegaConf.to_container(cfg.model.config, resolve=True),
        schedule=OmegaConf.to_container(cfg.model.schedule, resolve=True),
        lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps,
        ema_decay=cfg.optim.ema_decay, max_steps=tr.max_steps, cosine_decay=cfg.optim.cosine_decay,
    )
    ckpt_dir = run_dir / "checkpoints"
    clock = WallClock()
    callbacks = [
        pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                                     every_n_train_steps=cfg.checkpoint_every, save_last=True, save_top_k=1),
        SampleGridCallback(str(run_dir / "samples"), every_n_steps=cfg.sample_every),
        clock,
    ]
    callbacks += build_callbacks(OmegaConf.to_container(cfg.get("callbacks"), resolve=True))
    precision = resolve_precision(str(tr.precision), str(tr.accelerator))
    trainer = instantiate_strict(
        "trainer", OmegaConf.to_container(tr, resolve=True), precision=precision,
        logger=build_logger(OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None),
        callbacks=callbacks, enable_checkpointing=True, default_root_dir=str(run_dir), enable_model_summary=False,
    )
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if (cfg.resume and last.is_file()) else None
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    if trainer.global_step % max(1, int(cfg.checkpoint_every)) != 0:
        trainer.save_checkpoint(str(last))  # the final state, so a later run resumes exactly here

    out = Path(cfg.export_path)
    if trainer.is_global_zero:
        meta = {
            "steps": int(trainer.global_step),
            "batch_size": int(cfg.batch_size) * int(tr.devices) * int(tr.num_nodes),
            "train_seconds": round(clock.seconds, 1),
            "precision": precision,
            "photos": [name for name, _ in photos],
            "crop": int(data.crop),
            "command": " ".join(["python", "train.py", *sys.argv[1:]]),
            "torch": torch.__version__,
        }
        export_ema(module, out, meta=meta)
        (run_dir / "export.json").write_text(json.dumps({"path": str(out), **meta}, indent=2))
        print(f"trained {meta['steps']} steps in {meta['train_seconds']:.0f} s; EMA weights: {out}")
    return out
