"""The Python API: ``deqir.restore`` and ``deqir.Restorer`` (docs/api.md).

Both compose the configuration ``invert.py`` composes (Hydra's compose API over ``conf/``, with the same
override strings) and run the same :class:`~deqir.lit.restoration.RestorationModule`, so the same images in
the same order with the same seed give the CLI's results. Every default lives in ``conf/``; nothing here
has a default of its own beyond "whatever the configuration says".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import Tensor

#: Config keys that only the command-line app reads (run directory, logger, Lightning trainer).
_CLI_ONLY = ("hydra", "logger")


def config_dir() -> Path:
    """``conf/`` of the source checkout: the configuration tree ``invert.py`` reads."""
    return Path(__file__).resolve().parents[1] / "conf"


def compose_config(task: str | None = None, overrides: Sequence[str] | None = None) -> DictConfig:
    """``conf/invert.yaml`` composed as ``python invert.py [task=TASK] OVERRIDES`` composes it.

    Works inside a running Hydra app too (its global state is put back afterwards).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = [*([f"task={task}"] if task is not None else []), *(overrides or [])]
    bad = [a for a in args if not isinstance(a, str)]
    if bad:
        raise ValueError(f"overrides are the command line's strings (e.g. 'sampler.timesteps=50'), got {bad[0]!r}")
    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir()), job_name="invert"):
            cfg = compose("invert", overrides=args)
    finally:
        if saved is not None:
            GlobalHydra.instance().initialize(saved)
    with open_dict(cfg):
        for key in _CLI_ONLY:
            cfg.pop(key, None)
    return cfg


@dataclass
class RestoreResult:
    """``images``: (N, 3, H, W) restored images on [0, 1] (as saved to ``images/*.png``, before 8-bit
    rounding; with ``num_samples`` K > 1 the samples' mean, ``mean/*.png``); ``stats``: one dict per image with
    the ``per_image.csv`` columns; ``inputs``: the measurements in image space (``inputs/*.png``; None for
    generation); ``samples``: (N, K, 3, H, W) when K > 1 (``images/<name>_<k>.png``), else None."""

    images: Tensor
    stats: list[dict[str, Any]]
    inputs: Tensor | None
    samples: Tensor | None = None


class Restorer:
    """A configured restorer for many calls: the model is loaded once.

    Args:
        task: a ``task/`` option (``deblur``, ``sr4``, ...); None = the configuration's default.
        overrides: ``invert.py`` override strings, e.g. ``["sampler.timesteps=50", "solver=picard"]``.
        device: torch device; None = ``cuda`` when available and ``trainer.accelerator`` allows it, else CPU.
    """

    def __init__(self, task: str | None = None, overrides: Sequence[str] | None = None,
                 device: str | torch.device | None = None):
        from deqir.lit import builders
        from deqir.lit.app import plain_config

        self.config = compose_config(task, overrides)
        with open_dict(self.config):
            self.config["trainer"]["inference_mode"] = False
        self.plain = plain_config(self.config)
        if self.plain["dataset"].get("name") == "real":
            raise ValueError("deqir.restore takes clean images and degrades them with the task's operator; "
                             "dataset=real (already degraded inputs) is an invert.py option")
        accelerator = str(self.plain["trainer"].get("accelerator", "auto"))
        if device is None:
            device = "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = builders.build_model(self.plain["model"])
        self._modules: dict[tuple[int, int, int], Any] = {}

    def restore(self, images: Tensor | Sequence[str | Path]) -> RestoreResult:
        """Restore ``images``: paths (read at their own size) or an (N, 3, H, W) tensor on [0, 1].

        Image ``i`` uses the noise of dataset index ``i`` (as the CLI's i-th image, sorted by path).
        """
        if str(self.plain["task"]["name"]) == "generate":
            raise ValueError("task=generate has no images to restore: use deqir.generate(num_images, overrides)")
        batch = _as_batch(images)
        n = batch.shape[0]
        module = self._module(tuple(batch.shape[1:]))
        size = int(self.plain["batch_size"])
        names = _names(images, n)
        outs = []
        for start in range(0, n, size):
            idx = list(range(start, min(n, start + size)))
            item = {"index": torch.tensor(idx), "name": [names[i] for i in idx], "image": batch[idx]}
            outs.append(module.predict_step(item, start // size))
        return _result(outs)

    def generate(self, num_images: int) -> RestoreResult:
        """``task=generate``: images 0 .. num_images - 1 of ``invert.py task=generate`` (same seeds), at
        ``dataset.size``."""
        if str(self.plain["task"]["name"]) != "generate":
            raise ValueError(f"generate() needs task='generate', this Restorer has task={self.plain['task']['name']!r}")
        from deqir.datasets.generation import GeneratedIndices
        from deqir.lit import builders

        ds = GeneratedIndices(num_images)
        module = self._module(builders.image_shape(self.plain["dataset"]))
        size = int(self.plain["batch_size"])
        outs = []
        for start in range(0, num_images, size):
            idx = list(range(start, min(num_images, start + size)))
            outs.append(module.predict_step({"index": torch.tensor(idx), "name": [ds.names[i] for i in idx]},
                                            start // size))
        return _result(outs)

    __call__ = restore

    def _module(self, shape: tuple[int, int, int]):
        from deqir.lit import builders
        from deqir.lit.app import build_module

        if shape not in self._modules:
            plain = {**self.plain, "dataset": {**self.plain["dataset"], "size": [shape[1], shape[2]]}}
            op = builders.build_operator(plain["task"], shape)
            module = build_module(plain, op, self.model, shape).to(self.device)
            module.eval()
            module.on_predict_start()
            self._modules = {shape: module}  # one size at a time: a module holds its operator's buffers
        return self._modules[shape]


def restore(images: Tensor | Sequence[str | Path], task: str | None = None,
            overrides: Sequence[str] | None = None, device: str | torch.device | None = None) -> RestoreResult:
    """Restore ``images`` with ``invert.py``'s configuration for ``task`` and ``overrides``.

    One-off form of :class:`Restorer` (which keeps the model loaded between calls); see docs/api.md.
    """
    return Restorer(task=task, overrides=overrides, device=device).restore(images)


def generate(num_images: int, overrides: Sequence[str] | None = None,
             device: str | torch.device | None = None) -> RestoreResult:
    """Unconditional generation with ``invert.py task=generate``'s configuration and ``overrides``:
    ``result.images`` (num_images, 3, H, W) on [0, 1], H = W = ``dataset.size`` (docs/api.md)."""
    return Restorer(task="generate", overrides=overrides, device=device).generate(num_images)


def _result(outs: list) -> RestoreResult:
    """Concatenate the per-batch results of ``predict_step``."""
    return RestoreResult(images=torch.cat([o.restored for o in outs]), stats=[row for o in outs for row in o.rows],
                         inputs=torch.cat([o.inputs for o in outs]) if outs[0].inputs is not None else None,
                         samples=torch.cat([o.samples for o in outs]) if outs[0].samples is not None else None)


def _as_batch(images: Tensor | Sequence[str | Path]) -> Tensor:
    """(N, 3, H, W) float32 on [0, 1] from a tensor or from image paths (all of one size)."""
    if isinstance(images, Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) on [0, 1], got shape {tuple(images.shape)}")
        if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
            raise ValueError("images must be on [0, 1] (got values outside it)")
        return x.detach().float().cpu()
    if isinstance(images, (str, Path)):
        images = [images]
    from deqir.datasets.images import read_image, to_tensor

    tensors = [to_tensor(read_image(p)) for p in images]
    if not tensors:
        raise ValueError("no images given")
    sizes = sorted({tuple(t.shape[1:]) for t in tensors})
    if len(sizes) > 1:
        raise ValueError(f"images of one call must share a size, got {', '.join(f'{h}x{w}' for h, w in sizes)}")
    return torch.stack(tensors)


def _names(images: Tensor | Sequence[str | Path], n: int) -> list[str]:
    if isinstance(images, Tensor):
        return [f"{i:05d}" for i in range(n)]
    if isinstance(images, (str, Path)):
        images = [images]
    return [Path(p).stem for p in images]
