"""Projected wall-clock of DEQ vs sequential sampling for the real checkpoints (a PROJECTION, not a run).

Inputs: the forward-time grid of ``benchmarks/models.py`` (ms per forward against batch size, per model and
dtype) and the rounds/work of ``benchmarks/deq_vs_sequential.py`` measured on the trained default model.
For each real architecture, dtype, T and solver setting:

    sequential  = T x ms(batch 1)
    DEQ         = sum over the measured rounds of ms(batch = slots evaluated that round)

where a round that evaluated w slots is costed at the measured forward time of the smallest measured batch
>= w (an upper bound between grid points). The round sizes come from the benchmark's per-round windows when
recorded, else rounds x ms(batch ceil(work x T / rounds)). The real checkpoints may need other round
counts than the small default model: the output says "projection" on every row.

    python benchmarks/projection.py --models models.json --rounds deq_vs_seq.json --json projection.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_json


def cost_at(grid: dict[int, float], batch: int) -> float | None:
    """ms for ``batch`` images: the smallest measured batch >= batch (None if the grid stops below it)."""
    fits = [b for b in sorted(grid) if b >= batch]
    return grid[fits[0]] if fits else None


def project(models: dict, rounds: dict, size: int | None = None) -> list[dict]:
    grids: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in models["rows"]:
        grids.setdefault((r["model"], r["dtype"], r["size"]), {})[int(r["batch"])] = float(r["ms"])
    out = []
    for (model, dtype, px), grid in sorted(grids.items()):
        if model == "default" or (size is not None and px != size) or 1 not in grid:
            continue
        for row in rounds["rows"]:
            T, n_rounds, work = int(row["T"]), int(row["rounds"]), float(row["work"])
            per_round = max(1, math.ceil(work * T / max(1, n_rounds)))
            c = cost_at(grid, per_round)
            if c is None:
                continue
            seq_ms = T * grid[1]
            deq_ms = n_rounds * c
            out.append({"model": model, "dtype": dtype, "size": px, "T": T, "task": row["task"],
                        "solver": row["solver"], "rounds": n_rounds, "work": round(work, 2),
                        "seq_s": seq_ms / 1e3, "deq_s": deq_ms / 1e3, "speedup": seq_ms / deq_ms,
                        "kind": "projection"})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, type=Path, help="JSON of benchmarks/models.py")
    ap.add_argument("--rounds", required=True, type=Path, help="JSON of benchmarks/deq_vs_sequential.py")
    ap.add_argument("--size", type=int, default=None, help="only this image size of the forward grid")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = project(json.loads(args.models.read_text()), json.loads(args.rounds.read_text()), args.size)
    print("PROJECTION: measured batched forward cost of each real architecture x rounds measured on the "
          "trained default model")
    table = print_table(rows, [("model", "model", ""), ("dtype", "dtype", ""), ("size", "px", ""), ("T", "T", ""),
                               ("task", "task", ""), ("solver", "setting", ""), ("rounds", "rounds", ""),
                               ("work", "work", ".2f"), ("seq_s", "sequential s", ".2f"),
                               ("deq_s", "DEQ s", ".2f"), ("speedup", "seq/DEQ", ".2f")])
    write_json(args.json, {"benchmark": "projection", "kind": "projection", "table": table, "rows": rows})


if __name__ == "__main__":
    main()
