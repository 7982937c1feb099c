"""The Python API: ``deqir.restore``, ``deqir.evaluate`` and ``deqir.Restorer`` (docs/api.md).

``restore`` restores the degraded photos it is given (``invert.py dataset=real``); ``evaluate`` degrades clean
images with the task's operator first and scores the restorations against them. Both compose the configuration
``invert.py`` composes (Hydra's compose API over ``conf/``, with the same override strings) and run the same :class:`~deqir.lit.restoration.RestorationModule`, so the same images in
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
    """``images``: the restored images on [0, 1] (as saved to ``images/*.png``, before 8-bit rounding; with
    ``num_samples`` K > 1 the samples' mean, ``mean/*.png``): an (N, 3, H, W) tensor, or a list of (3, H, W)
    tensors when the images have different sizes; ``stats``: one dict per image with the ``per_image.csv``
    columns; ``inputs``: the measurements in image space (``inputs/*.png``; None for generation), batched like
    ``images``; ``samples``: (N, K, 3, H, W) when K > 1 (``images/<name>_<k>.png``), else None."""

    images: Tensor | list[Tensor]
    stats: list[dict[str, Any]]
    inputs: Tensor | list[Tensor] | None
    samples: Tensor | list[Tensor] | None = None


class Restorer:
    """A configured restorer for many calls: the model is loaded once.

    :meth:`restore` restores degraded photos as they are (``invert.py dataset=real``); :meth:`evaluate`
    degrades clean images with the task's operator, restores and scores them (``invert.py`` with a dataset of
    clean images).

    Args:
        task: a ``task/`` option (``deblur``, ``sr4``, ...); None = the configuration's default.
        overrides: ``invert.py`` override strings, e.g. ``["sampler.timesteps=50", "solver=picard"]``.
        device: torch device; None = ``cuda`` when available and ``trainer.accelerator`` allows it, else CPU.
    """

    def __init__(self, task: str | None = None, overrides: Sequence[str] | None = None,
                 device: str | torch.device | None = None):
        from deqir.lit import builders
        from deqir.lit.app import plain_config

        self._task, self._overrides = task, list(overrides or [])
        given_dataset = any(o.split("=", 1)[0].lstrip("+~") == "dataset" for o in self._overrides)
        # restore() reads dataset=real's options (boundary, sigma_y, ...) unless the overrides choose a dataset;
        # evaluate() and generate() compose the configuration as given (its dataset of clean images), on first use
        self.config = compose_config(task, self._overrides if given_dataset else ["dataset=real", *self._overrides])
        with open_dict(self.config):
            self.config["trainer"]["inference_mode"] = False
        self.plain = plain_config(self.config)
        self._eval_plain: dict[str, Any] | None = self.plain if given_dataset else None
        accelerator = str(self.plain["trainer"].get("accelerator", "auto"))
        if device is None:
            device = "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = builders.build_model(self.plain["model"])
        self._modules: dict[tuple, Any] = {}

    def restore(self, images: Tensor | Sequence[str | Path | Tensor] | str | Path) -> RestoreResult:
        """Restore degraded photos as they are: paths, an (N, C, h, w) tensor (float on [0, 1] or uint8
        0-255; C = 3, or 1 for colorization) or a list of (C, h, w) tensors / paths of any sizes.

        Each comes back at its restored size (deblur, inpainting, denoising: its own; srK: K times it;
        colorize: a colour image); photo ``i`` draws the noise of dataset index ``i`` (as ``invert.py
        dataset=real``'s i-th photo, sorted by path). Without a sigma_y, it is estimated per photo.
        """
        from deqir.lit import real

        plain = self.plain
        self._check_task(plain)
        task = real.real_task(plain["task"], plain["dataset"])
        plain = {**plain, "task": task}
        names = _names(images)
        photos = _as_photos(images, real.measurement_channels(task), plain["dataset"])
        groups = real.plan_groups(task, plain["dataset"], [(names[i], y, b) for i, (y, b) in enumerate(photos)])
        parts: dict[int, tuple[Any, int]] = {}  # photo -> (its batch's result, its position in the batch)
        for g in groups:
            module = self._module(real.group_plain(plain, g), g.shape, any_size=True)
            for idx, out in self._batches(module, g.indices, names, {"y": [photos[i][0] for i in g.indices]}):
                parts.update({i: (out, k) for k, i in enumerate(idx)})
        return _gather([parts[i] for i in range(len(names))])

    def evaluate(self, clean_images: Tensor | Sequence[str | Path]) -> RestoreResult:
        """Degrade clean images with the task's operator and measurement noise, restore and score them
        (PSNR, SSIM, LPIPS against them): ``invert.py``'s results for a dataset of these images.

        ``clean_images``: paths (read at their own size; one call's images share a size, a multiple of the
        model's downsampling factor) or an (N, 3, H, W) tensor on [0, 1]. Image ``i`` uses the noise of dataset
        index ``i`` (as the CLI's i-th image, sorted by path).
        """
        base = self.eval_plain
        self._check_task(base)
        batch = _as_batch(clean_images)
        shape = tuple(batch.shape[1:])
        plain = {**base, "dataset": {**base["dataset"], "size": [shape[1], shape[2]]}}
        module = self._module(plain, shape, any_size=False)
        names = _names(clean_images)
        outs = [o for _, o in self._batches(module, list(range(batch.shape[0])), names, {"image": list(batch)})]
        return _result(outs)

    def generate(self, num_images: int) -> RestoreResult:
        """``task=generate``: images 0 .. num_images - 1 of ``invert.py task=generate`` (same seeds), at
        ``dataset.size``."""
        plain = self.eval_plain
        if str(plain["task"]["name"]) != "generate":
            raise ValueError(f"generate() needs task='generate', this Restorer has task={plain['task']['name']!r}")
        from deqir.datasets.generation import GeneratedIndices
        from deqir.lit import builders

        ds = GeneratedIndices(num_images)
        shape = builders.image_shape(plain["dataset"])
        module = self._module(plain, shape, any_size=False)
        outs = [o for _, o in self._batches(module, list(range(num_images)), ds.names, {})]
        return _result(outs)

    __call__ = restore

    @property
    def eval_plain(self) -> dict[str, Any]:
        """The configuration of evaluate() / generate() as plain values: conf/ with the overrides as given."""
        if self._eval_plain is None:
            from deqir.lit.app import plain_config

            self._eval_plain = plain_config(_no_cli(compose_config(self._task, self._overrides)))
        return self._eval_plain

    def _check_task(self, plain: dict[str, Any]) -> None:
        if str(plain["task"]["name"]) == "generate":
            raise ValueError("task=generate has no images to restore: use deqir.generate(num_images, overrides)")

    def _batches(self, module, indices: list[int], names: list[str], data: dict[str, list[Tensor]]):
        """``predict_step`` over ``indices`` in batches of ``batch_size``: yields (the batch's indices, result);
        ``data`` holds one tensor per index (key ``image`` for clean images, ``y`` for photos)."""
        size = int(self.plain["batch_size"])
        for start in range(0, len(indices), size):
            idx = indices[start : start + size]
            item = {"index": torch.tensor(idx), "name": [names[i] for i in idx],
                    **{k: torch.stack(list(v[start : start + size])) for k, v in data.items()}}
            yield idx, module.predict_step(item, start // size)

    def _module(self, plain: dict[str, Any], shape: tuple[int, int, int], any_size: bool):
        from deqir.lit import builders
        from deqir.lit.app import build_module

        key = (shape, float(plain["task"]["sigma_y"]), plain["dataset"].get("name"))
        if key not in self._modules:
            op = builders.build_operator(plain["task"], shape)
            module = build_module(plain, op, self.model, shape, any_size=any_size).to(self.device)
            module.eval()
            module.on_predict_start()
            self._modules = {key: module}  # one at a time: a module holds its operator's buffers
        return self._modules[key]


def restore(images: Tensor | Sequence[str | Path | Tensor] | str | Path, task: str | None = None,
            overrides: Sequence[str] | None = None, device: str | torch.device | None = None) -> RestoreResult:
    """Restore degraded photos as they are, with ``invert.py dataset=real``'s configuration for ``task`` and
    ``overrides``. One-off form of :meth:`Restorer.restore` (a Restorer keeps the model loaded); docs/api.md."""
    return Restorer(task=task, overrides=overrides, device=device).restore(images)


def evaluate(clean_images: Tensor | Sequence[str | Path], task: str | None = None,
             overrides: Sequence[str] | None = None, device: str | torch.device | None = None) -> RestoreResult:
    """Degrade clean images with the task's operator, restore and score them (``invert.py`` on a dataset of
    them). One-off form of :meth:`Restorer.evaluate`; docs/api.md."""
    return Restorer(task=task, overrides=overrides, device=device).evaluate(clean_images)


def generate(num_images: int, overrides: Sequence[str] | None = None,
             device: str | torch.device | None = None) -> RestoreResult:
    """Unconditional generation with ``invert.py task=generate``'s configuration and ``overrides``:
    ``result.images`` (num_images, 3, H, W) on [0, 1], H = W = ``dataset.size`` (docs/api.md)."""
    return Restorer(task="generate", overrides=overrides, device=device).generate(num_images)


def _no_cli(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):
        cfg["trainer"]["inference_mode"] = False
    return cfg


def _gather(parts: list[tuple[Any, int]]) -> RestoreResult:
    """Per-photo results (the batch result, the photo's position in it) in call order; stacked when every
    image has one size, else lists."""
    def pick(attr: str):
        items = [getattr(o, attr)[k] if getattr(o, attr) is not None else None for o, k in parts]
        if any(t is None for t in items):
            return None
        return torch.stack(items) if len({tuple(t.shape) for t in items}) == 1 else items

    return RestoreResult(images=pick("restored"), stats=[o.rows[k] for o, k in parts], inputs=pick("inputs"),
                         samples=pick("samples"))


def _result(outs: list) -> RestoreResult:
    """Concatenate the per-batch results of ``predict_step``."""
    return RestoreResult(images=torch.cat([o.restored for o in outs]), stats=[row for o in outs for row in o.rows],
                         inputs=torch.cat([o.inputs for o in outs]) if outs[0].inputs is not None else None,
                         samples=torch.cat([o.samples for o in outs]) if outs[0].samples is not None else None)


def _as_float(x: Tensor, what: str = "images") -> Tensor:
    """float32 CPU copy on [0, 1] of an image tensor: uint8 as 0-255; NaN/inf and values outside [0, 1] refused."""
    if x.dtype == torch.uint8:
        return x.detach().cpu().float() / 255.0
    if not (x.is_floating_point()):
        raise ValueError(f"{what} must be float tensors on [0, 1] or uint8 (0-255), got dtype {x.dtype}; "
                         f"convert with x.float() / x.max()")
    x = x.detach().float().cpu()
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what}: {bad} NaN/inf value(s): replace them (e.g. torch.nan_to_num(x)) first")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"{what} must be on [0, 1] (got values from {float(x.min()):.3g} to {float(x.max()):.3g}); "
                         f"divide 0-255 floats by 255")
    return x


def _as_photos(images, channels: int, data: dict[str, Any]) -> list[tuple[Tensor, int]]:
    """(y (C, h, w) float on [0, 1], bit depth) per photo, from paths, a batch tensor or a list of both;
    colour tensors for a grey task (colorize) are averaged over their channels, as files are read."""
    from deqir.datasets.images import center_crop_resize, read_image, to_tensor
    from deqir.lit.real import is_16bit

    if isinstance(images, (str, Path)):
        images = [images]
    if isinstance(images, Tensor):
        if images.ndim not in (3, 4):
            raise ValueError(f"images must be (N, C, h, w) or (C, h, w), got shape {tuple(images.shape)}")
        images = list(images[None] if images.ndim == 3 else images)
    if len(images) == 0:
        raise ValueError("no images given")
    if data.get("size") is not None:
        raise ValueError("deqir.restore restores each photo at its own size; leave dataset.size unset (resize the "
                         "photos yourself)")
    out = []
    for k, img in enumerate(images):
        if isinstance(img, Tensor):
            y = _as_float(img, f"image {k}")
            if y.ndim != 3 or y.shape[0] not in (1, 3):
                raise ValueError(f"image {k} must be (C, h, w) with C = 3 (or 1 for colorization), got shape "
                                 f"{tuple(img.shape)}")
            if y.shape[0] != channels:
                y = y.mean(dim=0, keepdim=True) if channels == 1 else y.expand(3, -1, -1).contiguous()
            out.append((y, 8))
        else:
            arr = read_image(img, "gray" if channels == 1 else "rgb")
            arr = center_crop_resize(arr, None, bool(data.get("crop", False)))
            out.append((to_tensor(arr), 16 if is_16bit(img) else 8))
    return out


def _as_batch(images: Tensor | Sequence[str | Path]) -> Tensor:
    """(N, 3, H, W) float32 on [0, 1] from a tensor or from image paths (all of one size)."""
    if isinstance(images, Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) on [0, 1], got shape {tuple(images.shape)}")
        return _as_float(x)
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


def _names(images) -> list[str]:
    """Output names: the file stems of paths, ``00000``, ``00001``, ... for tensors."""
    if isinstance(images, (str, Path)):
        images = [images]
    if isinstance(images, Tensor):
        return [f"{i:05d}" for i in range(images.shape[0] if images.ndim == 4 else 1)]
    return [Path(p).stem if isinstance(p, (str, Path)) else f"{i:05d}" for i, p in enumerate(images)]
