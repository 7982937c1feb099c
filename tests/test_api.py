"""The Python API (deqir.restore / deqir.Restorer) against invert.py, and the docs/api.md example."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from app_support import REPO, TINY, pixels, run_inprocess

import deqir

# The CLI's tiny run; the API gets the same overrides minus the dataset's (it reads the given images).
API_TINY = [o for o in TINY if not o.startswith("dataset.")]


def test_version_and_lazy_api():
    assert re.fullmatch(r"\d+\.\d+\.\d+", deqir.__version__)
    assert callable(deqir.restore) and isinstance(deqir.Restorer, type)
    with pytest.raises(AttributeError):
        deqir.no_such_thing  # noqa: B018


def test_restore_reproduces_the_cli(tmp_path):
    """The CLI's targets/*.png fed to deqir.restore give its images/*.png within one 8-bit level."""
    # a fixed solver: a timing-based choice (solver=auto) could pick different schedules in the two runs
    run_inprocess([*TINY, "task=sr2", "solver=anderson"], tmp_path)
    targets = sorted((tmp_path / "targets").glob("*.png"))
    assert len(targets) == 2
    result = deqir.restore(targets, task="sr2", overrides=[*API_TINY, "solver=anderson"])
    assert result.images.shape == (2, 3, 32, 32)
    assert 0 <= float(result.images.min()) and float(result.images.max()) <= 1
    for k, path in enumerate(targets):
        cli = pixels(tmp_path / "images" / path.name).astype(int)
        api = (result.images[k].permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
        assert np.abs(cli - api).max() <= 1, path.name
    import csv

    with open(tmp_path / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [s["name"] for s in result.stats] == [r["name"] for r in rows]
    assert set(rows[0]) <= set(result.stats[0]) | {""}
    for s, r in zip(result.stats, rows):
        assert s["rounds"] == int(r["rounds"]) and s["status"] == r["status"]
        assert abs(s["psnr"] - float(r["psnr"])) < 0.5


def test_restorer_reuses_the_model_and_takes_tensors():
    restorer = deqir.Restorer(task="denoise", overrides=[*API_TINY, "sampler=sequential"])
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = restorer(x[:2]), restorer.restore(x)
    assert a.images.shape == (2, 3, 16, 16) and b.images.shape == (3, 3, 16, 16)
    assert torch.allclose(a.images, b.images[:2])  # per-image noise: independent of the call's batch
    assert len(b.stats) == 3 and {"psnr", "rounds", "nfe", "status"} <= set(b.stats[0])
    assert restorer.config.sampler.name == "sequential"  # the composed config is inspectable


def test_api_uses_the_yaml_defaults():
    cfg = deqir.compose_config()
    from deqir.lit.builders import chain_settings

    chain = chain_settings(dict(cfg.sampler), dict(cfg.solver))
    max_iter = cfg.solver.max_iter if cfg.solver.max_iter is not None else cfg.sampler.timesteps  # null = T
    assert (chain.form, chain.max_iter, chain.coarse_steps, chain.per_step_noise) == (
        cfg.sampler.form, max_iter, cfg.sampler.coarse_steps, cfg.sampler.per_step_noise)


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 1, 8, 8), r"\(N, 3, H, W\)"), (torch.full((1, 3, 8, 8), 2.0), r"\[0, 1\]"),
])
def test_bad_images_are_one_line_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        deqir.restore(bad, overrides=API_TINY)


def test_bad_override_lists_valid_options():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="deblur"):
        deqir.Restorer(task="deblurr")


def test_docs_example_runs(capsys):
    """docs/api.md's first python block runs as written (<= 10 lines)."""
    text = (REPO / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 10
    exec(compile(code, "docs/api.md", "exec"), {})
    assert "PSNR" in capsys.readouterr().out
