"""Training photos for the embedded default prior, and a random multi-scale patch dataset.

Image files are read by :func:`deqir.datasets.images.read_image` (the one reader of the package).

Sources (licences in ``data/README.md``): colour photos inside the scikit-image and scikit-learn wheels
and, when the Debian package ``lomiri-wallpapers-16.04`` is installed, its 13 photographs. The demo /
evaluation images (chelsea, coffee, astronaut) are never used for training.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from deqir.datasets.images import IMAGE_SUFFIXES, read_image_uint8

SKIMAGE_TRAIN = ("rocket", "hubble_deep_field", "retina", "immunohistochemistry")
SKLEARN_TRAIN = ("china.jpg", "flower.jpg")
HELD_OUT = ("chelsea", "coffee", "astronaut")
LOMIRI_DIR = Path("/usr/share/backgrounds")
# The 13 photographs of lomiri-wallpapers-16.04 (analogpattern and umang are graphics, left out).
LOMIRI_PHOTOS = (
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
    "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
    "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg",
)


def load_default_photos(lomiri: str = "auto") -> list[tuple[str, np.ndarray]]:
    """(name, uint8 HxWx3) training photos. ``lomiri``: "auto" (use if installed), "require", "off"."""
    if lomiri not in ("auto", "require", "off"):
        raise ValueError(f"lomiri must be auto, require or off, got {lomiri!r}")
    try:
        from skimage import data as skdata
        from sklearn.datasets import load_sample_images
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the default photo set needs scikit-image and scikit-learn: pip install -e '.[train]'") from e
    photos = [(n, np.ascontiguousarray(getattr(skdata, n)()[..., :3])) for n in SKIMAGE_TRAIN]
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        if Path(fname).name in SKLEARN_TRAIN:
            photos.append((Path(fname).stem, np.ascontiguousarray(img)))
    present = [LOMIRI_DIR / f for f in LOMIRI_PHOTOS if (LOMIRI_DIR / f).is_file()]
    if lomiri == "require" and len(present) != len(LOMIRI_PHOTOS):
        raise FileNotFoundError("lomiri wallpapers missing: apt-get install -y lomiri-wallpapers-16.04")
    if lomiri != "off":
        photos += [(p.stem, read_image_uint8(p, max_side=1024)) for p in present]
    return photos


def load_folder_photos(folder: str | Path, max_side: int = 1024) -> list[tuple[str, np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return [(p.stem, read_image_uint8(p, max_side=max_side)) for p in files]


def build_pyramid(photos: Sequence[tuple[str, np.ndarray]], scales: Sequence[float], min_side: int) -> list[np.ndarray]:
    """Every photo at every scale (bicubic), keeping levels whose short side is >= ``min_side``."""
    levels = []
    for _, img in photos:
        im = Image.fromarray(img)
        for s in scales:
            w, h = round(im.width * s), round(im.height * s)
            if min(w, h) < min_side:
                continue
            levels.append(np.asarray(im.resize((w, h), Image.BICUBIC) if s != 1 else im, dtype=np.uint8))
    if not levels:
        raise ValueError(f"no pyramid level is at least {min_side} px")
    return levels


class PatchPyramidDataset(Dataset):
    """Random crops of a multi-scale photo pyramid with flips and 90-degree rotations.

    Item ``i`` of epoch ``e`` is a deterministic function of (seed, e, i): a (3, crop, crop) float32
    tensor on [-1, 1]. Levels are drawn proportionally to their area.
    """

    def __init__(
        self,
        photos: Sequence[tuple[str, np.ndarray]],
        crop: int = 32,
        scales: Sequence[float] = (1.0, 0.7, 0.5, 0.35, 0.25),
        length: int = 32_000,
        seed: int = 0,
        augment: bool = True,
    ):
        self.levels = build_pyramid(photos, scales, crop)
        area = np.array([lv.shape[0] * lv.shape[1] for lv in self.levels], dtype=np.float64)
        self.p = area / area.sum()
        self.crop, self.length, self.seed, self.augment = crop, length, seed, augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        lv = self.levels[rng.choice(len(self.levels), p=self.p)]
        h, w = lv.shape[:2]
        y0, x0 = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
        patch = lv[y0 : y0 + self.crop, x0 : x0 + self.crop]
        if self.augment:
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            patch = np.rot90(patch, k=int(rng.integers(0, 4)))
        x = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float() / 127.5 - 1.0
        return x
