"""Shared test fixtures: deterministic seeds, no W&B network, small thread counts."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny tensors: one thread is faster and immune to oversubscription on small shared CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    torch.manual_seed(0)
    yield


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
