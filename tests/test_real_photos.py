"""invert.py dataset=real and deqir.restore on a user's own photos: own size, 16-bit, one path with evaluate,
inpainting with the user's mask, and bad input (one line, exit status 2, nothing written lost)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from app_support import REPO, TINY, error_lines, pixels, read_csv, run_cli, run_inprocess, save_image

import deqir
from deqir.datasets.decode import png_header
from deqir.datasets.images import read_image
from deqir.utils.images import save_png

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY_REAL = [o for o in TINY if not o.startswith("dataset.")]


def _crop(h: int, w: int, name: str = "astronaut") -> torch.Tensor:
    """(1, 3, h, w) crop of a demo photo on [0, 1]."""
    x = torch.from_numpy(read_image(REPO / "data" / "samples" / f"{name}.png")).permute(2, 0, 1)
    return x[None, :, 40 : 40 + h, 60 : 60 + w].contiguous()


def _mask(path, h: int, w: int):
    m = np.full((h, w), 255, np.uint8)
    m[h // 4 : h // 2, w // 4 : 3 * w // 4] = 0  # a missing bar
    return save_image(path, m)


def test_one_path_evaluate_then_restore_a_16bit_photo(tmp_path):
    """A clean photo degraded by deqir.evaluate, saved as a 16-bit PNG and restored through dataset=real and
    through deqir.restore, gives evaluate's restoration within one 8-bit level; 16-bit in, 16-bit out."""
    mask = _mask(tmp_path / "mask.png", 32, 32)
    over = [*TINY_REAL, f"task.params.mask_path={mask}"]
    simulated = deqir.evaluate(_crop(32, 32), task="inpaint_mask", overrides=over)
    photo = save_png(simulated.inputs[0], tmp_path / "holed" / "photo.png", bits=16)
    run = tmp_path / "run"
    run_inprocess([*over, "task=inpaint_mask", "dataset=real", f"dataset.path={photo.parent}", "dataset.sigma_y=0"],
                  run)
    restored = deqir.restore([photo], task="inpaint_mask", overrides=[*over, "dataset.sigma_y=0"])
    want = (simulated.images[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
    assert png_header(run / "images" / "photo.png")[2] == 16  # 16-bit input, 16-bit output
    cli = read_image(run / "images" / "photo.png")
    assert np.abs((cli * 255 + 0.5).astype(int) - want).max() <= 1
    api = (restored.images[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
    assert np.abs(api - want).max() <= 1


def test_mask_of_another_size_names_both_sizes(tmp_path):
    photo = save_png(_crop(32, 24)[0], tmp_path / "holed" / "photo.png")
    mask = _mask(tmp_path / "mask.png", 16, 16)
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(32, 24\)"):
        run_inprocess([*TINY_REAL, "task=inpaint_mask", f"task.params.mask_path={mask}", "dataset=real",
                       f"dataset.path={photo.parent}"], tmp_path / "run")


def test_photos_of_different_sizes_are_all_restored_at_their_own_size(tmp_path, capsys):
    """Two sizes in one folder, odd sides (the tiny UNet downsamples 2x), no crop, no resize; sigma_y estimated
    and said."""
    folder = tmp_path / "photos"
    for name, (h, w) in {"wide": (45, 63), "odd": (33, 20)}.items():
        save_png(_crop(h, w)[0], folder / f"{name}.png")
    run = tmp_path / "run"
    summary = run_inprocess([*TINY_REAL, "task=denoise", "task.sigma_y=0", "dataset=real", f"dataset.path={folder}"],
                            run)
    assert summary["n_images"] == 2
    assert pixels(run / "images" / "wide.png").shape == (45, 63, 3)
    assert pixels(run / "images" / "odd.png").shape == (33, 20, 3)
    rows = read_csv(run / "per_image.csv")
    assert [r["name"] for r in rows] == ["odd", "wide"] and all(float(r["sigma_y"]) > 0 for r in rows)
    assert f"odd {float(rows[0]['sigma_y']):.4f}" in capsys.readouterr().out  # the sigma_y used, said


def test_inconsistent_restoration_is_said_in_the_summary_and_the_table(tmp_path):
    """A photo that is not a blur of the task's kernel (random noise at 0 noise level): the warning column."""
    folder = tmp_path / "noise"
    save_png(torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0)), folder / "n.png")
    run = tmp_path / "run"
    summary = run_inprocess([*TINY_REAL, "task=deblur", "dataset=real", f"dataset.path={folder}",
                             "dataset.sigma_y=0"], run)
    row = read_csv(run / "per_image.csv")[0]
    assert "inconsistent" in row["warning"] and summary["inconsistent"] == 1


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_real_inputs_are_one_line_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        run_inprocess([*TINY_REAL, "dataset=real", f"dataset.path={empty}"], tmp_path / "r0")
    tiny = tmp_path / "tiny"
    save_png(torch.rand(3, 3, 3), tiny / "t.png")
    with pytest.raises(ValueError, match=r"smaller than the blur kernel \(5 x 5\)"):
        run_inprocess([*TINY_REAL, "task=deblur", "dataset=real", f"dataset.path={tiny}"], tmp_path / "r1")
    with pytest.raises(ValueError, match=r"task.params.kernel_path"):
        run_inprocess([*TINY_REAL, "task=deblur_kernel", "dataset=real", f"dataset.path={tiny}"], tmp_path / "r2")
    monkeypatch.setenv("DEQIR_MAX_IMAGE_PIXELS", "1000")
    small = tmp_path / "small"
    save_png(torch.rand(3, 20, 20), small / "s.png")
    with pytest.raises(ValueError, match="above the pixel limit"):
        run_inprocess([*TINY_REAL, "task=sr4", "dataset=real", f"dataset.path={small}"], tmp_path / "r3")
    with pytest.raises(ValueError, match="above the pixel limit"):
        deqir.restore(torch.rand(3, 20, 20), task="sr4", overrides=TINY_REAL)


def test_corrupt_solver_choice_names_the_file_and_keeps_the_results(tmp_path):
    """A resumed run directory with a corrupt solver_choice.json: exit 2, one line naming the file and the fix."""
    folder = tmp_path / "photos"
    save_png(_crop(16, 16)[0], folder / "a.png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "solver_choice.json").write_text('{"schedule": "seq\x01')
    (run / "keep.txt").write_text("earlier results")
    args = [*[o for o in TINY_REAL if not o.startswith("solver")], "solver=auto", "task=denoise", "dataset=real",
            f"dataset.path={folder}", f"hydra.run.dir={run}"]
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "solver_choice.json" in lines[0] and "delete it" in lines[0], lines
    assert (run / "keep.txt").read_text() == "earlier results"


def test_memory_limit_micro_batches_the_unet_without_changing_results():
    """A bound below one DEQ round's T slots sets sampler.max_batch (where it binds); the images are the same."""
    from deqir.lit.memory import call_bytes, limit_bytes

    photo = _crop(24, 20)
    over = [*TINY_REAL, "solver.max_iter=3"]
    free = deqir.Restorer(task="denoise", overrides=[*over, "memory_limit=null"])
    bounded = deqir.Restorer(task="denoise", overrides=[*over, "memory_limit=0.0001"])  # ~100 KiB: one image
    a, b = free.restore(photo), bounded.restore(photo)
    (mod_a,), (mod_b,) = free._modules.values(), bounded._modules.values()
    assert mod_a.chain.max_batch is None and mod_b.chain.max_batch == 1
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert call_bytes({"config": {"ch": 32, "ch_mult": [1, 2, 2]}}, 768, 1024) == 4 * 20 * 32 * 768 * 1024
    assert limit_bytes(2, torch.device("cpu")) == 2 * 2**30 and limit_bytes(None, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="memory_limit"):
        limit_bytes(-1, torch.device("cpu"))


def test_valid_blur_compares_to_the_sequential_chain_on_the_photo_grid(tmp_path):
    """eval.compare_sequential with the valid-boundary blur (its image is larger than the photo)."""
    folder = tmp_path / "blurry"
    save_png(_crop(20, 18)[0], folder / "b.png")
    run = tmp_path / "run"
    run_inprocess([*TINY_REAL, "task=deblur", "task.params.kernel_size=3", "dataset=real", f"dataset.path={folder}",
                   "eval.compare_sequential=true", "solver=picard", "solver.max_iter=4", "solver.tol=0"], run)
    row = read_csv(run / "per_image.csv")[0]
    assert float(row["psnr_to_sequential"]) > 60  # Picard after T rounds is the sequential chain
    assert pixels(run / "images" / "b.png").shape == (20, 18, 3)
