"""Restoring a user's own degraded photos (``dataset=real``, ``deqir.restore``): docs/app.md, "Your own photos".

Each photo is restored at its own size: the image restored is the one whose measurement the photo is (deblur,
inpainting, denoising: the photo's size; srK: K times it; colorize: a colour image for a grey photo; the
valid-boundary blur: the photo plus the kernel's margin, cropped back when saved). Photos are grouped by that
shape and by their noise level sigma_y (one operator and one chain per group); both the command line and
the Python API plan their groups here, so they restore the same files identically.

sigma_y: ``dataset.sigma_y`` = a number (used for every photo), ``auto`` (estimated from each photo by the
wavelet rule of :func:`estimate_sigma` when ``task.sigma_y`` is 0, at least the quantisation noise of the
file's bit depth; a ``task.sigma_y`` above 0 is used as given) or null (``task.sigma_y``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deqir.datasets import decode

#: Tasks whose operator is a blur; for real photos they take ``dataset.boundary`` unless the task sets one.
BLUR_OPERATORS = ("deblur_gauss", "deblur_uniform", "deblur_aniso", "deblur_kernel")
SR_OPERATORS = ("sr_bicubic", "sr_avgpool")
#: sigma_y estimates are rounded to this many decimals (1e-4 on [0, 1] = 0.03 8-bit levels), so photos of one
#: source share a group.
SIGMA_DECIMALS = 4


@dataclass
class Group:
    """Photos restored with one operator and chain: image ``shape`` (C, H, W) and noise ``sigma_y``."""

    shape: tuple[int, int, int]
    sigma_y: float
    estimated: bool
    indices: list[int] = field(default_factory=list)


def real_task(task: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The task's config for real photos: blur tasks get ``dataset.boundary`` (default ``valid``) and
    ``dataset.zero_threshold`` unless they set ``params.boundary`` / ``params.zero_threshold`` themselves or
    reproduce the legacy operator (``legacy_svd``)."""
    from deqir.lit.builders import check_task_params

    check_task_params(task)
    params = dict(task.get("params") or {})
    boundary = data.get("boundary")
    blur = str(task["name"]) in BLUR_OPERATORS and not params.get("legacy_svd", False)
    if blur and boundary is not None and params.get("boundary") is None:
        params["boundary"] = str(boundary)
    if blur and data.get("zero_threshold") is not None and params.get("zero_threshold") is None:
        params["zero_threshold"] = float(data["zero_threshold"])
    return {**task, "params": params}


def measurement_channels(task: dict[str, Any]) -> int:
    """Channels of a photo for ``task``: 1 for colorization (read as grey), else 3."""
    return 1 if str(task["name"]) == "colorize" else 3


def image_shape_for(task: dict[str, Any], hw: tuple[int, int], name: str = "the photo") -> tuple[int, int, int]:
    """(3, H, W) of the image whose measurement under ``task`` is an h x w photo.

    Raises ``ValueError`` for a photo smaller than the operator's support, a restoration beyond the pixel
    limit, and tasks whose measurements are not images.
    """
    from deqir.operators.registry import blur_kernel

    op_name, params = str(task["name"]), dict(task.get("params") or {})
    h, w = int(hw[0]), int(hw[1])
    if op_name in ("cs_walsh_hadamard", "generate"):
        raise ValueError(f"task {op_name} does not measure an image: real photos need a task whose measurement "
                         f"is a picture (deblur, sr, inpaint, colorize, denoise)")
    if op_name in SR_OPERATORS:
        s = int(params.get("scale", 4))
        shape = (3, h * s, w * s)
    elif op_name in BLUR_OPERATORS:
        kernel = blur_kernel(op_name, **params)
        kh, kw = kernel.shape
        if h < kh or w < kw:
            raise ValueError(f"{name} ({h} x {w}) is smaller than the blur kernel ({kh} x {kw}): a photo must be at "
                             f"least the operator's support")
        shape = (3, h + kh - 1, w + kw - 1) if params.get("boundary") == "valid" else (3, h, w)
    else:
        shape = (3, h, w)
    limit = decode.max_pixels()
    if shape[1] * shape[2] > limit:
        raise ValueError(f"restoring {name} ({h} x {w}) with task {op_name} gives a {shape[1]} x {shape[2]} image "
                         f"({shape[1] * shape[2] / 1e6:.1f} MP), above the pixel limit {limit / 1e6:.0f} MP "
                         f"({decode.ENV_MAX_PIXELS}); crop the photo or use a smaller scale")
    return shape


def estimate_sigma(y: Tensor, bits: int = 8) -> float:
    """Noise std of a photo (C, H, W) on [0, 1]: Donoho and Johnstone's wavelet estimate, median(|HH|) / 0.6745
    over the finest diagonal Haar subband of every channel (the rule of scikit-image's ``estimate_sigma``,
    which needs PyWavelets), at least the quantisation noise of a ``bits``-bit file (1 / (2^bits - 1) / sqrt 12)."""
    x = y.detach().double().cpu()
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    floor = 1.0 / (2 ** int(bits) - 1) / math.sqrt(12.0)
    if h == 0 or w == 0:
        return round(floor, SIGMA_DECIMALS)
    x = x[..., :h, :w]
    hh = (x[..., 0::2, 0::2] - x[..., 1::2, 0::2] - x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) / 2
    est = float(hh.abs().flatten(1).median(dim=1).values.mean()) / 0.6745
    return round(max(est if math.isfinite(est) else 0.0, floor), SIGMA_DECIMALS)


def photo_sigma(task: dict[str, Any], data: dict[str, Any], y: Tensor, bits: int) -> tuple[float, bool]:
    """(sigma_y, estimated) of one photo (module docstring)."""
    given = data.get("sigma_y", None)
    if given is not None and given != "auto":
        try:
            value = float(given)
        except (TypeError, ValueError):
            raise ValueError(f"dataset.sigma_y must be a number >= 0, auto or null, got {given!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"dataset.sigma_y must be a number >= 0, auto or null, got {given!r}")
        return value, False
    if given == "auto" and float(task["sigma_y"]) == 0:
        return estimate_sigma(y, bits), True
    return float(task["sigma_y"]), False


def plan_groups(task: dict[str, Any], data: dict[str, Any], photos: list[tuple[str, Tensor, int]]) -> list[Group]:
    """Groups of the photos ``(name, y (C, h, w) on [0, 1], bits)``, in order of their first photo."""
    groups: dict[tuple, Group] = {}
    for i, (name, y, bits) in enumerate(photos):
        shape = image_shape_for(task, tuple(y.shape[-2:]), name)
        sigma, estimated = photo_sigma(task, data, y, bits)
        key = (shape, sigma)
        groups.setdefault(key, Group(shape, sigma, estimated)).indices.append(i)
    return list(groups.values())


def sigma_note(groups: list[Group], names: list[str]) -> str | None:
    """One line saying the sigma_y estimated for the photos (None when none was estimated)."""
    est = [(names[i], g.sigma_y) for g in groups if g.estimated for i in g.indices]
    if not est:
        return None
    shown = ", ".join(f"{n} {s:.4f}" for n, s in est[:6]) + (f" and {len(est) - 6} more" if len(est) > 6 else "")
    return (f"note: sigma_y estimated from the photo (dataset.sigma_y=auto, wavelet MAD estimate): {shown}; "
            f"set task.sigma_y=VALUE or dataset.sigma_y=VALUE to choose it")


def group_plain(plain: dict[str, Any], group: Group) -> dict[str, Any]:
    """``plain`` with the group's sigma_y and image size (what build_module reads)."""
    return {**plain, "task": {**plain["task"], "sigma_y": group.sigma_y},
            "dataset": {**plain["dataset"], "size": [group.shape[1], group.shape[2]]}}


def is_16bit(path) -> bool:
    """Whether an image file is a 16-bit PNG (its restoration is saved as 16-bit too)."""
    header = decode.png_header(path)
    return header is not None and header[2] == 16


def real_jobs(plain: dict[str, Any], store, log) -> tuple[Any, list[tuple]]:
    """invert.py's dataset=real: the photos (each at its own size unless dataset.size is set) and one job
    ``(plain, None, shape, indices)`` per group (the operator is built when it runs); says the estimated sigma_y in a note (stdout and ``log``).
    Sets ``plain["task"]`` to :func:`real_task`'s and ``store.bits`` (16-bit photos get 16-bit outputs)."""
    from pytorch_lightning.utilities import rank_zero_only

    from deqir.datasets.images import IndexedImages
    from deqir.lit import builders

    data = plain["dataset"]
    plain["task"] = task = real_task(plain["task"], data)
    paths, names = builders.dataset_paths(data)
    channels = measurement_channels(task)
    size = None
    if data.get("size") is not None:  # asked for: the photos are resized to the measurement of that image size
        m = builders.build_operator(task, builders.image_shape(data)).measurement_shape
        size = (m[1], m[2])
    dataset = IndexedImages(paths, names, size=size, crop=bool(data.get("crop", False)),
                            mode="gray" if channels == 1 else "rgb", key="y")
    dataset.check_files()
    bits = {i: 16 for i, p in enumerate(paths) if is_16bit(p)}
    store.bits = bits
    groups = plan_groups(task, data, ((names[i], dataset[i]["y"], bits.get(i, 8)) for i in range(len(paths))))
    line = sigma_note(groups, names)
    if line and rank_zero_only.rank == 0:
        print(line, flush=True)
        log.info(line)
    # the operator of each group is built when the group runs (None here): a big photo's takes tens of MB
    return dataset, [(group_plain(plain, g), None, g.shape, g.indices) for g in groups]
