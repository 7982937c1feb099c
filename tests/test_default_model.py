"""The committed embedded default model: loads strictly and really denoises held-out images (deqir/weights/README.md)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from deqir.models.loading import load_eps_model, packaged_default_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.model_card import held_out_images, x0_prediction_psnr  # noqa: E402


def test_default_weights_ship_and_load_strictly():
    path = packaged_default_path()
    assert path.is_file(), f"missing packaged weights {path}"
    assert path.stat().st_size < 3 * 2**20  # fp16, about 2 MB
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "deqir-eps-model" and payload["arch"] == "ddpm"
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    model = load_eps_model(arch="ddpm", config=payload["config"], ckpt_path=None, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 1_046_883


def test_x0_prediction_beats_the_noisy_input_by_5db():
    model = load_eps_model(arch="ddpm", config=None, ckpt_path=None)
    x = held_out_images(64)[:1]  # chelsea, never seen in training
    noisy, pred = x0_prediction_psnr(model, x, t=50)
    assert pred >= noisy + 5.0, (noisy, pred)
