"""Hydra callback: after ``python invert.py -m ...`` a table across the jobs (``multirun_summary.csv``)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from deqir.utils.images import atomic_write_bytes

#: metrics.json keys in the table, in this order (those no job has are left out).
COLUMNS = ("objective", "n_images", "psnr", "ssim", "lpips", "consistency", "psnr_to_sequential", "rounds", "nfe", "seconds",
           "converged_fraction", "fid")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory of a sweep: its overrides and its metrics.json means (if it finished)."""
    rows = []
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra" / "overrides.yaml").is_file()]
    for job in sorted(jobs, key=lambda p: (len(p.name), p.name)):
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(str(o) for o in overrides)}
        metrics = job / "metrics.json"
        if metrics.is_file():
            values = json.loads(metrics.read_text())
            row.update({k: values[k] for k in COLUMNS if k in values})
        else:
            row["status"] = "no metrics.json (failed or unfinished)"
        rows.append(row)
    return rows


def write_table(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    cols = ["job", "overrides", *(c for c in COLUMNS if any(c in r for r in rows))]
    if any("status" in r for r in rows):
        cols.append("status")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    path = sweep_dir / "multirun_summary.csv"
    return atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in ("objective", "psnr", "ssim", "lpips", "rounds", "nfe", "seconds") if any(k in r for r in rows)]
    head = ["job", "overrides", *keys]
    body = [[r["job"], r["overrides"], *(f"{r[k]:.4g}" if k in r else "-" for k in keys)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *body])


class MultirunSummary(Callback):
    """``hydra.callbacks.multirun_summary``: writes ``<sweep dir>/multirun_summary.csv`` and prints it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        if rows:
            path = write_table(sweep_dir, rows)
            print(f"{format_table(rows)}\n-> {path}", flush=True)
