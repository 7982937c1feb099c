"""Datamodule for ``invert.py``: the images still to restore, as indexed items.

Resume: ``done()`` (the writer's finished dataset indices) is read once on rank 0 in :meth:`setup` and
broadcast, so every rank sees the same to-do list even while other ranks start writing. Images are
sharded by Lightning's ``UnrepeatedDistributedSampler`` (no duplicates, no padding) unless the run is
timestep-parallel, where every rank must see the same images (``Trainer(use_distributed_sampler=False)``).
"""
from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from deqir.datasets.images import TodoSubset, collate_items


class RestorationDataModule(pl.LightningDataModule):
    """Serve ``dataset`` minus the indices ``done()`` reports.

    Args:
        dataset: items ``{"index", "name", "image" | "y"}`` (see :mod:`deqir.datasets.images`).
        batch_size: images per ``predict_step``.
        num_workers: DataLoader workers.
        done: callable returning the set of dataset indices already finished (resume).
        sharded: whether ranks split the images (False for timestep parallelism).
        indices: only these dataset indices (None: all), e.g. one group of photos of one size.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, num_workers: int = 0,
                 done: Callable[[], set[int]] | None = None, sharded: bool = True,
                 indices: list[int] | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.done_fn, self.sharded, self.indices = done, sharded, indices
        self.todo: list[int] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.todo is not None:
            return
        todo = self.compute_todo()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            todo = trainer.strategy.broadcast(todo, src=0)
        self.todo = todo

    def compute_todo(self) -> list[int]:
        """Dataset indices not finished yet, ascending."""
        done = self.done_fn() if self.done_fn is not None else set()
        indices = range(len(self.dataset)) if self.indices is None else sorted(self.indices)
        return [i for i in indices if i not in done]

    def local_count(self, rank: int, world_size: int) -> int:
        """How many images rank ``rank`` will process (UnrepeatedDistributedSampler: indices rank::world)."""
        n = len(self.todo if self.todo is not None else self.compute_todo())
        if not self.sharded or world_size == 1:
            return n
        return len(range(rank, n, world_size))

    def predict_dataloader(self) -> DataLoader:
        if self.todo is None:
            self.setup("predict")
        return DataLoader(TodoSubset(self.dataset, self.todo), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_items,
                          persistent_workers=False)
