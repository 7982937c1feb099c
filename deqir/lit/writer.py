"""Per-image outputs of ``invert.py``: the run directory layout and the prediction writer.

Layout of a run directory (every file written atomically: temp file + rename)::

    images/<name>.png     restored image (8-bit)
    inputs/<name>.png     the measurement shown in image space (operator.y_to_image)
    targets/<name>.png    ground truth (when the dataset has it)
    records/<index>.json  the image's CSV row + per-round traces; written last, so its presence means done
    per_image.csv         finished rows, sorted by dataset index (rewritten by rank 0 as its images finish,
                          complete with every rank's rows at the end)
    run.json              the settings that determine the results (checked when a run is resumed)

An image counts as done when its record and its restored PNG exist; a killed run therefore loses at most
the images in flight, and a rerun into the same directory skips the rest.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from deqir.lit.distributed import gather_objects
from deqir.lit.restoration import BatchResult
from deqir.utils.images import atomic_write_bytes, save_png

#: CSV column order (columns without any value in the run are left out).
COLUMNS = ("name", "index", "psnr", "ssim", "lpips", "cons", "consistency", "rounds", "nfe", "residual", "seconds",
           "psnr_to_sequential", "status",
           # mode=optimize_init | invert
           "psnr_init", "loss_init", "loss_best", "best_step", "optimize_status", "uses_oracle")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_text(path: Path, text: str) -> Path:
    """Atomic text write."""
    return atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


class RunStore:
    """Files of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.images, self.inputs, self.targets = self.root / "images", self.root / "inputs", self.root / "targets"
        self.records_dir = self.root / "records"

    # ---------------------------------------------------------------- resume
    def done_indices(self, names: list[str] | None = None) -> set[int]:
        """Dataset indices whose record and restored image both exist (and, given ``names``, whose record
        belongs to the image now at that index, so a folder that changed is not mixed up)."""
        done = set()
        for rec in self.load_records():
            i = int(rec["index"])
            if names is not None and (i >= len(names) or names[i] != rec["name"]):
                continue
            if (self.images / f"{rec['name']}.png").is_file():
                done.add(i)
        return done

    def check_signature(self, signature: dict[str, Any], resume: bool) -> None:
        """Refuse to mix results of different settings in one directory (``resume=false`` starts over)."""
        path = self.root / "run.json"
        sig = _json_safe(json.loads(json.dumps(signature, default=str)))
        if resume and path.is_file() and self.records_dir.is_dir() and any(self.records_dir.glob("*.json")):
            old = json.loads(path.read_text()).get("signature", {})
            if old != sig:
                diff = sorted(_diff_keys(old, sig))
                raise ValueError(f"{self.root} holds results of different settings (differs in: "
                                 f"{', '.join(diff[:6]) or '?'}); use another hydra.run.dir, or resume=false to "
                                 f"overwrite them")
        for tmp in self.root.rglob(".*.tmp"):  # left by atomic writes that a killed run cut short
            tmp.unlink(missing_ok=True)
        if not resume and self.records_dir.is_dir():
            for f in self.records_dir.glob("*.json"):
                f.unlink()
        write_text(path, json.dumps({"signature": sig}, indent=2, sort_keys=True))

    # ---------------------------------------------------------------- per image
    def save(self, row: dict[str, Any], trace: dict[str, list[float]], restored, inputs, target) -> None:
        """Save one image's PNGs, then its record (the record marks it done)."""
        name = row["name"]
        save_png(restored, self.images / f"{name}.png")
        if inputs is not None:
            save_png(inputs, self.inputs / f"{name}.png")
        if target is not None:
            save_png(target, self.targets / f"{name}.png")
        record = _json_safe({**row, "trace": trace})
        write_text(self.records_dir / f"{int(row['index']):06d}.json", json.dumps(record))

    def load_records(self) -> list[dict[str, Any]]:
        """All records on disk, sorted by dataset index (unreadable partial files are ignored)."""
        out = {}
        if self.records_dir.is_dir():
            for f in sorted(self.records_dir.glob("*.json")):
                try:
                    rec = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                out[int(rec["index"])] = rec
        return [out[k] for k in sorted(out)]

    def write_table(self, records: Iterable[dict[str, Any]]) -> Path:
        """per_image.csv of ``records`` (sorted by index; de-duplicated by index, the last one wins)."""
        by_index = {int(r["index"]): r for r in records}
        rows = [by_index[k] for k in sorted(by_index)]
        cols = [c for c in COLUMNS if any(c in r and r[c] is not None for r in rows)]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in cols])
        return write_text(self.root / "per_image.csv", buf.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class RestorationWriter(BasePredictionWriter):
    """Writes every image as soon as its batch is done and gathers the rows of all ranks at the end.

    Args:
        store: the run directory.
        rank_zero_only: only rank 0 writes (timestep parallelism: every rank holds the same results).
    """

    def __init__(self, store: RunStore, rank_zero_only: bool = False):
        super().__init__(write_interval="batch")
        self.store, self.rank_zero_only = store, rank_zero_only
        self.records: list[dict[str, Any]] = []
        self.gathered: list[dict[str, Any]] = []
        self._table: dict[int, dict[str, Any]] | None = None  # rank 0's view for the running per_image.csv

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: BatchResult,
                           batch_indices, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.rank_zero_only and trainer.global_rank != 0:
            return
        p = prediction
        for b, row in enumerate(p.rows):
            self.store.save(row, p.traces[b], p.restored[b], p.inputs[b] if p.inputs is not None else None,
                            p.targets[b] if p.targets is not None else None)
            self.records.append(_json_safe({**row, "trace": p.traces[b]}))
        if trainer.is_global_zero:
            if self._table is None:
                self._table = {int(r["index"]): r for r in self.store.load_records()}
            self._table.update({int(r["index"]): r for r in self.records[-len(p.rows):]})
            self.store.write_table(self._table.values())

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        parts = gather_objects(self.records)
        merged: dict[int, dict[str, Any]] = {}
        for part in parts:
            for rec in part:  # type: ignore[union-attr]
                merged[int(rec["index"])] = rec
        self.gathered = [merged[k] for k in sorted(merged)]
