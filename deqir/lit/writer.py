"""Per-image outputs of ``invert.py``: the run directory layout and the prediction writer.

Layout of a run directory (every file written atomically: temp file + rename)::

    images/<name>.png     restored image (8-bit); with num_samples K > 1: images/<name>_<k>.png, k = 0..K-1,
    mean/<name>.png       (K > 1) the per-pixel mean of the samples
    std/<name>.png        (K > 1) their per-pixel standard deviation (mean over channels, x 4: white = 0.25)
    inputs/<name>.png     the measurement shown in image space (operator.y_to_image)
    targets/<name>.png    ground truth (when the dataset has it)
    records/<index>.json  the image's CSV row + per-round traces; written last, so its presence means done
    per_image.csv         finished rows, sorted by dataset index (rewritten by rank 0 as its images finish,
                          complete with every rank's rows at the end)
    run.json              the settings that determine the results (checked when a run is resumed), batch size

An image counts as done when its record and its restored PNG exist and the input file still has the content
hash the record holds; a killed run therefore loses at most the images in flight, a rerun into the same
directory skips the rest, and an input replaced under the same name is restored again (with a ``note:`` line).
Input images inside the run directory are refused: a run never reads its own outputs.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_only

from deqir.lit.distributed import gather_objects
from deqir.lit.restoration import BatchResult
from deqir.utils.images import atomic_write_bytes, save_png

#: CSV column order (columns without any value in the run are left out).
COLUMNS = ("name", "index", "psnr", "ssim", "lpips", "cons", "consistency", "rounds", "nfe", "residual", "seconds",
           "psnr_to_sequential", "status",
           # real inputs (deqir.lit.real): the noise level used and a consistency warning
           "sigma_y", "warning",
           # num_samples > 1 (deqir.lit.samples)
           "num_samples", "psnr_of_mean", "ssim_of_mean", "lpips_of_mean", "diversity_lpips", "sample_std",
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


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_dir_problem(argv: Sequence[str]) -> str | None:
    """Why the run directory named on an ``invert.py`` command line cannot be created, or None.

    Checked before Hydra creates the directory (its failure there is a traceback): the nearest existing
    ancestor of ``hydra.run.dir`` (default ``runs/``, the static part before any ``${...}``) must be a
    writable folder. Multirun, ``--help``, ``--cfg`` and ``--info`` command lines are not checked.
    """
    if any(a in ("-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info") for a in argv):
        return None
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.run.dir=")]
    target = given[-1] if given else "runs"
    static = Path(target.split("$", 1)[0] or ".").expanduser().absolute()
    probe = static
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return (f"cannot create the run directory {target}: {probe} is a file, not a folder; choose another "
                f"hydra.run.dir=...")
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"cannot create the run directory {target}: {probe} is not writable; choose a writable "
                f"hydra.run.dir=...")
    return None


def note(message: str) -> None:
    """One ``note:`` line on stderr (rank 0 only): things the user should know that are not errors."""
    if rank_zero_only.rank == 0:
        print(f"note: {message}", file=sys.stderr, flush=True)


class RunStore:
    """Files of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.images, self.inputs, self.targets = self.root / "images", self.root / "inputs", self.root / "targets"
        self.mean, self.std = self.root / "mean", self.root / "std"
        self.num_samples = 1  # restorations per image (num_samples)
        self.bits: dict[int, int] = {}  # dataset index -> bit depth of its PNG outputs (16 for 16-bit inputs)
        self.records_dir = self.root / "records"
        self.input_paths: list[Path] | None = None
        self.batch_size: int | None = None
        self._hashes: dict[int, str] = {}
        self._noted: set[str] = set()

    def prepare(self, inputs: Sequence[str | Path], batch_size: int | None = None) -> None:
        """Bind the dataset's input files (refused when inside the run directory) and the batch size.

        The inputs' content hashes go into each record, so a resumed run notices a replaced input.
        """
        root = self.root.resolve()
        paths = [Path(p) for p in inputs]
        inside = next((p for p in paths if p.resolve().is_relative_to(root)), None)
        if inside is not None:
            raise ValueError(f"input image {inside} lies inside the run directory {self.root}: a run must not read "
                             f"its own outputs; point dataset.path at a folder outside it, or choose another "
                             f"hydra.run.dir")
        self.input_paths, self.batch_size = paths, batch_size
        self._hashes.clear()

    def input_sha256(self, index: int) -> str | None:
        """Content hash of input ``index`` (None when no inputs are bound or the file is gone)."""
        if self.input_paths is None or not 0 <= index < len(self.input_paths):
            return None
        if index not in self._hashes:
            try:
                self._hashes[index] = file_sha256(self.input_paths[index])
            except FileNotFoundError:
                return None
        return self._hashes[index]

    # ---------------------------------------------------------------- resume
    def done_indices(self, names: list[str] | None = None) -> set[int]:
        """Dataset indices whose record and restored image both exist (and, given ``names``, whose record
        belongs to the image now at that index, so a folder that changed is not mixed up), and whose input
        still has the content hash in the record (a replaced input is redone, with one ``note:`` line)."""
        done, changed = set(), []
        for rec in self.load_records():
            i = int(rec["index"])
            if names is not None and (i >= len(names) or names[i] != rec["name"]):
                continue
            if not all(p.is_file() for p in self.restored_paths(str(rec["name"]))):
                continue
            old, now = rec.get("input_sha256"), self.input_sha256(i)
            if old is not None and now is not None and old != now:
                changed.append(str(rec["name"]))
                continue
            done.add(i)
        fresh = [n for n in changed if n not in self._noted]
        if fresh:
            self._noted.update(fresh)
            shown = ", ".join(fresh[:5]) + (f" and {len(fresh) - 5} more" if len(fresh) > 5 else "")
            note(f"{len(fresh)} input image(s) changed since they were restored in {self.root}: {shown}; "
                 f"restoring them again")
        return done

    def check_signature(self, signature: dict[str, Any], resume: bool) -> None:
        """Refuse to mix results of different settings in one directory (``resume=false`` starts over)."""
        path = self.root / "run.json"
        sig = _json_safe(json.loads(json.dumps(signature, default=str)))
        if resume and path.is_file() and self.records_dir.is_dir() and any(self.records_dir.glob("*.json")):
            previous = json.loads(path.read_text())
            old = previous.get("signature", {})
            old_bs = previous.get("batch_size")
            if old == sig and None not in (old_bs, self.batch_size) and old_bs != self.batch_size:
                note(f"resuming {self.root} with batch_size={self.batch_size}, its finished images used "
                     f"batch_size={old_bs}: results of different batch sizes can differ by float round-off "
                     f"(up to a few 8-bit levels on a few pixels, docs/app.md)")
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
        write_text(path, json.dumps({"signature": sig, "batch_size": self.batch_size}, indent=2, sort_keys=True))

    # ---------------------------------------------------------------- per image
    def restored_paths(self, name: str) -> list[Path]:
        """The restored PNG(s) of image ``name``: ``images/<name>.png``, or one per sample when K > 1."""
        if self.num_samples == 1:
            return [self.images / f"{name}.png"]
        return [self.images / f"{name}_{k}.png" for k in range(self.num_samples)]

    def save(self, row: dict[str, Any], trace: dict[str, list[float]], restored, inputs, target,
             samples=None, std=None) -> None:
        """Save one image's PNGs, then its record (the record marks it done). ``samples`` (K, C, H, W) and
        ``std`` (C, H, W) for K > 1, where ``restored`` is the samples' mean."""
        name, index = row["name"], int(row["index"])
        bits = self.bits.get(index, 8)
        try:
            if samples is None:
                save_png(restored, self.images / f"{name}.png", bits)
            else:
                for k, sample in enumerate(samples):
                    save_png(sample, self.images / f"{name}_{k}.png", bits)
                save_png(restored, self.mean / f"{name}.png", bits)
                save_png(std, self.std / f"{name}.png")
            if inputs is not None:
                save_png(inputs, self.inputs / f"{name}.png", bits)
            if target is not None:
                save_png(target, self.targets / f"{name}.png")
            digest = self.input_sha256(index)
            record = _json_safe({**row, **({"input_sha256": digest} if digest else {}), "trace": trace})
            write_text(self.records_dir / f"{index:06d}.json", json.dumps(record))
        except OSError as err:
            source = self.input_paths[index] if self.input_paths and index < len(self.input_paths) else name
            raise OSError(f"cannot write the results of input image {source} to {self.root}: "
                          f"{err.strerror or err}") from None

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
                            p.targets[b] if p.targets is not None else None,
                            samples=p.samples[b] if p.samples is not None else None,
                            std=p.std[b] if p.std is not None else None)
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
