"""Bad input: one clear ``error:`` line, a non-zero exit status, and nothing already written damaged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from app_support import TINY, error_lines, pixels, run_cli, run_inprocess, sample_folder, save_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def assert_one_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in error_lines(proc.stderr) if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _save_tiny(path, arch="ddpm", nan=False):
    from deqir.models import load_eps_model, save_eps_model
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(f"{__import__('app_support').CONF}/model/tiny_{arch}.yaml")
    config = OmegaConf.to_container(cfg.config)
    model = load_eps_model(arch, config, "random")
    sd = model.net.state_dict()
    if nan:
        sd = {k: (torch.full_like(v, float("nan")) if k.endswith("conv_out.weight") else v) for k, v in sd.items()}
    return save_eps_model(path, arch, config, sd, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- CLI
def test_missing_checkpoint(tmp_path):
    proc = run_cli([*TINY, f"model.ckpt_path={tmp_path}/nope.pt", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "checkpoint not found", "nope.pt")


def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = _save_tiny(tmp_path / "adm.pt", arch="adm")
    proc = run_cli([*TINY, f"model.ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "does not fit arch 'ddpm'")


def test_nan_in_model_output(tmp_path):
    ckpt = _save_tiny(tmp_path / "nan.pt", nan=True)
    proc = run_cli([*TINY, f"model.ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "NaN")
    assert not list((tmp_path / "run" / "images").glob("*.png")) if (tmp_path / "run" / "images").exists() else True


def test_corrupt_image_leaves_finished_outputs_intact(tmp_path):
    folder = sample_folder(tmp_path / "photos", n=2, size=32)
    run = tmp_path / "run"
    args = [*TINY, "dataset=folder", f"dataset.path={folder}", "dataset.limit=null", f"hydra.run.dir={run}"]
    assert run_inprocess(args[:-1], run)["n_images"] == 2
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix in (".png", ".csv", ".json")}
    good = (folder / "img0.png").read_bytes()
    (folder / "img2.png").write_bytes(good[: len(good) // 2])  # truncated download
    proc = run_cli(args)
    assert_one_error(proc, "img2.png")
    for path, data in before.items():
        assert path.read_bytes() == data, path


def test_image_size_the_task_cannot_take(tmp_path):
    proc = run_cli([*TINY, "task=sr8", "dataset.size=20", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "not divisible by the scale factor 8")


@pytest.mark.parametrize("override,valid", [("task=deblurr", "deblur_aniso"), ("solver=newton", "anderson")])
def test_unknown_names_list_the_valid_options(tmp_path, override, valid):
    proc = run_cli([override, f"hydra.run.dir={tmp_path}/run"])
    assert proc.returncode != 0
    assert "Available options" in proc.stderr and valid in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- in-process
def test_unreadable_folders(tmp_path):
    with pytest.raises(ValueError, match="image folder not found"):
        run_inprocess([*TINY, "dataset=folder", f"dataset.path={tmp_path}/missing"], tmp_path / "a")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        run_inprocess([*TINY, "dataset=folder", f"dataset.path={tmp_path}/file.txt"], tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        run_inprocess([*TINY, "dataset=folder", f"dataset.path={tmp_path}/empty"], tmp_path / "c")
    # a split list naming an image that is not there (DDRM's list format: path without suffix, label)
    (tmp_path / "list.txt").write_text("n01440764/ILSVRC2012_val_00000293 0\n")
    with pytest.raises(ValueError, match="image not found: .*ILSVRC2012_val_00000293"):
        run_inprocess([*TINY, "dataset=imagenet_val", f"dataset.path={tmp_path}/empty",
                       f"dataset.list={tmp_path}/list.txt"], tmp_path / "d")


def test_transparent_rgba_is_refused(tmp_path):
    rgba = np.full((32, 32, 4), 200, np.uint8)
    rgba[..., 3] = 128
    save_image(tmp_path / "in" / "ghost.png", rgba)
    with pytest.raises(ValueError, match="transparent pixels"):
        run_inprocess([*TINY, "dataset=folder", f"dataset.path={tmp_path}/in"], tmp_path / "run")


def test_gray_16bit_palette_and_opaque_rgba_are_converted(tmp_path):
    folder = tmp_path / "in"
    ramp = np.tile(np.linspace(0, 1, 32), (32, 1))
    save_image(folder / "a_gray.png", (ramp * 255).astype(np.uint8))
    save_image(folder / "b_gray16.png", (ramp * 65535).astype(np.uint16))
    rgba = np.dstack([(ramp * 255).astype(np.uint8)] * 3 + [np.full((32, 32), 255, np.uint8)])
    save_image(folder / "c_rgba.png", rgba)
    from PIL import Image

    Image.fromarray(rgba[..., :3]).convert("P").save(folder / "d_palette.png")
    run = tmp_path / "run"
    summary = run_inprocess([*TINY, "dataset=folder", f"dataset.path={folder}", "dataset.limit=null"], run)
    assert summary["n_images"] == 4
    t_gray, t_16 = pixels(run / "targets" / "a_gray.png"), pixels(run / "targets" / "b_gray16.png")
    assert t_gray.shape == (32, 32, 3) and np.abs(t_gray.astype(int) - t_16.astype(int)).max() <= 1


def test_read_image_messages(tmp_path):
    from deqir.datasets.images import ImageReadError, read_image

    with pytest.raises(ImageReadError, match="image not found"):
        read_image(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="not an image format"):
        read_image(tmp_path / "bad.png")
    arr = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    save_image(tmp_path / "ok.jpg", arr)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(tmp_path / "cut.jpg")
    gray16 = read_image(save_image(tmp_path / "g16.png", np.full((4, 4), 65535, np.uint16)))
    assert gray16.shape == (4, 4, 3) and gray16.max() == 1.0


def test_size_the_unet_cannot_take(tmp_path):
    with pytest.raises(ValueError, match="multiples of 2"):
        run_inprocess([*TINY, "dataset.size=33"], tmp_path / "run")
