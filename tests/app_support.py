"""Helpers shared by the invert.py tests (composition, in-process and CLI runs, image comparison)."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
#: A seconds-long configuration: random tiny UNet, 32 px, T = 4, two sample images, no perceptual metrics.
#: The solver is pinned: the default solver=auto times the machine, and these tests compare runs with each other.
TINY = ["model=tiny_ddpm", "model_dtype=model", "trainer=cpu", "logger=none", "eval=fast", "dataset.size=32",
        "dataset.limit=2", "sampler.timesteps=4", "solver=anderson", "solver.max_iter=4"]


def compose_cfg(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """Compose conf/invert.yaml with the hydra node (``run_dir`` becomes the runtime output dir)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF), job_name="invert"):
        cfg = compose("invert", overrides=overrides, return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.run.dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve
    return cfg


def run_inprocess(overrides: list[str], run_dir: Path) -> dict | None:
    """``run_invert`` in this process, as ``python invert.py OVERRIDES hydra.run.dir=RUN_DIR`` would."""
    from deqir.lit.app import run_invert

    cfg = compose_cfg(overrides, run_dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return run_invert(cfg)


def run_cli(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python invert.py ARGS`` in a subprocess (1 thread per process, W&B disabled)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
                **(env or {})}
    full_env.pop("DEQIR_TRACEBACK", None)
    return subprocess.run([sys.executable, str(REPO / "invert.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO))


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file (per_image.csv) as dicts of strings."""
    with open(path) as f:
        return list(csv.DictReader(f))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def error_lines(stderr: str) -> list[str]:
    """Non-empty stderr lines (split at carriage returns too) that are not warnings or progress output."""
    lines = (ln.strip() for ln in re.split(r"[\r\n]+", stderr))
    progress = re.compile(r"\|\s*\d+/\d+ \[")  # tqdm: "desc:  50%|#####     | 1/2 [00:01<00:01, ...]"
    return [ln for ln in lines if ln and not ln.lower().startswith("warn") and not progress.search(ln)]


def save_image(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def sample_folder(folder: Path, n: int = 2, size: int = 40) -> Path:
    """``n`` small smooth RGB images (deterministic) in ``folder``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], axis=2)
        img = ((base - base.min()) / (np.ptp(base) + 1e-9) * 200 + rng.integers(0, 40, base.shape)).clip(0, 255)
        save_image(folder / f"img{i}.png", img.astype(np.uint8))
    return folder
