"""A big blurry photo (1024 x 768 by default) restored on the CPU with the embedded default model: time and peak
memory under ``memory_limit`` (docs/app.md "Big photos").

The photo is the demo photos (data/samples) tiled to ``--width`` x ``--height`` and blurred outside deqir
(scipy.ndimage correlation with the deblur task's kernel, ``mode="reflect"``), saved as 8 bits; it is restored
by ``deqir.restore(task="deblur")`` with the default configuration (``solver=auto``: on a CPU the sequential
schedule) and each ``--memory-limit``. Columns: the UNet micro-batch the bound gave (``sampler.max_batch``),
the schedule, wall-clock seconds, the process's peak resident memory above its level before the call (RSS
sampled every 5 ms: model, operator, chain, allocator caches), and PSNR of input and restoration.

    python benchmarks/big_photo.py --json bench_results/big_photo.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, peak_memory, print_table, write_json  # noqa: E402
from benchmarks.real_degradations import _t, scipy_blur  # noqa: E402


def photo(width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): the demo photos tiled at their own resolution (mirrored in turn, so the tiles
    meet without seams of a different kind), cropped to the size; real detail, unlike an upscaled photo."""
    from deqir.datasets.images import read_image_uint8
    from deqir.lit.builders import samples_dir

    tiles = [read_image_uint8(p) for p in sorted(samples_dir().glob("*.png"))]
    th, tw = tiles[0].shape[:2]
    rows = []
    for r in range(-(-height // th)):
        row = [tiles[(r + c) % len(tiles)] for c in range(-(-width // tw))]
        row = [t[:, ::-1] if (r + c) % 2 else t for c, t in enumerate(row)]
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:height, :width])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    ap.add_argument("--memory-limit", nargs="+", default=["auto"], help="memory_limit values (GiB or auto)")
    ap.add_argument("--override", nargs="*", default=[], help="more invert.py overrides")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import deqir
    from deqir.metrics.fidelity import psnr
    from deqir.utils.images import quantize

    x8 = photo(args.width, args.height)
    clean, y = _t(x8), _t(scipy_blur("reflect")(x8))
    rows = []
    for limit in args.memory_limit:
        restorer = deqir.Restorer(task="deblur", overrides=[f"memory_limit={limit}", *args.override])
        cpu = torch.device("cpu")
        with peak_memory(cpu) as mem:
            start = time.perf_counter()
            res = restorer.restore(y)
            seconds = time.perf_counter() - start
        (module,) = restorer._modules.values()
        schedule = module.auto_choice.schedule if module.auto_choice else module.chain.sampler
        rows.append({"size": f"{args.width}x{args.height}", "memory_limit": limit,
                     "max_batch": module.chain.max_batch, "schedule": schedule,
                     "seconds": seconds, "peak_mb": mem["peak_mb"], "sigma_y": res.stats[0]["sigma_y"],
                     "psnr_input": float(psnr(y[None], clean[None])),
                     "psnr_restored": float(psnr(quantize(res.images.clamp(0, 1)), clean[None])),
                     "warning": res.stats[0].get("warning")})
    print_table(rows, [("size", "photo", ""), ("memory_limit", "memory_limit", ""), ("max_batch", "max_batch", ""),
                       ("schedule", "schedule", ""), ("seconds", "seconds", ".0f"), ("peak_mb", "peak MB", ".0f"),
                       ("psnr_input", "input PSNR", ".2f"), ("psnr_restored", "restored PSNR", ".2f")])
    payload = {"machine": machine_info(torch.device("cpu")), "settings": vars(args), "rows": rows}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
