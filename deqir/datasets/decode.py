"""Decoding one image file safely: a pixel limit read from the header, EXIF orientation, 16-bit colour PNGs.

* **Pixel limit.** The header is read before any pixel is decoded. Images above the limit
  (:data:`DEFAULT_MAX_PIXELS`, or ``$DEQIR_MAX_IMAGE_PIXELS``) are refused, except JPEGs, which are decoded
  at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL ``draft``) to fit under it. A decoded image costs
  about 20 bytes per pixel on its way to a float array, so the default bounds that at about 1 GB.
* **EXIF orientation** (tag 0x0112, written by cameras and phones) is applied as image viewers do.
* **16-bit colour PNGs** are decoded with ``torchvision.io.decode_png`` (PIL reduces them to 8 bits);
  16-bit grayscale is read by PIL at full precision. Other 16-bit colour formats (TIFF) are read at 8 bits,
  with an :class:`ImagePrecisionWarning` saying so.
"""
from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 50_000_000
ENV_MAX_PIXELS = "DEQIR_MAX_IMAGE_PIXELS"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112
_TIFF_BITS_PER_SAMPLE = 258


class ImageReadError(ValueError):
    """An input image cannot be used (missing, corrupt, truncated, transparent, too large, unsupported)."""


class ImagePrecisionWarning(UserWarning):
    """An image is read with less precision than its file holds."""


def max_pixels(limit: int | None = None) -> int:
    """The decode limit in pixels: ``limit``, else ``$DEQIR_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    if limit is None:
        raw = os.environ.get(ENV_MAX_PIXELS)
        if raw is None:
            return DEFAULT_MAX_PIXELS
        try:
            limit = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_MAX_PIXELS} must be a positive integer (pixels), got {raw!r}") from None
    if int(limit) < 1:
        raise ValueError(f"the image pixel limit must be a positive integer, got {limit}")
    return int(limit)


def png_header(path: str | Path) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, or None for other files."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    width, height, depth, color = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, color


def fit_pixel_limit(im: Image.Image, path: Path, limit: int) -> None:
    """Refuse ``im`` (opened, not decoded) above ``limit`` pixels, or make a JPEG decode at a reduced scale."""
    w, h = im.size
    if w * h <= limit:
        return
    if im.format == "JPEG":
        for scale in (2, 4, 8):
            if -(-w // scale) * -(-h // scale) <= limit:
                im.draft(im.mode, (-(-w // scale), -(-h // scale)))
                return
    raise ImageReadError(f"image {path} is {w}x{h} ({w * h / 1e6:.0f} MP), more than the {limit / 1e6:g} MP deqir "
                     f"decodes (about 20 bytes per pixel in memory); shrink it first, or raise the limit with "
                     f"{ENV_MAX_PIXELS}={w * h}")


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when absent or unreadable."""
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, TypeError, SyntaxError):  # a damaged EXIF block: show the pixels as stored
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored (H, W, C) pixels upright for EXIF ``orientation`` (PIL ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def read_png16_color(path: Path) -> np.ndarray:
    """A 16-bit colour PNG (RGB, RGBA, gray+alpha) as uint16 (H, W, C) with all its channels."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    try:
        t = decode_png(read_file(str(path)), ImageReadMode.UNCHANGED)
    except RuntimeError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageReadError(f"cannot read image {path}: {reason} (truncated or corrupt file?)") from None
    return t.permute(1, 2, 0).numpy().astype(np.uint16, copy=False)


def warn_if_truncated_precision(im: Image.Image, path: Path) -> None:
    """Say so when PIL reads a 16-bit colour TIFF at 8 bits per channel."""
    if im.format != "TIFF":
        return
    bits = im.tag_v2.get(_TIFF_BITS_PER_SAMPLE) if hasattr(im, "tag_v2") else None
    bits = bits if isinstance(bits, tuple) else (bits,)
    if len(bits) >= 3 and max(int(b or 0) for b in bits) > 8 and im.mode in ("RGB", "RGBA"):
        warnings.warn(f"{path} has {max(bits)}-bit colour channels; deqir reads colour TIFFs at 8 bits per "
                      f"channel (save it as a 16-bit PNG to keep the precision)", ImagePrecisionWarning,
                      stacklevel=3)
