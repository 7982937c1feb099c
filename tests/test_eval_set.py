"""data/eval_set.py: the evaluation set's definition (sources, crops, manifest checks); building it needs Debian's
packages and is what benchmarks do, not the suite."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("eval_set", REPO / "data" / "eval_set.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sources_are_many_distinct_photos_none_of_them_training_photos():
    mod = _module()
    names = [n for n, _, _ in mod.SOURCES]
    assert len(names) >= 24 and len(set(names)) == len(names)
    manifest = json.loads((REPO / "data" / "eval_manifest.json").read_text())
    assert sorted(manifest["images"]) == sorted(names)
    assert all(len(e["source_sha256"]) == 64 and set(e["outputs"]) == {"128", "256"} for e in manifest["images"].values())
    training = (REPO / "deqir" / "weights" / "README.md").read_text()
    assert "lomiri-wallpapers" in training and not any(pkg in training for _, pkg, _ in mod.SOURCES)


def test_square_crop_is_centred_and_sized():
    mod = _module()
    arr = np.zeros((60, 100, 3), np.uint8)
    arr[:, 20:80] = 255  # the centred 60 x 60 square is white
    out = np.asarray(mod.square_crop(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3) and out.min() >= 250


def test_check_names_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="missing or changed .* run python data/eval_set.py"):
        _module().build(tmp_path, check_only=True)
