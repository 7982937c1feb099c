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
@pytest.mark.slow
def test_missing_checkpoint(tmp_path):
    proc = run_cli([*TINY, f"model.ckpt_path={tmp_path}/nope.pt", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "checkpoint not found", "nope.pt")


@pytest.mark.slow
def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = _save_tiny(tmp_path / "adm.pt", arch="adm")
    proc = run_cli([*TINY, f"model.ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "does not fit arch 'ddpm'")


@pytest.mark.slow
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


@pytest.mark.slow
def test_image_size_the_task_cannot_take(tmp_path):
    proc = run_cli([*TINY, "task=sr8", "dataset.size=20", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "not divisible by the scale factor 8")


@pytest.mark.parametrize("override,valid", [("task=deblurr", "deblur_aniso"),
                                            pytest.param("solver=newton", "anderson", marks=pytest.mark.slow)])
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


# ----------------------------------------------------------------------- reliability: no silent wrong results
def _png16(path, arr):
    """Write a 16-bit PNG of a uint16 (H, W, C) array (C = 2, 3 or 4); PIL cannot write 16-bit colour."""
    import struct
    import zlib

    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_run_never_reads_its_own_outputs(tmp_path):
    folder = sample_folder(tmp_path / "photos", n=2, size=32)
    args = [*TINY, "dataset=folder", f"dataset.path={folder}", "dataset.limit=null"]
    for _ in range(2):  # the run directory inside the dataset folder: its outputs are never inputs
        summary = run_inprocess(args, folder / "out")
        assert summary["n_images"] == 2
    assert sorted(p.name for p in (folder / "out" / "images").iterdir()) == ["img0.png", "img1.png"]
    # the dataset folder inside the run directory (restoring a run's own images into that run): refused
    with pytest.raises(ValueError, match="inside the run directory"):
        run_inprocess([*TINY, "dataset=folder", f"dataset.path={folder / 'out' / 'images'}"], folder / "out")


@pytest.mark.parametrize("limit", [-1, 0, "two"])
def test_dataset_limit_must_be_a_positive_integer(tmp_path, limit):
    with pytest.raises(ValueError, match=r"dataset.limit must be a positive integer .* or null"):
        run_inprocess([*TINY, f"dataset.limit={limit}"], tmp_path / "run")
    if limit != "two":  # the sibling: a number as dataset.subset
        with pytest.raises(ValueError, match=r"dataset.subset as a number must be a positive integer"):
            run_inprocess([*TINY, f"+dataset.subset={limit}"], tmp_path / "run")


def test_near_singular_or_negative_kernels_are_refused_naming_the_file(tmp_path):
    from deqir.operators.kernels import as_kernel

    (tmp_path / "psf.txt").write_text("1 -0.999999999\n")  # sum 1e-9: taps would become +-1e9
    with pytest.raises(ValueError, match=r"kernel file .*psf\.txt.*taps sum to 1e-09"):
        run_inprocess([*TINY, "task=deblur_kernel", f"task.params.kernel_path={tmp_path}/psf.txt"], tmp_path / "r")
    for bad, why in (([[1.0, -2.0]], "taps sum to -1"), ([[0.0, 0.0]], "all zeros"), ([[1.0, np.nan]], "NaN")):
        with pytest.raises(ValueError, match=why):
            as_kernel(bad)
    assert float(as_kernel([[-1.0, 5.0, -1.0]]).sum()) == pytest.approx(1.0)  # sharpening kernels stay valid


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_do(tmp_path, orientation):
    from PIL import Image, ImageOps

    from deqir.datasets.images import read_image

    arr = (np.random.default_rng(orientation).random((6, 4, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "phone.png", exif=exif.tobytes())
    with Image.open(tmp_path / "phone.png") as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_array_equal(read_image(tmp_path / "phone.png"), upright)
    assert upright.shape[:2] == ((6, 4) if orientation <= 4 else (4, 6))


def test_16bit_colour_png_keeps_its_precision(tmp_path):
    from deqir.datasets.images import ImageReadError, read_image

    rgb = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000 + 7).astype(np.uint16)  # not representable in 8 bits
    got = read_image(_png16(tmp_path / "rgb16.png", rgb))
    np.testing.assert_array_equal(got, rgb.astype(np.float32) / 65535)
    opaque = np.dstack([rgb, np.full((4, 5), 65535, np.uint16)])
    np.testing.assert_array_equal(read_image(_png16(tmp_path / "rgba16.png", opaque)), got)
    opaque[0, 0, 3] = 100
    with pytest.raises(ImageReadError, match="transparent pixels"):
        read_image(_png16(tmp_path / "ghost16.png", opaque))


def test_16bit_colour_tiff_says_it_is_read_at_8_bits(tmp_path):
    tifffile = pytest.importorskip("tifffile")  # the only writer of 16-bit colour TIFFs here (a dev extra)
    from deqir.datasets.decode import ImagePrecisionWarning
    from deqir.datasets.images import read_image

    tifffile.imwrite(tmp_path / "scan.tif", np.full((4, 5, 3), 3007, np.uint16), photometric="rgb")
    with pytest.warns(ImagePrecisionWarning, match=r"scan\.tif has 16-bit colour channels.*16-bit PNG"):
        assert read_image(tmp_path / "scan.tif").shape == (4, 5, 3)


@pytest.mark.slow
def test_pixel_limit_refuses_before_decoding_and_shrinks_jpegs(tmp_path, monkeypatch):
    from deqir.datasets.images import read_image

    # a small PNG whose header says 13000 x 13000 (169 MP, > 4 GB decoded): refused from the header, one line
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                                               + chunk(b"IDAT", zlib.compress(b"\x00" * 40000)) + chunk(b"IEND", b""))
    proc = run_cli([*TINY, "dataset=folder", f"dataset.path={tmp_path}/in", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "bomb.png", "13000x13000", "DEQIR_MAX_IMAGE_PIXELS")
    # a configurable limit; a JPEG over it is decoded at a reduced scale instead of refused
    monkeypatch.setenv("DEQIR_MAX_IMAGE_PIXELS", "1500")
    save_image(tmp_path / "big.jpg", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    assert read_image(tmp_path / "big.jpg").shape == (32, 32, 3)
    save_image(tmp_path / "big.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"big\.png is 64x64 .* more than the 0\.0015 MP"):
        read_image(tmp_path / "big.png")
    from deqir.lit.builders import load_reference  # reference images (optimize.reference_path) too

    with pytest.raises(ValueError, match=r"big\.png is 64x64"):
        load_reference(str(tmp_path / "big.png"), (3, 32, 32))


def test_training_photos_are_read_by_the_one_reader(tmp_path):
    """train.py's folder photos go through read_image: 8-bit files come back exactly, transparency is refused."""
    from deqir.datasets.photos import load_folder_photos

    img = (np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)
    save_image(tmp_path / "ok" / "a.png", img)
    [(name, arr)] = load_folder_photos(tmp_path / "ok")
    assert name == "a" and arr.dtype == np.uint8 and np.array_equal(arr, img)
    assert load_folder_photos(tmp_path / "ok", max_side=20)[0][1].shape == (15, 20, 3)
    rgba = np.concatenate([img, np.full((30, 40, 1), 128, np.uint8)], axis=2)
    save_image(tmp_path / "alpha" / "b.png", rgba)
    with pytest.raises(ValueError, match="transparent"):
        load_folder_photos(tmp_path / "alpha")


@pytest.mark.slow
def test_read_only_or_impossible_run_directory_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_cli([*TINY, f"hydra.run.dir={tmp_path}/afile/run"])
    assert_one_error(proc, "cannot create the run directory", "is a file")
    import os

    if os.geteuid() != 0:  # root may write anywhere: the read-only case needs an ordinary user
        (tmp_path / "ro").mkdir(mode=0o555)
        assert_one_error(run_cli([*TINY, f"hydra.run.dir={tmp_path}/ro/run"]), "not writable")


@pytest.mark.slow
def test_refused_lpips_weights_are_one_line(tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": Payload()}))
    proc = run_cli([*TINY, "dataset.limit=1", "eval=default", "eval.lpips=alex",
                    f"eval.lpips_weights={tmp_path}/evil.pth", f"hydra.run.dir={tmp_path}/run"])
    assert_one_error(proc, "LPIPS backbone weights", "evil.pth", "system")
    assert not (tmp_path / "pwned").exists()


def test_long_file_names_are_shortened_and_write_errors_name_the_input(tmp_path):
    from deqir.datasets.images import MAX_NAME_BYTES, image_names
    from deqir.lit.writer import RunStore

    folder = sample_folder(tmp_path / "in", n=1, size=32)
    long = folder / ("x" * 246 + ".png")
    (folder / "img0.png").rename(long)
    run = tmp_path / "run"
    assert run_inprocess([*TINY, "dataset=folder", f"dataset.path={folder}"], run)["n_images"] == 1
    (name,) = image_names([long], folder)
    assert len(name.encode()) <= MAX_NAME_BYTES and name.startswith("x" * 100)
    assert (run / "images" / f"{name}.png").is_file() and not list(run.rglob("*.tmp"))
    assert image_names([folder / ("é" * 200 + ".png")], folder)[0] != image_names([folder / ("é" * 201 + ".png")],
                                                                                 folder)[0]
    store = RunStore(tmp_path / "blocked")
    store.prepare([long])
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "images").write_text("a file where the images folder should be")
    with pytest.raises(OSError, match=r"cannot write the results of input image .*xxxx\.png"):
        store.save({"name": "n", "index": 0}, {}, torch.zeros(3, 4, 4), None, None)


def test_sigma_y_errors_quote_the_value_given(tmp_path):
    with pytest.raises(ValueError, match=r"task.sigma_y must be a finite number >= 0 .*got -0.1$"):
        run_inprocess([*TINY, "task.sigma_y=-0.1"], tmp_path / "run")
