"""Export the EMA weights of a train.py checkpoint to deqir's fp16 model file (what invert.py loads).

    python scripts/export_model.py runs/default_model/checkpoints/last.ckpt deqir/weights/default_ema_fp16.pt \
        --export-json runs/default_model/export.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqir.models.export import save_eps_model  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a Lightning checkpoint written by train.py")
    ap.add_argument("out", help="output .pt file")
    ap.add_argument("--export-json", default=None, help="train.py's export.json (training metadata) to embed")
    ap.add_argument("--fp32", action="store_true", help="keep float32 instead of float16")
    args = ap.parse_args(argv)
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    ema = {k[len("ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    if not ema:
        raise SystemExit(f"error: {args.checkpoint} has no ema.* weights (not a train.py checkpoint)")
    meta = {"steps": int(ckpt["global_step"])}
    if args.export_json:
        meta.update({k: v for k, v in json.loads(Path(args.export_json).read_text()).items() if k != "path"})
        meta["steps"] = int(ckpt["global_step"])
    for cb_state in ckpt.get("callbacks", {}).values():
        if isinstance(cb_state, dict) and "seconds" in cb_state:
            meta["train_seconds"] = round(float(cb_state["seconds"]), 1)
    path = save_eps_model(args.out, hp["arch"], dict(hp["model_config"]), ema, schedule=dict(hp["schedule"] or {}),
                          meta=meta, dtype=None if args.fp32 else torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MB, step {meta['steps']})")


if __name__ == "__main__":
    main()
