"""Timestep parallelism: one image's T chain slots evaluated across all ranks of a process group.

The DEQ map evaluates the ε-model on the flattened ``(B·T)`` slot batch once per solver round
(:class:`deqir.deq.joint_map.ChainMap`, ``eps_evaluator`` hook). :class:`TimestepParallelEvaluator` gives
rank ``r`` of ``W`` the contiguous slice ``[r·n, (r+1)·n)`` of that batch (``n = ceil(N / W)``, the batch
padded by repeating its last row so every rank has the same size), evaluates it and all-gathers the
ε predictions. Every rank then holds the same full ε tensor, so the solver arithmetic that follows is
identical on all ranks and they stay in lock step (same rounds, same stopping decisions) without any
other communication. Requires deterministic kernels on identical devices (the default on CPU; on CUDA
use ``trainer.deterministic=true`` if ranks could diverge).

Without an initialised process group (or with one rank) it is a plain chunked model call.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from deqir.deq.joint_map import evaluate_in_chunks
from deqir.diffusion.protocols import EpsModel


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TimestepParallelEvaluator:
    """``eps = evaluator(x, t)`` for (N, C, H, W) inputs, split across ranks and all-gathered.

    Args:
        model: the ε-model, ``eps = model(x, t)``.
        max_batch: largest number of images per model call on each rank (None = no limit).
        group: process group (default: the global one).

    Attributes:
        local_evals: image evaluations done on this rank (padding included).
        calls: number of collective calls (identical on all ranks).
    """

    def __init__(self, model: EpsModel, max_batch: int | None = None, group: dist.ProcessGroup | None = None):
        self.model, self.max_batch, self.group = model, max_batch, group
        self.local_evals = 0
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        rank, size = (dist.get_rank(self.group), dist.get_world_size(self.group)) if _initialised() else (0, 1)
        if size == 1:
            self.local_evals += x.shape[0]
            return evaluate_in_chunks(self.model, x, t, self.max_batch)
        n_total = x.shape[0]
        n = math.ceil(n_total / size)
        pad = n * size - n_total
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            t = torch.cat([t, t[-1:].expand(pad)])
        lo = rank * n
        local = evaluate_in_chunks(self.model, x[lo : lo + n], t[lo : lo + n], self.max_batch).contiguous()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=self.group)
        self.local_evals += n
        self.calls += 1
        return torch.cat(parts)[:n_total]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_objects(obj: object) -> list[object]:
    """``all_gather_object`` over the default group; ``[obj]`` without one."""
    if not _initialised() or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
