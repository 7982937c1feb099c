"""Numbers and figures for the embedded default model's card (deqir/weights/README.md).

    python scripts/model_card.py --run runs/default_model --out deqir/weights

Writes ``model_card.json`` (held-out denoising PSNR of the one-step x0 prediction at t = 50 / 150 / 300,
training metadata), ``loss_curve.png`` (from the CSV log) and copies the last EMA sample grid.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deqir.diffusion.schedule import NoiseSchedule  # noqa: E402
from deqir.models.loading import load_eps_model, packaged_default_path  # noqa: E402


def held_out_images(size: int = 128) -> torch.Tensor:
    from PIL import Image

    out = []
    for name in ("chelsea", "coffee", "astronaut"):
        im = Image.open(ROOT / "data/samples" / f"{name}.png").convert("RGB").resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


@torch.no_grad()
def x0_prediction_psnr(model, x: torch.Tensor, t: int, seed: int = 0) -> tuple[float, float]:
    """(PSNR of the noisy x_t rescaled to x0, PSNR of the model's x0 prediction), dB on [0, 1], mean over images."""
    sched = NoiseSchedule.create(**model.schedule)
    a = float(sched.alpha_bar(t))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    x_t = a**0.5 * x + (1 - a) ** 0.5 * noise
    eps = model(x_t, torch.full((x.shape[0],), t))
    x0 = (x_t - (1 - a) ** 0.5 * eps) / a**0.5

    def p(img):
        mse = (((img.clamp(-1, 1) - x) / 2) ** 2).flatten(1).mean(1)
        return float((10 * torch.log10(1 / mse)).mean())

    return p(x_t / a**0.5), p(x0)


def loss_curve(csv_path: Path, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                steps.append(int(row["step"]))
                losses.append(float(row["train/loss"]))
    steps, losses = np.array(steps), np.array(losses)
    k = 20
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(steps, losses, alpha=0.3, label="loss (logged every 50 steps)")
    ax.plot(steps[k - 1 :], smooth, label=f"moving average ({k})")
    ax.set(xlabel="step", ylabel="eps MSE", yscale="log", title="default model: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"final_loss_avg": float(smooth[-1]), "first_loss": float(losses[0])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/default_model", help="the train.py run directory")
    ap.add_argument("--out", default=str(packaged_default_path().parent))
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args(argv)
    out, run = Path(args.out), Path(args.run)
    model = load_eps_model(arch="ddpm", config=None, ckpt_path=str(packaged_default_path()))
    x = held_out_images(args.size)
    card = {"denoising_psnr_db": {}, "eval": f"chelsea, coffee, astronaut at {args.size}x{args.size} (held out)"}
    for t in (50, 150, 300):
        noisy, pred = x0_prediction_psnr(model, x, t)
        card["denoising_psnr_db"][str(t)] = {"noisy": round(noisy, 2), "x0_prediction": round(pred, 2)}
    payload = torch.load(packaged_default_path(), map_location="cpu", weights_only=True)
    card["training"] = payload.get("meta", {})
    if (run / "csv" / "metrics.csv").is_file():
        card["loss"] = loss_curve(run / "csv" / "metrics.csv", out / "loss_curve.png")
    grids = sorted((run / "samples").glob("step_*.png"))
    if grids:
        shutil.copy(grids[-1], out / "samples.png")
        card["samples"] = grids[-1].name
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
