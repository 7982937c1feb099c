"""train.py on the CPU with a tiny model: learns, checkpoints, resumes, exports, loads in invert.py (issue 7 §4)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
TINY = ["model=tiny_ddpm", "batch_size=8", "num_threads=1", "trainer.precision=32-true", "sample_every=0",
        "trainer.log_every_n_steps=1", "optim.warmup_steps=5", "optim.lr=2e-3", "train_data.scales=[0.5,0.25]"]


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, *extra, f"hydra.run.dir={run_dir}"],
                         capture_output=True, text=True, env=ENV, cwd=str(REPO), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("train")
    train(run, "trainer.max_steps=60", "checkpoint_every=30")
    return run


@pytest.mark.slow
def test_loss_decreases_and_checkpoint_is_written(trained):
    vals = [v for _, v in losses(trained)]
    assert len(vals) >= 50
    assert sum(vals[-10:]) / 10 < 0.8 * sum(vals[:10]) / 10
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 60


@pytest.mark.slow
def test_ema_differs_from_raw_weights(trained):
    sd = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    raw = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    ema = {k[len("ema."):]: v for k, v in sd.items() if k.startswith("ema.")}
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


@pytest.mark.slow
def test_resume_continues_at_the_same_step(trained, tmp_path):
    run = tmp_path / "resumed"
    import shutil

    shutil.copytree(trained, run)
    before = {s for s, _ in losses(run)}
    train(run, "trainer.max_steps=70", "checkpoint_every=30")
    after = [s for s, _ in losses(run) if s not in before]
    assert after and min(after) >= 60  # no step is trained twice
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 70


@pytest.mark.slow
@pytest.mark.parametrize("which", ["export", "lightning"])
def test_trained_weights_load_in_invert(trained, tmp_path, which):
    ckpt = trained / "model_ema_fp16.pt" if which == "export" else trained / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "inv"
    res = subprocess.run([sys.executable, str(REPO / "invert.py"), "debug=tiny", f"model.ckpt_path={ckpt}",
                          f"hydra.run.dir={out}"], capture_output=True, text=True, env=ENV, cwd=str(REPO), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "metrics.json").is_file()
