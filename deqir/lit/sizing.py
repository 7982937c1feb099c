"""The size images are restored at: ``dataset.size`` (resize, said once), or ``null`` = the images' own size,
centre-cropped to a multiple of the model's downsampling factor (docs/app.md, Datasets)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset


def own_size(path: Path, crop: bool) -> tuple[int, int]:
    """(H, W) of an image file as the dataset reads it (square-cropped when ``crop``); header only."""
    with Image.open(path) as im:
        w, h = im.size
    return (min(h, w), min(h, w)) if crop else (h, w)


def fit(side: int, stride: int) -> int:
    return side // stride * stride


class FitToShape(Dataset):
    """Items of ``dataset`` (read at their own size) centre-cropped to ``size`` when they are at most one
    stride larger, else resized (bicubic, antialiased) to it. Other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, size: tuple[int, int], stride: int):
        self.dataset, self.size, self.stride = dataset, tuple(size), int(stride)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        x = item["image"]
        (h, w), (H, W) = x.shape[-2:], self.size
        if (fit(h, self.stride), fit(w, self.stride)) == (H, W):
            top, left = (h - H) // 2, (w - W) // 2
            item["image"] = x[:, top : top + H, left : left + W].contiguous()
        else:
            item["image"] = torch.nn.functional.interpolate(x[None], size=(H, W), mode="bicubic", antialias=True,
                                                            align_corners=False)[0].clamp(0, 1)
        return item


def native(dataset, paths: Sequence[Path], crop: bool, stride: int) -> tuple[FitToShape, tuple[int, int], str]:
    """``dataset.size=null``: the first image's own size cut to the stride; returns the wrapped dataset, the
    size and a note line (saying how many images of other sizes are resized)."""
    sizes = [own_size(p, crop) for p in paths]
    h, w = sizes[0]
    H, W = fit(h, stride), fit(w, stride)
    if H < stride or W < stride:
        raise ValueError(f"image {paths[0]} ({h}x{w}) is smaller than the model's downsampling factor {stride}")
    dataset.size = None  # read every image at its own (square-cropped) size; FitToShape crops it
    other = sum(1 for s in sizes if (fit(s[0], stride), fit(s[1], stride)) != (H, W))
    note = f"note: restoring at {H}x{W}, the images' own size" + (
        f" (cropped to a multiple of {stride}, the model's downsampling factor)" if (H, W) != (h, w) else "")
    if other:
        note += f"; resizing {other} of {len(sizes)} images of other sizes to it (set dataset.size to choose)"
    return FitToShape(dataset, (H, W), stride), (H, W), note


def resize_note(paths: Sequence[Path], shape: tuple[int, int, int], crop: bool) -> str | None:
    """One line when an explicit ``dataset.size`` resizes images (None when every image already has it)."""
    sizes = [own_size(p, crop) for p in paths]
    resized = [s for s in sizes if s != tuple(shape[1:])]
    if not resized:
        return None
    seen = ", ".join(sorted({f"{h}x{w}" for h, w in resized})[:3])
    return (f"note: resizing {len(resized)} of {len(sizes)} images ({seen}) to {shape[1]}x{shape[2]} "
            f"(dataset.size; dataset.size=null keeps their own size)")
