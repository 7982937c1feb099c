"""The memory bound of a run (``memory_limit``, docs/app.md "Big photos"): how many images one UNet call may take.

The DEQ evaluates the ε-model on T slots per image per round, the sequential chain on one; both go through
``sampler.max_batch`` micro-batches (results do not depend on it). When ``sampler.max_batch`` is null, the
largest batch is derived from ``memory_limit`` (GiB, or ``auto`` = half the free memory: MemAvailable on the
CPU, the device's free memory on CUDA) and an estimate of one call's activations: 20 x ch x ch_mult[0] float32
values per pixel of the (stride-padded) image, for a UNet whose first level has ch x ch_mult[0] channels. That
bound is calibrated on the embedded default (ch = 32: measured 350-560 values per pixel at 128-256 px, CPU, no
autograd; the bound says 640).
"""
from __future__ import annotations

import math
from typing import Any

import torch

#: float32 activation values per pixel and first-level channel that one UNet call holds at most (see above)
VALUES_PER_PIXEL_CHANNEL = 20


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CPU: MemAvailable of /proc/meminfo; None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def limit_bytes(value: Any, device: torch.device) -> int | None:
    """``memory_limit`` in bytes: a positive number of GiB, ``auto`` (half the free memory) or null (no bound)."""
    if value is None:
        return None
    if value == "auto":
        free = free_bytes(device)
        return None if free is None else free // 2
    try:
        gib = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"memory_limit must be a number of GiB, auto or null, got {value!r}") from None
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"memory_limit must be a positive number of GiB, auto or null, got {value!r}")
    return int(gib * 2**30)


def call_bytes(model_cfg: dict[str, Any], h: int, w: int) -> int | None:
    """Estimated bytes of one UNet call on one h x w image (None when the architecture's widths are unknown)."""
    cfg = (model_cfg or {}).get("config") or {}
    width = cfg.get("ch") or cfg.get("model_channels")
    mult = cfg.get("ch_mult") or cfg.get("channel_mult") or [1]
    if width is None and cfg.get("block_out_channels"):
        width, mult = cfg["block_out_channels"][0], [1]
    if width is None:
        return None
    return 4 * VALUES_PER_PIXEL_CHANNEL * int(width) * int(mult[0]) * int(h) * int(w)


def max_batch_for(limit: int | None, per_image: int | None, largest: int) -> int | None:
    """The ``sampler.max_batch`` that keeps a call under ``limit``; None when the bound does not bind (or is
    unknown). At least 1: one image per call is the floor."""
    if limit is None or per_image is None or per_image * largest <= limit:
        return None
    return max(1, int(limit // per_image))


def bounded_sampler(plain: dict[str, Any], sampler: dict[str, Any], shape: tuple[int, int, int],
                    stride: int) -> dict[str, Any]:
    """``sampler.max_batch`` null: the largest UNet batch under ``memory_limit`` (module docstring), set only
    where it binds (results do not depend on it); one ``note:`` line when even one image exceeds the bound."""
    from deqir.lit.writer import note

    if sampler.get("max_batch") is not None:
        return sampler
    accelerator = str(plain["trainer"].get("accelerator", "auto"))
    device = torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")
    limit = limit_bytes(plain.get("memory_limit", "auto"), device)
    h, w = -(-shape[1] // stride) * stride, -(-shape[2] // stride) * stride
    per_image = call_bytes(plain["model"], h, w)
    largest = int(sampler["timesteps"]) * int(plain.get("batch_size", 1)) * int(plain.get("num_samples", 1))
    cap = max_batch_for(limit, per_image, largest)
    if cap is None:
        return sampler
    if per_image > limit:
        note(f"one UNet call on a {h}x{w} image needs about {per_image / 2**20:.0f} MiB, above memory_limit "
             f"({limit / 2**20:.0f} MiB): running one image per call")
    return {**sampler, "max_batch": cap}
