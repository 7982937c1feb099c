"""Evaluation images for ``invert.py``: reading, centre-crop + resize, split lists, indexed datasets.

Every item carries its position in the *full* dataset (``index``), from which the per-image random
streams are derived, so a result never depends on the batch size, the rank or on which images were
already done in an earlier (resumed) run.

Image reading is strict and explains itself: missing, corrupt, truncated and oversized files raise
:class:`ImageReadError` (a ``ValueError``) naming the file; EXIF orientation is applied; grayscale, palette,
16-bit and opaque RGBA images are converted to RGB (16-bit PNG precision is kept until the 8-bit outputs);
images with transparent pixels are refused, because no background colour is right for every use. Limits
and formats: :mod:`deqir.datasets.decode`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from deqir.datasets import decode
from deqir.datasets.decode import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
ColorMode = Literal["rgb", "gray"]
#: Longest output name in bytes: leaves room for suffixes and temporary-file decorations under the usual
#: 255-byte file name limit. Longer names keep their start and get a hash of the full name.
MAX_NAME_BYTES = 180
#: A sub-folder holding these is an invert.py run directory: its images are outputs, never inputs.
RUN_DIR_MARKERS = ("run.json", "records")


# --------------------------------------------------------------------------------------------- reading
def read_image(path: str | Path, mode: ColorMode = "rgb", max_pixels: int | None = None) -> np.ndarray:
    """Read an image as float32 (H, W, 3) for ``rgb`` or (H, W, 1) for ``gray``, values on [0, 1], upright.

    Args:
        max_pixels: decode limit (None: ``$DEQIR_MAX_IMAGE_PIXELS`` or 50 MP); larger JPEGs are decoded at
            a reduced scale, other larger images are refused before their pixels are decoded.

    Raises:
        ImageReadError: missing/corrupt/truncated/oversized file, transparent pixels or an unsupported format.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image not found: {path}")
    if not path.is_file():
        raise ImageReadError(f"not an image file: {path}")
    limit = decode.max_pixels(max_pixels)
    try:
        with _open(path) as im:
            decode.fit_pixel_limit(im, path, limit)
            orientation = decode.exif_orientation(im)
            header = decode.png_header(path) if im.format == "PNG" else None
            if header is not None and header[2] == 16 and header[3] in (2, 4, 6):  # 16-bit colour / gray+alpha
                arr = _png16_to_float(decode.read_png16_color(path), path)
            else:
                decode.warn_if_truncated_precision(im, path)
                im.load()
                arr = _to_float(im, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {path}: not an image format PIL knows (corrupt file?)") from None
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"image {path} is too large to decode ({err}); shrink it first") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageReadError(f"cannot read image {path}: {reason} (truncated or corrupt file?)") from None
    arr = decode.apply_orientation(arr, orientation)
    if mode == "gray":
        return arr.mean(axis=2, keepdims=True) if arr.shape[2] == 3 else arr
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def read_image_uint8(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """:func:`read_image` as uint8 (H, W, 3) RGB (8-bit images come back exactly as stored), optionally
    shrunk (bicubic) so that its longer side is at most ``max_side``. The training photos are read with it."""
    arr = (read_image(path) * 255.0).round().astype(np.uint8)
    if max_side is None or max(arr.shape[:2]) <= max_side:
        return arr
    im = Image.fromarray(arr)
    s = max_side / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).copy()


def _open(path: Path) -> Image.Image:
    """``Image.open`` without PIL's decompression-bomb warning (the pixel limit is checked separately)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _png16_to_float(arr: np.ndarray, path: Path) -> np.ndarray:
    """uint16 (H, W, C) of a 16-bit PNG (C = 2 gray+alpha, 3 RGB, 4 RGBA) -> float32 on [0, 1], alpha checked."""
    if arr.shape[2] in (2, 4):
        if int(arr[..., -1].min()) < 65535:
            raise ImageReadError(f"image {path} has transparent pixels (16-bit with alpha); flatten it onto a "
                                 f"background first or save it without alpha")
        arr = arr[..., :-1]
    return arr.astype(np.float32) / 65535.0


def _to_float(im: Image.Image, path: Path) -> np.ndarray:
    """PIL image -> float32 (H, W, 1 or 3) on [0, 1]."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            raise ImageReadError(f"image {path} has transparent pixels ({mode}); flatten it onto a background first "
                                 f"(e.g. with PIL: Image.alpha_composite) or save it without alpha")
        im = im.convert("RGB" if mode.startswith(("RGB", "P")) else "L")
        mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return (np.asarray(im, dtype=np.float32) / 65535.0)[..., None]
    if mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageReadError(f"image {path} holds 32-bit integers outside the 16-bit range; "
                                 f"convert it to 8 or 16 bit")
        scale = 255.0 if arr.max() <= 255 else 65535.0
        return (arr / scale).astype(np.float32)[..., None]
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageReadError(f"image {path} is a float image with values outside [0, 1]; rescale it to [0, 1]")
        return arr[..., None]
    if mode in ("1", "L"):
        return (np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[..., None]
    if mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return np.asarray(im, dtype=np.float32) / 255.0


def center_crop_resize(arr: np.ndarray, size: int | Sequence[int] | None, crop: bool = True) -> np.ndarray:
    """Centre-crop to a square (if ``crop``) then resize to ``size`` (int or (H, W); None keeps the size).

    Bicubic resampling per channel in float (PIL mode "F", antialiased when shrinking), clipped to [0, 1].
    """
    if crop:
        h, w = arr.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        arr = arr[top : top + s, left : left + s]
    if size is None:
        return np.ascontiguousarray(arr)
    out_h, out_w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if (out_h, out_w) == arr.shape[:2]:
        return np.ascontiguousarray(arr)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F")
                        .resize((out_w, out_h), Image.Resampling.BICUBIC)) for c in range(arr.shape[2])]
    return np.clip(np.stack(chans, axis=2), 0.0, 1.0).astype(np.float32)


def to_tensor(arr: np.ndarray) -> Tensor:
    """(H, W, C) float array -> (C, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


# --------------------------------------------------------------------------------------------- listing
def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Sorted image files (by suffix, case-insensitive) under ``folder``.

    Raises:
        ImageReadError: the folder is missing, not a folder, unreadable or holds no images.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ImageReadError(f"image folder not found: {folder.absolute()}")
    if not folder.is_dir():
        raise ImageReadError(f"not a folder: {folder.absolute()} (dataset.path must be a directory of images)")
    try:
        entries = _walk(folder) if recursive else folder.iterdir()
        files = sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except PermissionError as err:
        raise ImageReadError(f"cannot read folder {folder.absolute()}: {err.strerror}") from None
    if not files:
        raise ImageReadError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder.absolute()}")
    return files


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is an ``invert.py`` run directory (its images are outputs)."""
    return all((folder / m).exists() for m in RUN_DIR_MARKERS)


def _walk(folder: Path):
    """Every file below ``folder`` (no symlinked folders), skipping run directories nested in it."""
    for top, dirs, files in os.walk(folder, onerror=_raise):
        dirs[:] = [d for d in dirs if not is_run_dir(Path(top) / d)]
        yield from (Path(top) / f for f in files)


def _raise(err: OSError) -> None:
    raise err


def image_names(paths: Sequence[Path], root: str | Path) -> list[str]:
    """Output names: the file stem, or the path relative to ``root`` joined by '__' when stems repeat.

    Names longer than :data:`MAX_NAME_BYTES` (UTF-8) keep their start plus ``~`` and 10 hex digits of a hash.
    """
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return [_short_name(n) for n in stems]
    root = Path(root)
    names = ["__".join(p.relative_to(root).with_suffix("").parts) if p.is_relative_to(root) else p.stem for p in paths]
    if len(set(names)) != len(names):
        names = [f"{i:05d}_{n}" for i, n in enumerate(names)]
    return [_short_name(n) for n in names]


def _short_name(name: str) -> str:
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    head = name.encode()[: MAX_NAME_BYTES - 11].decode(errors="ignore")
    return f"{head}~{digest}"


def apply_limit(paths: list[Path], limit: int | str | None) -> list[Path]:
    """The first ``limit`` paths (``dataset.limit``: a positive integer, or None for all)."""
    if limit is None:
        return paths
    if isinstance(limit, bool) or not isinstance(limit, (int, str)) or not str(limit).strip().isdigit() \
            or int(limit) < 1:
        raise ValueError(f"dataset.limit must be a positive integer (the number of images) or null for all, "
                         f"got {limit!r}")
    return paths[: int(limit)]


def read_split_list(list_path: str | Path, root: str | Path) -> list[Path]:
    """Image paths from a split list: one entry per line, ``relative/path[.ext] [label]`` (DDRM's format).

    An entry without a suffix gets the first suffix under which the file exists (DDRM appends ".jpeg";
    the ImageNet validation files end in ".JPEG").
    """
    list_path, root = Path(list_path).expanduser(), Path(root).expanduser()
    if not list_path.is_file():
        raise ImageReadError(f"split list not found: {list_path.absolute()}")
    out = []
    for line in list_path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel = line.split()[0]
        path = root / rel
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            found = [root / (rel + s) for s in (".JPEG", ".jpeg", ".jpg", ".png") if (root / (rel + s)).is_file()]
            path = found[0] if found else root / (rel + ".JPEG")
        out.append(path)
    if not out:
        raise ImageReadError(f"split list {list_path} is empty")
    return out


def select_subset(paths: list[Path], subset: str | int | None) -> list[Path]:
    """Apply a named subset rule to a sorted path list.

    ``None``/``"all"``: everything; ``"every_10th"``: every 10th image (DeqIR's ``subset_100`` on a 1k set);
    ``"ddrm_test"``: DDRM's CelebA-HQ test split (the last 10 % of a NumPy ``RandomState(2019)`` shuffle);
    an int ``n``: the first n.
    """
    if subset is None or subset == "all":
        return paths
    if isinstance(subset, int) and not isinstance(subset, bool):
        if subset < 1:
            raise ValueError(f"dataset.subset as a number must be a positive integer (the first n images), got "
                             f"{subset}")
        return paths[:subset]
    if subset == "every_10th":
        return paths[::10]
    if subset == "ddrm_test":
        order = np.arange(len(paths))
        np.random.RandomState(2019).shuffle(order)
        return [paths[i] for i in order[int(len(paths) * 0.9):]]
    raise ValueError(f"unknown dataset subset {subset!r}; valid: all, every_10th, ddrm_test or a number of images")


# --------------------------------------------------------------------------------------------- dataset
class IndexedImages(Dataset):
    """Images from files, centre-cropped and resized, each item tagged with its dataset index.

    Args:
        paths: image files, in dataset order.
        names: output names (unique), one per path.
        size: output size (int or (H, W)); None keeps each image's own (square-cropped) size.
        crop: centre-crop to a square before resizing.
        mode: ``rgb`` (3 channels) or ``gray`` (1 channel, for real colorization inputs).
        key: dict key of the image in each item (``"image"`` for ground truth, ``"y"`` for measurements).
        max_pixels: decode limit per file (None: ``$DEQIR_MAX_IMAGE_PIXELS`` or 50 MP).

    Items: ``{"index": int, "name": str, key: (C, H, W) float32 on [0, 1]}``.
    """

    def __init__(self, paths: Sequence[Path], names: Sequence[str], size: int | Sequence[int] | None = None,
                 crop: bool = True, mode: ColorMode = "rgb", key: str = "image", max_pixels: int | None = None):
        if len(paths) != len(names):
            raise ValueError("need one name per path")
        self.paths, self.names = list(paths), list(names)
        self.size, self.crop, self.mode, self.key, self.max_pixels = size, crop, mode, key, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def check_files(self) -> None:
        """Fail early (before anything is written) when a listed file is missing, too large or not an image."""
        limit = decode.max_pixels(self.max_pixels)
        for p in self.paths:
            if not p.is_file():
                raise ImageReadError(f"image not found: {p}")
            try:
                with _open(p) as im:
                    decode.fit_pixel_limit(im, p, limit)
                    im.verify()
            except ImageReadError:
                raise
            except Exception as err:  # PIL raises many types for bad headers
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ImageReadError(f"cannot read image {p}: {reason} (corrupt file?)") from None

    def __getitem__(self, i: int) -> dict:
        arr = center_crop_resize(read_image(self.paths[i], self.mode, self.max_pixels), self.size, self.crop)
        return {"index": int(i), "name": self.names[i], self.key: to_tensor(arr)}


class TodoSubset(Dataset):
    """The items of ``dataset`` at ``indices`` (keeping their original ``index`` field)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        return self.dataset[self.indices[k]]


def collate_items(items: list[dict]) -> dict:
    """Stack tensors, keep names as a list, indices as a long tensor."""
    out: dict = {"index": torch.tensor([it["index"] for it in items], dtype=torch.long),
                 "name": [it["name"] for it in items]}
    for key in ("image", "y"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    return out
