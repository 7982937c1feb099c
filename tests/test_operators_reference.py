"""Operators against independent references: conv2d, avg_pool2d, weighted sums, a dense rebuild of the
official DDRM/DDNM/DeqIR deblurring operator (docs/operators.md), a Sylvester Hadamard matrix, and the
measured difference between the legacy operator and the true blur (docs/operators.md).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deqir.operators import make_kernel, make_operator
from deqir.operators.sr import bicubic_kernel


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conv_ref(x: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    """Depthwise conv2d of x with kernel k, padded (k//2 before, k-1-k//2 after) by ``mode``."""
    kh, kw = k.shape
    pad = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    xp = F.pad(x, pad, mode="circular") if mode == "circular" else F.pad(x, pad)
    c = x.shape[1]
    return F.conv2d(xp, k.to(x).expand(c, 1, kh, kw), groups=c)


def smooth_image(h: int, w: int) -> torch.Tensor:
    """A deterministic natural-looking test image on [-1, 1]: gradients, blobs, an edge, texture."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                            torch.linspace(0, 1, w, dtype=torch.float64), indexing="ij")
    r = 0.6 * xx - 0.3 + 0.4 * torch.exp(-((xx - 0.3) ** 2 + (yy - 0.4) ** 2) / 0.02)
    g = 0.5 * yy - 0.2 + 0.3 * (xx + yy > 1.1).double() + 0.05 * torch.sin(40 * xx) * torch.sin(35 * yy)
    b = 0.2 - 0.4 * xx * yy + 0.3 * torch.exp(-((xx - 0.7) ** 2 + (yy - 0.7) ** 2) / 0.01)
    return torch.stack([r, g, b])[None].clamp(-1, 1)


# ------------------------------------------------------------------------------------------ true blurs
@pytest.mark.parametrize("name,params", [("deblur_gauss", {}), ("deblur_uniform", {}), ("deblur_aniso", {}),
                                         ("deblur_kernel", {"kernel": [[0, 1, 0.5], [2, 3, 0],
                                                                       [0, 0.2, 1], [1, 0, 0]]})])
@pytest.mark.parametrize("boundary", ["circular", "zero"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_true_blur_equals_conv2d(name, params, boundary, size):
    if name == "deblur_kernel" and boundary == "zero":
        pytest.skip("zero boundary needs a separable kernel (tested below)")
    op = make_operator(name, (3, *size), boundary=boundary, zero_threshold=0.0, **params)
    x = rand((2, 3, *size))
    assert rel(op.A(x), conv_ref(x, op.kernel, boundary)) < 1e-12


@pytest.mark.parametrize("name", ["deblur_gauss", "deblur_uniform", "deblur_aniso"])
def test_default_threshold_stays_within_its_bound(name):
    """zero_threshold = 3e-2 removes only frequencies with |K| < 3e-2: |A x - conv x| <= 3e-2 |x|."""
    op = make_operator(name, (3, 64, 64))
    x = rand((2, 3, 64, 64))
    ref = conv_ref(x, op.kernel, "circular")
    assert float((op.A(x) - ref).norm()) <= 3e-2 * float(x.norm())
    img = smooth_image(64, 64)  # on a natural-looking image the truncation is tiny
    assert rel(op.A(img), conv_ref(img, op.kernel, "circular")) < 1e-2


def test_kernel_defaults_are_the_papers():
    kh, kw = make_kernel("gaussian", 5, 10.0)
    x = torch.arange(-2, 3, dtype=torch.float64)
    ref = torch.exp(-(x**2) / 200)
    assert torch.allclose(kh, ref / ref.sum()) and torch.equal(kh, kw)
    assert make_operator("deblur_uniform", (3, 16, 16)).kernel.shape == (9, 9)
    k1, k2 = make_kernel("anisotropic", 9, 1.0, 20.0)
    op = make_operator("deblur_aniso", (3, 16, 16))
    assert torch.allclose(op.kernel, torch.outer(k1, k2))  # sigma 1 vertical, sigma 20 horizontal


def test_non_separable_kernel_zero_boundary_refused():
    with pytest.raises(ValueError, match="separable"):
        make_operator("deblur_kernel", (3, 16, 16), kernel=[[0, 1], [1, 0.5]], boundary="zero")


def test_separable_file_kernel_zero_boundary(tmp_path):
    k = torch.outer(torch.tensor([1.0, 2.0, 1.0]), torch.tensor([1.0, 3.0, 1.0, 0.5, 0.2])).double()
    np.save(tmp_path / "k.npy", k.numpy())
    op = make_operator("deblur_kernel", (3, 20, 24), kernel_path=str(tmp_path / "k.npy"), boundary="zero",
                       zero_threshold=0.0)
    x = rand((1, 3, 20, 24))
    assert rel(op.A(x), conv_ref(x, k / k.sum(), "zero")) < 1e-12


# ------------------------------------------------------------------------------------------ legacy quirk
def dense_official_deblur(k_h: np.ndarray, k_w: np.ndarray, c: int, h: int, w: int, zero: float) -> np.ndarray:
    """The official ``Deblurring2D`` as one dense (D, D) matrix, rebuilt from its description (docs/operators.md)."""
    def band(k, n):  # taps j in [i - k//2, i + k//2): the last tap is dropped
        a = np.zeros((n, n))
        half = len(k) // 2
        for i in range(n):
            for j in range(i - half, i + half):
                if 0 <= j < n:
                    a[i, j] = k[j - i + half]
        return a

    uh, sh, vht = np.linalg.svd(band(k_h, h))
    uw, sw, vwt = np.linalg.svd(band(k_w, w))
    sh, sw = np.where(sh < zero, 0, sh), np.where(sw < zero, 0, sw)
    s2 = np.outer(sh, sw).ravel()
    perm = np.argsort(-s2, kind="stable")
    tiled = np.tile(s2[perm], c)  # singulars(): repeat over channels
    m = np.zeros((c * h * w, c * h * w))
    for p in range(h * w):  # spectral index p * c + ch (channel-interleaved)
        a, b = divmod(perm[p], w)
        outer = np.outer(np.kron(uh[:, a], uw[:, b]), np.kron(vht[a], vwt[b]))
        for ch in range(c):
            blk = slice(ch * h * w, (ch + 1) * h * w)
            m[blk, blk] += tiled[p * c + ch] * outer
    return m


@pytest.mark.parametrize("name", ["deblur_gauss", "deblur_uniform", "deblur_aniso"])
@pytest.mark.parametrize("zero", [0.0, 3e-2])
def test_legacy_svd_equals_official_operator(name, zero):
    # 8 x 9: the 1-D band matrices have distinct, nonzero singular values, so the official operator is
    # well defined (with a zero or repeated 1-D singular value it depends on the SVD library's basis).
    op = make_operator(name, (3, 8, 9), legacy_svd=True, zero_threshold=zero)
    kind, size, sigma = {"deblur_gauss": ("gaussian", 5, 10.0), "deblur_uniform": ("uniform", 9, 1.0),
                         "deblur_aniso": ("anisotropic", 9, 1.0)}[name]
    k_h, k_w = make_kernel(kind, size, sigma, 20.0)
    dense = torch.from_numpy(dense_official_deblur(k_h.numpy(), k_w.numpy(), 3, 8, 9, zero))
    x = rand((3, 3, 8, 9))
    ref = (x.reshape(3, -1) @ dense.T).reshape(3, 3, 8, 9)
    assert rel(op.A(x), ref) < 1e-10


def test_legacy_single_channel_is_the_dropped_tap_blur():
    """Without channels to tile over, the legacy operator is the zero-boundary blur minus its last tap."""
    op = make_operator("deblur_gauss", (1, 16, 16), legacy_svd=True, zero_threshold=0.0)
    k = op.kernel.clone()
    k[-1, :] = 0
    k[:, -1] = 0
    x = rand((2, 1, 16, 16))
    assert rel(op.A(x), conv_ref(x, k, "zero")) < 1e-12


def test_legacy_differs_from_true_blur_by_the_documented_amount():
    """docs/operators.md: the official operator's 16 x 16 random check, and a natural-looking 64 x 64 image."""
    x = rand((1, 3, 16, 16))
    leg = make_operator("deblur_gauss", (3, 16, 16), legacy_svd=True, zero_threshold=0.0)
    k = leg.kernel.clone()
    k[-1, :] = 0
    k[:, -1] = 0
    assert 0.85 < rel(leg.A(x), conv_ref(x, k, "zero")) < 0.97  # spec: 88 % (one random draw)
    img = smooth_image(64, 64)
    measured = {"deblur_gauss": 0.397, "deblur_uniform": 0.322, "deblur_aniso": 0.218}
    for name, value in measured.items():
        leg = make_operator(name, (3, 64, 64), legacy_svd=True)
        true = make_operator(name, (3, 64, 64), zero_threshold=0.0)
        assert rel(leg.A(img), true.A(img)) == pytest.approx(value, abs=0.005), name


def test_legacy_differs_on_a_natural_image_at_256():
    skimage = pytest.importorskip("skimage")
    from skimage import transform

    img = transform.resize(skimage.data.astronaut(), (256, 256), anti_aliasing=True)
    x = torch.tensor(img).permute(2, 0, 1)[None].double() * 2 - 1
    for name, value in {"deblur_gauss": 0.385, "deblur_uniform": 0.288, "deblur_aniso": 0.198}.items():
        leg = make_operator(name, (3, 256, 256), legacy_svd=True)
        true = make_operator(name, (3, 256, 256), zero_threshold=0.0)
        assert rel(leg.A(x), true.A(x)) == pytest.approx(value, abs=0.005), name


# ------------------------------------------------------------------------------------------ other references
@pytest.mark.parametrize("scale", [2, 4, 8, 16, 32])
def test_avgpool_equals_avg_pool2d(scale):
    op = make_operator("sr_avgpool", (3, 64, 64), scale=scale)
    x = rand((2, 3, 64, 64))
    assert torch.allclose(op.A(x), F.avg_pool2d(x, scale), atol=1e-14)
    up = op.A_pinv(op.A(x))
    assert torch.allclose(up, F.interpolate(F.avg_pool2d(x, scale), scale_factor=scale, mode="nearest"), atol=1e-14)


@pytest.mark.parametrize("scale", [2, 4, 8, 16, 32])
def test_bicubic_equals_strided_conv_with_symmetric_padding(scale):
    h, w = 64, 96
    op = make_operator("sr_bicubic", (3, h, w), scale=scale)
    x = rand((2, 3, h, w))
    k = bicubic_kernel(scale)
    pad = 2 * scale
    xn = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="symmetric")
    xp = torch.from_numpy(xn)[..., scale // 2 :, scale // 2 :]
    k2 = torch.outer(k, k).expand(3, 1, 4 * scale, 4 * scale)
    ref = F.conv2d(xp, k2, stride=scale, groups=3)[..., : h // scale, : w // scale]
    assert rel(op.A(x), ref) < 1e-12
    assert torch.allclose(k, k.flip(0)) and abs(float(k.sum()) - 1) < 1e-12


@pytest.mark.parametrize("weights,expected", [("equal", (1 / 3, 1 / 3, 1 / 3)), ("bt601", (0.299, 0.587, 0.114)),
                                              ([0.2, 0.5, 0.3], (0.2, 0.5, 0.3))])
def test_colorization_is_the_weighted_sum(weights, expected):
    op = make_operator("colorize", (3, 16, 24), luma_weights=weights)
    x = rand((2, 3, 16, 24))
    ref = sum(wc * x[:, c : c + 1] for c, wc in enumerate(expected))
    assert torch.allclose(op.A(x), ref, atol=1e-14)
    gray = op.y_to_image(op.A(x))
    assert gray.shape == x.shape and torch.allclose(gray[:, 0], gray[:, 2])


def test_walsh_hadamard_matches_sylvester_matrix():
    op = make_operator("cs_walsh_hadamard", (1, 4, 8), ratio=4, seed=3)
    h = np.array([[1.0]])
    while h.shape[0] < 32:
        h = np.block([[h, h], [h, -h]])
    h /= math.sqrt(32)
    x = rand((2, 1, 4, 8))
    ref = x.reshape(2, 32).numpy() @ h.T
    sel = op._select.numpy()
    assert np.allclose(op.A(x).reshape(2, -1).numpy(), ref[:, sel], atol=1e-14)
    assert op.measurement_shape == (1, 8)
    other = make_operator("cs_walsh_hadamard", (1, 4, 8), ratio=4, seed=4)
    assert not torch.equal(other._select, op._select)
