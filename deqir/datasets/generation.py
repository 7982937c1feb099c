"""Items of unconditional generation (``task=generate``): an index and a name, no image.

Image ``i`` is named ``sample_<i:05d>`` and draws its chain noise from the per-image generator of ``i``
(docs/app.md), so a run of 64 images holds the 16 of a run of 16, and resume/DDP split them like images.
"""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset


class GeneratedIndices(Dataset):
    """``num_images`` items ``{"index": i, "name": "sample_<i:05d>"}`` (nothing to read from disk).

    Example:
        >>> ds = GeneratedIndices(3)
        >>> len(ds), ds[2]
        (3, {'index': 2, 'name': 'sample_00002'})
    """

    def __init__(self, num_images: int):
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"task.num_images must be a positive integer (how many images to generate), "
                             f"got {num_images!r}")
        self.names = [f"sample_{i:05d}" for i in range(num_images)]
        self.paths: list[Path] = []  # no input files (nothing to hash or check on resume)

    def __len__(self) -> int:
        return len(self.names)

    def check_files(self) -> None:
        """Nothing to check."""

    def __getitem__(self, i: int) -> dict:
        return {"index": int(i), "name": self.names[i]}
