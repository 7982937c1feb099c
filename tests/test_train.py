"""train.py on the CPU with a tiny model: learns, checkpoints, resumes, exports, loads in invert.py (docs/app.md, deqir/weights/README.md)."""
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
    """(step, loss) of every run into ``run_dir`` (a resumed run logs to the next csv/version_N)."""
    out = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            out += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    return out


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
    assert sorted((run / "csv").glob("version_*/metrics.csv"))[0].is_file()  # the first run's metrics are kept
    assert before <= {s for s, _ in losses(run)}
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


def test_train_has_its_own_config_tree():
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True, env=ENV,
                         cwd=str(REPO), timeout=120, check=True)
    groups = {ln.split(":")[0] for ln in res.stdout.split("== Config groups ==")[1].split("== Config ==")[0]
              .splitlines() if ": " in ln}
    assert groups == {"logger", "model", "train_data", "trainer"}
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf_train"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=gpu", "+trainer.profiler=simple"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_steps == 20000
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


@pytest.mark.slow
def test_unknown_trainer_key_is_an_error(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, "+trainer.no_such_arg=1",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=ENV, cwd=str(REPO),
                         timeout=300, check=False)
    assert res.returncode != 0 and "no_such_arg" in res.stderr
