"""Image conversion and atomic PNG writing (file I/O lives here, never in the numerics)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) on [0, 1] -> uint8 (H, W, C) (C = 1 or 3), rounded as torchvision's save_image."""
    if x.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(x.shape)}")
    arr = (x.detach().float().cpu().clamp(0, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    arr = arr.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[2] == 1 else arr


def quantize(x: Tensor) -> Tensor:
    """What a saved 8-bit PNG holds, back on [0, 1] (metrics are computed on this)."""
    return torch.floor(x.clamp(0, 1) * 255 + 0.5) / 255


def atomic_write_bytes(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``; a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_png(x: Tensor, path: str | Path, bits: int = 8) -> Path:
    """Save a (C, H, W) [0, 1] tensor as an 8-bit PNG (or 16-bit with ``bits=16``), atomically."""
    if bits == 16:
        return atomic_write_bytes(path, lambda tmp: Path(tmp).write_bytes(png16_bytes(x)))
    if bits != 8:
        raise ValueError(f"PNG outputs are 8 or 16 bit, got bits={bits}")
    img = Image.fromarray(to_uint8(x))
    return atomic_write_bytes(path, lambda tmp: img.save(tmp, format="PNG"))


def png16_bytes(x: Tensor) -> bytes:
    """A 16-bit PNG (grey for C = 1, RGB for C = 3) of a (C, H, W) [0, 1] tensor (PIL writes 16-bit grey only)."""
    import struct
    import zlib

    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a (1 or 3, H, W) image, got shape {tuple(x.shape)}")
    arr = (x.detach().double().cpu().clamp(0, 1) * 65535 + 0.5).floor().to(torch.int32).permute(1, 2, 0).numpy()
    h, w, c = arr.shape
    rows = arr.astype(">u2").reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def grid(images: Sequence[Tensor] | Tensor, nrow: int, pad: int = 2, value: float = 1.0) -> Tensor:
    """Tile (N, C, H, W) [0, 1] images into one (C, H', W') image, row-major."""
    images = torch.stack(list(images)) if not isinstance(images, Tensor) else images
    n, c, h, w = images.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    out = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), value, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return out
