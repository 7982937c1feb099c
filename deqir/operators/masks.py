"""Inpainting masks: generated deterministically from a seed, loaded from / saved to .png and .npy.

Masks are float64 (H, W) tensors with 1 = observed pixel, 0 = missing (the official convention,
docs/operators.md). The paper's "text" and "stripe" masks were never released (docs/operators.md); the
ones here are our own, defined below and reproducible bit for bit from their parameters.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MASK_TYPES = ("text", "stripes", "box", "random", "file")
MASK_FILE_TYPES = (".png", ".npy")

_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu "
    "fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt in culpa qui officia deserunt "
    "mollit anim id est laborum"
).split()


def make_mask(
    mask_type: str,
    height: int,
    width: int,
    *,
    seed: int = 0,
    missing_ratio: float = 0.5,
    box_size: int | list[int] | tuple[int, int] | None = None,
    stripe_width: int | None = None,
    mask_path: str | Path | None = None,
) -> Tensor:
    """Build an (H, W) mask (1 = observed).

    Args:
        mask_type: ``text`` (lorem-ipsum overlay, words drawn from ``seed``), ``stripes`` (horizontal
            missing lines of ``stripe_width`` rows every 2 ``stripe_width`` rows; default H // 64 rows, half
            of the rows missing), ``box`` (a centred missing box, ``box_size`` int or [h, w], default half
            the image), ``random`` (``missing_ratio`` of the pixels missing, chosen by ``seed``), ``file``
            (``mask_path``, .png: > 127 observed, or .npy: nonzero observed).
    """
    if mask_type == "text":
        return text_mask(height, width, seed=seed)
    if mask_type == "stripes":
        sw = max(1, height // 64) if stripe_width is None else int(stripe_width)
        if sw < 1:
            raise ValueError(f"stripe_width must be a positive integer, got {stripe_width!r}")
        rows = (torch.arange(height) // sw) % 2 == 0
        return rows[:, None].expand(height, width).to(torch.float64).clone()
    if mask_type == "box":
        bh, bw = _box(box_size, height, width)
        mask = torch.ones(height, width, dtype=torch.float64)
        top, left = (height - bh) // 2, (width - bw) // 2
        mask[top : top + bh, left : left + bw] = 0
        return mask
    if mask_type == "random":
        ratio = float(missing_ratio)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"missing_ratio must be in [0, 1) (the fraction of missing pixels), got {missing_ratio!r}")
        g = torch.Generator().manual_seed(int(seed))
        missing = torch.randperm(height * width, generator=g)[: round(ratio * height * width)]
        mask = torch.ones(height * width, dtype=torch.float64)
        mask[missing] = 0
        return mask.reshape(height, width)
    if mask_type == "file":
        if mask_path is None:
            raise ValueError("mask_type='file' needs mask_path (a .png or .npy file)")
        return load_mask(mask_path, (height, width))
    raise ValueError(f"unknown mask_type {mask_type!r}; valid mask types: {', '.join(MASK_TYPES)}")


def text_mask(height: int, width: int, seed: int = 0) -> Tensor:
    """Lorem-ipsum text overlay (missing = ink), rendered with Pillow's built-in bitmap font.

    Lines of words drawn from the lorem-ipsum vocabulary with ``seed``; glyphs are 11 font pixels high on a
    15-pixel line pitch, drawn bold (one extra pixel) and upscaled by round(min(H, W) / 128) (nearest).
    About 25 % of the pixels go missing (24.95 % at 256 x 256, seed 0). The bitmap font is embedded in
    Pillow, so the mask is the same on every machine.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    scale = max(1, round(min(height, width) / 128))
    ch, cw = -(-height // scale), -(-width // scale)
    canvas = Image.new("L", (cw, ch), 255)
    draw = ImageDraw.Draw(canvas)
    g = torch.Generator().manual_seed(int(seed))
    line_h, y = 15, 1 + int(torch.randint(0, 4, (1,), generator=g))
    while y < ch:
        x = 1 + int(torch.randint(0, 6, (1,), generator=g))
        text = ""
        while draw.textlength(text, font=font) < cw - x:  # the last word may run off the edge
            text += _LOREM[int(torch.randint(0, len(_LOREM), (1,), generator=g))] + " "
        for dx in (0, 1):  # bold: one extra pixel to the right
            draw.text((x + dx, y), text, fill=0, font=font)
        y += line_h
    ink = np.asarray(canvas, dtype=np.uint8) < 128
    ink = np.repeat(np.repeat(ink, scale, axis=0), scale, axis=1)[:height, :width]
    return torch.from_numpy((~ink).astype(np.float64))


def load_mask(path: str | Path, shape: tuple[int, int]) -> Tensor:
    """Read an (H, W) mask from .png (grayscale > 127 = observed) or .npy (nonzero = observed)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MASK_FILE_TYPES:
        raise ValueError(f"unsupported mask file {str(path)!r}; valid types: {', '.join(MASK_FILE_TYPES)}")
    if not path.is_file():
        raise ValueError(f"mask file not found: {str(path)!r}")
    if suffix == ".npy":
        arr = np.load(path)
        if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
            arr = arr[..., 0]
        mask = arr != 0
    else:
        from PIL import Image

        mask = np.asarray(Image.open(path).convert("L")) > 127
    return check_mask(torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float64), shape, source=str(path))


def save_mask(mask: Tensor, directory: str | Path, stem: str = "mask") -> list[Path]:
    """Write ``<stem>.npy`` (float 0/1, (H, W) or (C, H, W)) and ``<stem>.png`` (white = observed)."""
    from PIL import Image

    from deqir.utils.images import atomic_write_bytes

    directory = Path(directory)
    arr = mask.detach().double().cpu().numpy()

    def _save_npy(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    npy = atomic_write_bytes(directory / f"{stem}.npy", _save_npy)
    view = arr if arr.ndim == 2 else arr.min(axis=0)
    img = Image.fromarray((view > 0.5).astype(np.uint8) * 255)
    png = atomic_write_bytes(directory / f"{stem}.png", lambda tmp: img.save(tmp, format="PNG"))
    return [npy, png]


def check_mask(mask: Tensor, shape: tuple[int, ...], source: str = "mask") -> Tensor:
    """Validate a 0/1 mask of shape (H, W) (or (C, H, W) when ``shape`` has 3 entries)."""
    mask = torch.as_tensor(mask).to(torch.float64)
    ok = tuple(mask.shape) == tuple(shape[-2:]) or (len(shape) == 3 and tuple(mask.shape) == tuple(shape))
    if not ok:
        valid = f"({shape[-2]}, {shape[-1]})" + (f" or {tuple(shape)}" if len(shape) == 3 else "")
        raise ValueError(f"{source} has shape {tuple(mask.shape)}, but the image needs a mask of shape {valid}; "
                         f"resize the mask or build the operator for its size")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{source} must contain only 0 (missing) and 1 (observed)")
    return mask


def _box(box_size, height: int, width: int) -> tuple[int, int]:
    if box_size is None:
        return height // 2, width // 2
    if isinstance(box_size, (int, np.integer)) and not isinstance(box_size, bool):
        bh = bw = int(box_size)
    else:
        try:
            bh, bw = (int(v) for v in box_size)
        except (TypeError, ValueError):
            raise ValueError(f"box_size must be an int or [height, width], got {box_size!r}") from None
    if not (0 < bh <= height and 0 < bw <= width):
        raise ValueError(f"box_size {bh} x {bw} must be positive and fit the {height} x {width} image")
    return bh, bw
