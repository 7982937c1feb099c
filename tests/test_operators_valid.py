"""The valid-boundary blur (docs/operators.md, "Real photos"): adjoint, Moore-Penrose identities, the valid
convolution itself (against scipy), any blur boundary fits it, and the DEQ fixed point is the sequential chain."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from deqir.diffusion.chain import make_chain
from deqir.diffusion.schedule import NoiseSchedule, SamplingGrid
from deqir.samplers.sequential import draw_chain_noise, sample_sequential
from deqir.operators import ValidBlur, ValidSeparableBlur, make_operator, valid_image_shape
from paper_settings import paper_deq
from tiny_models import tiny_unet

SHAPE = (3, 20, 17)
NONSEPARABLE = [[0.0, 0.2, 0.05], [0.1, 0.4, 0.1], [0.05, 0.2, 0.0]]


def _ops():
    sep = make_operator("deblur_gauss", SHAPE, boundary="valid").double()
    general = make_operator("deblur_kernel", SHAPE, kernel=NONSEPARABLE, boundary="valid").double()
    general.max_iter, general.tol = 2000, 1e-13
    return [sep, general]


@pytest.mark.parametrize("op", _ops(), ids=["separable", "general"])
def test_adjoint_and_pseudo_inverse_identities(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randn(2, *op.measurement_shape, generator=g, dtype=torch.float64)
    assert abs(float((op.A(x) * y).sum() - (x * op.A_adjoint(y)).sum())) < 1e-10 * float(x.norm() * y.norm())
    ax, py = op.A(x), op.A_pinv(y)
    assert float((op.A(op.A_pinv(ax)) - ax).abs().max()) < 1e-8  # A A+ A = A
    assert float((op.A_pinv(op.A(py)) - py).abs().max()) < 1e-8  # A+ A A+ = A+
    p = op.project_range(x)
    assert float((op.project_range(p) - p).abs().max()) < 1e-8  # P^2 = P
    assert float(((x - p) * p).sum().abs()) < 1e-8 * float(x.norm() ** 2)  # orthogonal


def test_shapes_view_and_classes():
    sep, general = _ops()
    assert isinstance(sep, ValidSeparableBlur) and isinstance(general, ValidBlur)
    assert sep.measurement_shape == (3, 16, 13) and general.measurement_shape == (3, 18, 15)
    assert valid_image_shape((3, 16, 13), (5, 5)) == SHAPE
    y = torch.rand(1, *sep.measurement_shape, dtype=torch.float64)
    picture = sep.y_to_image(y)
    assert picture.shape[1:] == SHAPE and torch.equal(sep.restored_view(picture), y)
    with pytest.raises(ValueError, match="zero-boundary"):
        make_operator("deblur_gauss", SHAPE, boundary="valid", legacy_svd=True)


@pytest.mark.parametrize("mode", ["reflect", "nearest", "wrap", "constant"])
def test_any_boundary_rule_is_a_valid_blur_of_a_larger_image(mode):
    """scipy's same-size convolution with any boundary rule is, on the photo, A applied to the padded image,
    so the photo is exactly in A's model: A x_pad = y (zero_threshold 0: the untruncated operator)."""
    rng = np.random.default_rng(0)
    img = rng.random((24, 21))
    op = make_operator("deblur_gauss", (1, 28, 25), boundary="valid", zero_threshold=0.0).double()
    k = op.kernel.numpy()
    y = ndi.correlate(img, k, mode=mode)
    pad = np.pad(img, 2, mode={"reflect": "symmetric", "nearest": "edge", "wrap": "wrap", "constant": "constant"}[mode])
    ax = op.A(torch.from_numpy(pad)[None, None])[0, 0].numpy()
    assert np.abs(ax - y).max() < 1e-12


def test_deq_fixed_point_is_the_sequential_chain():
    size, T = 16, 8
    model = tiny_unet(size)
    op = make_operator("deblur_gauss", (3, size, size), kernel_size=3, boundary="valid").double()
    coeffs = make_chain(NoiseSchedule.create(), SamplingGrid.create(T), etw=0.3, nw=0.2, sigma_y_eff=0.0)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T, z = draw_chain_noise((2, 3, size, size), T, gens, per_step_noise=False, dtype=torch.float64)
    gt = torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    y = op.A(gt)
    seq, _ = sample_sequential(model, coeffs, x_T, operator=op, y=y, z=z)
    res = paper_deq(model, coeffs, x_T, operator=op, y=y, z=z, solver="picard", max_iter=T, tol=0.0)
    assert float((res.x0 - seq).norm() / seq.norm()) < 1e-9
    assert float((op.A(res.x0) - y).abs().max()) < 1e-6  # consistent with the photo by construction
