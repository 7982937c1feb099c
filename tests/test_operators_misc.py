"""Masks, kernels and artefacts, the CG pseudo-inverse, composition, and bad input (clear ValueErrors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deqir.operators import (
    MASK_TYPES,
    OPERATOR_NAMES,
    ComposedOperator,
    GeneralLinearOperator,
    make_mask,
    make_operator,
)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("mask_type", [t for t in MASK_TYPES if t != "file"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40), (256, 256)])
def test_masks_are_deterministic_and_binary(mask_type, size):
    a = make_mask(mask_type, *size, seed=5)
    b = make_mask(mask_type, *size, seed=5)
    assert a.shape == size and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    missing = 1 - float(a.mean())
    expected = {"text": (0.18, 0.32), "stripes": (0.5, 0.5), "box": (0.24, 0.26), "random": (0.5, 0.5)}[mask_type]
    assert expected[0] - 1e-9 <= missing <= expected[1] + 1e-9


def test_seed_changes_text_and_random_masks():
    for kind in ("text", "random"):
        assert not torch.equal(make_mask(kind, 64, 64, seed=0), make_mask(kind, 64, 64, seed=1))


def test_mask_options():
    assert 1 - float(make_mask("random", 50, 50, missing_ratio=0.8).mean()) == pytest.approx(0.8)
    box = make_mask("box", 20, 30, box_size=[4, 10])
    assert float((box == 0).sum()) == 40 and float(box[8:12, 10:20].sum()) == 0
    stripes = make_mask("stripes", 16, 8, stripe_width=2)
    assert stripes[:, 0].tolist() == [1, 1, 0, 0] * 4


def test_mask_artifacts_round_trip(tmp_path):
    op = make_operator("inpaint", (3, 24, 40), mask_type="text", seed=2)
    paths = op.save_artifacts(tmp_path)
    assert sorted(p.name for p in paths) == ["mask.npy", "mask.png"]
    for p in paths:
        again = make_operator("inpaint", (3, 24, 40), mask_type="file", mask_path=str(p))
        assert torch.equal(again.mask, op.mask)
    png = np.asarray(Image.open(tmp_path / "mask.png"))
    assert png.shape == (24, 40) and set(np.unique(png)) <= {0, 255}


def test_kernel_artifacts_and_file_kernels(tmp_path):
    op = make_operator("deblur_aniso", (3, 32, 32))
    paths = op.save_artifacts(tmp_path)
    assert sorted(p.name for p in paths) == ["kernel.npy", "kernel.png"]
    for path in (tmp_path / "kernel.npy",):
        again = make_operator("deblur_kernel", (3, 32, 32), kernel_path=str(path))
        assert torch.allclose(again.kernel, op.kernel, atol=1e-15)
    np.savetxt(tmp_path / "k.txt", np.ones((3, 4)))
    txt = make_operator("deblur_kernel", (3, 32, 32), kernel_path=str(tmp_path / "k.txt"))
    assert txt.kernel.shape == (3, 4) and float(txt.kernel.sum()) == pytest.approx(1.0)
    spec = [{"name": "colorize"}, {"name": "inpaint", "mask_type": "box"}]
    comp = make_operator("compose", (3, 16, 16), operators=spec)
    assert any(p.name == "mask.npy" for p in comp.save_artifacts(tmp_path / "c"))


def test_kernel_array_and_kind_name():
    arr = make_operator("deblur_kernel", (3, 16, 16), kernel=[[1, 2, 1], [2, 4, 2], [1, 2, 1]])
    assert float(arr.kernel.sum()) == pytest.approx(1.0) and arr.kernel[1, 1] == pytest.approx(0.25)
    by_name = make_operator("deblur_kernel", (3, 16, 16), kernel="gaussian", kernel_size=5, sigma=10.0)
    assert torch.allclose(by_name.kernel, make_operator("deblur_gauss", (3, 16, 16)).kernel)


def test_inpainting_picture_and_per_channel_mask():
    op = make_operator("inpaint", (3, 16, 16), mask_type="box")
    x = rand((1, 3, 16, 16)).clamp(-1, 1)
    pic = op.y_to_image(op.A(x))
    assert float(pic[..., 8, 8].abs().max()) == 0.0 and torch.equal(pic[..., 0, 0], x[..., 0, 0])
    m = (rand((3, 16, 16), 4) > 0).double()
    per_channel = make_operator("inpaint", (3, 16, 16), mask=m.tolist())
    assert torch.equal(per_channel.A(x), x * m)


# ------------------------------------------------------------------------------------------ general operators / CG
@pytest.mark.parametrize("name,params", [("sr_bicubic", {"scale": 2}),
                                         ("deblur_gauss", {"sigma": 1.0, "kernel_size": 3}),
                                         ("sr_avgpool", {"scale": 4}), ("colorize", {})])
def test_cg_pinv_agrees_with_svd_pinv(name, params):
    svd = make_operator(name, (3, 32, 32), **params)
    gen = GeneralLinearOperator(svd.A, (3, 32, 32), max_iter=500, tol=1e-12)  # adjoint from autograd
    y = svd.A(rand((2, 3, 32, 32)))
    assert rel(gen.A_pinv(y), svd.A_pinv(y)) < 1e-8
    y_noisy = y + 0.1 * rand(y.shape, 3)  # not in the range: least squares, minimum norm
    assert rel(gen.A_pinv(y_noisy), svd.A_pinv(y_noisy)) < 1e-8
    assert rel(gen.A_adjoint(y), svd.A_adjoint(y)) < 1e-12


def test_general_operator_with_explicit_adjoint_and_gain():
    fwd = lambda x: x[..., ::2, ::2]  # noqa: E731  (a subsampling mask without an SVD)

    def adj(y):
        out = y.new_zeros(y.shape[0], 1, 8, 8)
        out[..., ::2, ::2] = y
        return out

    op = GeneralLinearOperator(fwd, (1, 8, 8), A_adjoint=adj, tol=1e-12)
    y = rand((3, 1, 4, 4))
    assert torch.allclose(op.A_pinv(y), adj(y), atol=1e-12)
    assert op.pinv_noise_gain() == pytest.approx(1.0, rel=0.05)  # seeded probe estimate
    assert op.measurement_shape == (1, 4, 4)


def test_autograd_adjoint_keeps_outer_gradients():
    op = GeneralLinearOperator(lambda x: 2.0 * x[..., 1:, :], (1, 4, 4))
    y = rand((1, 1, 3, 4)).requires_grad_(True)
    op.A_adjoint(y).sum().backward()
    assert torch.allclose(y.grad, torch.full_like(y, 2.0))


# ------------------------------------------------------------------------------------------ composition
@pytest.mark.parametrize("order", ["color_then_mask", "mask_then_color"])
def test_old_photo_composition_is_exact(order):
    mask = {"name": "inpaint", "mask_type": "text", "seed": 1}
    ops = [{"name": "colorize"}, mask] if order == "color_then_mask" else [mask, {"name": "colorize"}]
    op = make_operator("compose", (3, 32, 40), operators=ops)
    x = rand((2, 3, 32, 40))
    ax = op.A(x)
    assert rel(op.A(op.A_pinv(ax)), ax) < 1e-12
    assert op.y_to_image(ax).shape == x.shape
    y = op.measure(x, 0.1, generator=torch.Generator().manual_seed(0))
    assert y.shape == ax.shape


def test_inexact_composition_is_refused_and_cg_works():
    spec = [{"name": "deblur_gauss", "sigma": 1.0, "kernel_size": 3}, {"name": "sr_avgpool", "scale": 2}]
    with pytest.raises(ValueError, match="not the product of the pseudo-inverses.*pinv='cg'"):
        make_operator("compose", (3, 16, 16), operators=spec)
    op = make_operator("compose", (3, 16, 16), operators=spec, pinv="cg", tol=1e-12, max_iter=500)
    x = rand((2, 3, 16, 16))
    assert rel(op.A(op.A_pinv(op.A(x))), op.A(x)) < 1e-9


def test_composition_shape_mismatch():
    a = make_operator("sr_avgpool", (3, 16, 16), scale=2)
    b = make_operator("colorize", (3, 16, 16))
    with pytest.raises(ValueError, match="image_shape=\\(3, 8, 8\\)"):
        ComposedOperator([a, b])


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", ["sr_bicubic", "sr_avgpool"])
def test_size_not_divisible_by_scale(name):
    msg = r"height 30 is not divisible by the scale factor 4.*multiple of 4 \(e\.g\. 28 or 32\)"
    with pytest.raises(ValueError, match=msg):
        make_operator(name, (3, 30, 32), scale=4)


def test_mask_of_wrong_shape(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((16, 16)))
    with pytest.raises(ValueError, match=r"shape \(16, 16\).*needs a mask of shape \(32, 40\)"):
        make_operator("inpaint", (3, 32, 40), mask_type="file", mask_path=str(tmp_path / "m.npy"))
    with pytest.raises(ValueError, match="needs a mask of shape"):
        make_operator("inpaint", (3, 32, 40), mask=np.ones((40, 32)).tolist())


def test_unknown_names_list_valid_options():
    with pytest.raises(ValueError, match="unknown kernel kind 'gausian'; valid kinds: gaussian, uniform, anisotropic"):
        make_operator("deblur_kernel", (3, 16, 16), kernel="gausian")
    with pytest.raises(ValueError, match="valid names: " + ", ".join(OPERATOR_NAMES)):
        make_operator("deblur_motion", (3, 16, 16))
    with pytest.raises(ValueError, match="valid mask types: text, stripes, box, random, file"):
        make_operator("inpaint", (3, 16, 16), mask_type="lorem")
    with pytest.raises(ValueError, match="unknown parameter.*scael.*valid: scale"):
        make_operator("sr_bicubic", (3, 16, 16), scael=2)
    with pytest.raises(ValueError, match="valid: equal, bt601"):
        make_operator("colorize", (3, 16, 16), luma_weights="rec709")
    with pytest.raises(ValueError, match="valid: circular, zero"):
        make_operator("deblur_gauss", (3, 16, 16), boundary="reflect")


@pytest.mark.parametrize("name,params,match", [
    ("cs_walsh_hadamard", {}, r"power of two \(e\.g\. 32 x 32.*got 24 x 40"),
    ("cs_walsh_hadamard", {"ratio": 0.5}, "ratio must be a number >= 1"),
    ("sr_bicubic", {"scale": 0}, "positive integer"),
    ("deblur_gauss", {"kernel_size": 0}, "kernel_size must be a positive integer"),
    ("deblur_gauss", {"sigma": -1.0}, "sigma must be > 0"),
    ("deblur_gauss", {"zero_threshold": -1.0}, "zero_threshold must be >= 0"),
    ("deblur_gauss", {"legacy_svd": True, "boundary": "circular"}, "legacy_svd reproduces"),
    ("deblur_kernel", {}, "exactly one of kernel"),
    ("deblur_kernel", {"kernel_path": "missing.npy"}, "kernel file not found"),
    ("inpaint", {"mask_type": "random", "missing_ratio": 1.5}, r"missing_ratio must be in \[0, 1\)"),
    ("inpaint", {"mask_type": "file"}, "needs mask_path"),
    ("inpaint", {"mask_type": "box", "box_size": 100}, "must be positive and fit"),
    ("colorize", {"luma_weights": [0.5, 0.5]}, "needs 3 luma weights"),
    ("compose", {"operators": [{"name": "denoise"}]}, "at least two"),
])
def test_bad_parameters(name, params, match):
    shape = (3, 24, 40) if name == "cs_walsh_hadamard" and not params else (3, 32, 32)
    with pytest.raises(ValueError, match=match):
        make_operator(name, shape, **params)


def test_bad_image_shape_and_measurement():
    with pytest.raises(ValueError, match="three positive integers"):
        make_operator("denoise", (32, 32))
    op = make_operator("sr_avgpool", (3, 16, 16), scale=2)
    with pytest.raises(ValueError, match=r"measurements have shape \(B, 3, 8, 8\)"):
        op.A_pinv(torch.zeros(1, 3, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_measure_needs_a_cpu_generator():
    op = make_operator("denoise", (3, 8, 8))
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        op.measure(torch.zeros(1, 3, 8, 8), 0.1, generator=torch.Generator(device="cuda"))
