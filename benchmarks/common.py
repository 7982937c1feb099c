"""Shared benchmark helpers: device/precision set-up, peak-memory sampling, tables and JSON output."""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that receives ``peak_mb``: the peak above the starting level while the block ran.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: resident set size sampled every 5 ms in a thread
    (what the process really held, including allocator caches).
    """
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    if not os.path.exists("/proc/self/statm"):
        yield out
        out["peak_mb"] = float("nan")
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["peak_mb"] = (peak[0] - base) / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format) -> a Markdown table (also printed)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {p}")


def eval_images(size: int, n: int | None = None, root: Path | None = None) -> tuple[list[str], torch.Tensor]:
    """(names, (N, 3, size, size) on [-1, 1]) of the evaluation set data/eval/<size>/*.png (data/eval_set.py)."""
    import numpy as np
    from PIL import Image

    folder = (root or Path(__file__).resolve().parents[1]) / "data" / "eval" / str(size)
    files = sorted(folder.glob("*.png"))[:n]
    if not files:
        raise FileNotFoundError(f"no images in {folder}: build the evaluation set with python data/eval_set.py")
    imgs = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
            for f in files]
    return [f.stem for f in files], torch.stack(imgs)
