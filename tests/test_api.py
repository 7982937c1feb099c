"""The Python API (deqir.restore / deqir.evaluate / deqir.Restorer) against invert.py, and the docs/api.md example."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from app_support import REPO, TINY, pixels, read_csv, run_inprocess
from PIL import Image

import deqir

# The CLI's tiny run; the API gets the same overrides minus the dataset's (it reads the given images).
API_TINY = [o for o in TINY if not o.startswith("dataset.")]


def test_version_and_lazy_api():
    assert re.fullmatch(r"\d+\.\d+\.\d+", deqir.__version__)
    assert callable(deqir.restore) and callable(deqir.evaluate) and isinstance(deqir.Restorer, type)
    with pytest.raises(AttributeError):
        deqir.no_such_thing  # noqa: B018


def test_evaluate_reproduces_the_cli(tmp_path):
    """The CLI's targets/*.png fed to deqir.evaluate give its images/*.png within one 8-bit level."""
    # a fixed solver: a timing-based choice (solver=auto) could pick different schedules in the two runs
    run_inprocess([*TINY, "task=sr2", "solver=anderson"], tmp_path)
    targets = sorted((tmp_path / "targets").glob("*.png"))
    assert len(targets) == 2
    result = deqir.evaluate(targets, task="sr2", overrides=[*API_TINY, "solver=anderson"])
    assert result.images.shape == (2, 3, 32, 32)
    assert 0 <= float(result.images.min()) and float(result.images.max()) <= 1
    for k, path in enumerate(targets):
        cli = pixels(tmp_path / "images" / path.name).astype(int)
        api = (result.images[k].permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
        assert np.abs(cli - api).max() <= 1, path.name
    rows = read_csv(tmp_path / "per_image.csv")
    assert [s["name"] for s in result.stats] == [r["name"] for r in rows]
    assert set(rows[0]) <= set(result.stats[0]) | {""}
    for s, r in zip(result.stats, rows):
        assert s["rounds"] == int(r["rounds"]) and s["status"] == r["status"]
        assert abs(s["psnr"] - float(r["psnr"])) < 0.5


def test_restorer_reuses_the_model_and_takes_tensors():
    restorer = deqir.Restorer(task="denoise", overrides=[*API_TINY, "sampler=sequential"])
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a, b = restorer.evaluate(x[:2]), restorer.evaluate(x)
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


def _photos(folder, sizes):
    """Crops of the demo photos, blurred outside deqir (PIL), saved as 8-bit PNGs: one per (h, w)."""
    from PIL import ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    src = Image.open(REPO / "data" / "samples" / "astronaut.png").convert("RGB")
    paths = []
    for k, (h, w) in enumerate(sizes):
        path = folder / f"photo{k}.png"
        src.crop((40 + 9 * k, 30, 40 + 9 * k + w, 30 + h)).filter(ImageFilter.GaussianBlur(1.0)).save(path)
        paths.append(path)
    return paths


def test_restore_reproduces_the_cli_on_photos_of_any_size(tmp_path):
    """deqir.restore and invert.py dataset=real restore the same photos (26 x 18 and 20 x 20, sides the UNet's
    downsampling does not divide) at their own sizes, within one 8-bit level, with the same sigma_y."""
    paths = _photos(tmp_path / "blurry", [(26, 18), (20, 20)])
    run = tmp_path / "run"
    run_inprocess([*API_TINY, "task=deblur", "dataset=real", f"dataset.path={paths[0].parent}"], run)
    result = deqir.restore(paths, task="deblur", overrides=API_TINY)
    assert isinstance(result.images, list) and [tuple(t.shape) for t in result.images] == [(3, 26, 18), (3, 20, 20)]
    rows = read_csv(run / "per_image.csv")
    for k, path in enumerate(paths):
        cli = pixels(run / "images" / path.name).astype(int)
        assert cli.shape == (*Image.open(path).size[::-1], 3)  # the photo's own size, no crop, no resize
        api = (result.images[k].permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
        assert np.abs(cli - api).max() <= 1, path.name
        assert float(rows[k]["sigma_y"]) == pytest.approx(result.stats[k]["sigma_y"]) and result.stats[k]["sigma_y"] > 0
        assert np.abs(pixels(run / "inputs" / path.name).astype(int) - pixels(path).astype(int)).max() <= 1


def test_restore_returns_the_restored_size():
    """srK: K x the photo; colorize: a grey photo in, colour out; uint8 tensors are read as 0-255."""
    sr = deqir.restore(torch.rand(2, 3, 12, 10), task="sr2", overrides=API_TINY)
    assert sr.images.shape == (2, 3, 24, 20) and sr.inputs.shape == (2, 3, 24, 20)
    grey = (torch.rand(1, 14, 22) * 255).to(torch.uint8)
    col = deqir.restore([grey, torch.rand(3, 10, 12)], task="colorize", overrides=API_TINY)
    assert [tuple(t.shape) for t in col.images] == [(3, 14, 22), (3, 10, 12)]
    same = deqir.restore(grey.float()[None] / 255, task="colorize", overrides=API_TINY)
    assert torch.allclose(same.images[0], col.images[0], atol=1e-5)  # uint8 = its float / 255


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 2, 8, 8), r"\(C, h, w\) with C = 3"), (torch.full((1, 3, 8, 8), 2.0), r"\[0, 1\]"),
    (torch.full((1, 3, 8, 8), float("nan")), "NaN/inf"), (torch.ones(1, 3, 8, 8, dtype=torch.int32), "uint8"),
    ([], "no images"),
])
def test_bad_images_are_one_line_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        deqir.restore(bad, overrides=API_TINY)
    if isinstance(bad, torch.Tensor) and bad.shape[1] != 3:
        with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
            deqir.evaluate(bad, overrides=API_TINY)


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
    out = capsys.readouterr().out
    assert "PSNR" in out and "restored" in out
