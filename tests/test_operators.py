"""Property tests of every degradation operator (deqir.operators), parametrised over one list of cases.

Identities (float64): A A+ A = A, A+ A A+ = A+, P idempotent, (I - P) A+ = 0, adjointness, orthogonality of
V and U, batch-size agnosticism, float32 / .to() round trips, noise conventions.
"""
from __future__ import annotations

import math

import pytest
import torch

from deqir.operators import (
    OPERATOR_NAMES,
    GeneralLinearOperator,
    Operator,
    SVDOperator,
    make_operator,
)

SIZES = [(32, 32), (24, 40), (64, 64)]
BATCH = 2
_NONSYM_KERNEL = [[0.0, 1.0, 2.0, 0.5, 0.0], [1.0, 3.0, 1.0, 0.0, 0.2], [0.0, 0.5, 4.0, 1.0, 0.0],
                  [0.3, 0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.5, 0.0, 1.0], [0.1, 0.2, 0.0, 0.0, 0.0],
                  [0.0, 0.0, 0.3, 0.0, 0.0]]  # 7 x 5, not symmetric, not separable


def _custom_forward(x: torch.Tensor) -> torch.Tensor:
    """A user operator without an SVD: a mild horizontal circular smear, then every other row."""
    return (x + 0.3 * torch.roll(x, 1, dims=-1))[..., ::2, :]


# One list of operator cases: id -> (make_operator name, params). "general_cg" is built directly.
CASES: dict[str, tuple[str, dict]] = {
    "sr_bicubic": ("sr_bicubic", {"scale": 4}),
    "sr_bicubic_x8": ("sr_bicubic", {"scale": 8}),
    "sr_avgpool": ("sr_avgpool", {"scale": 4}),
    "sr_avgpool_x8": ("sr_avgpool", {"scale": 8}),
    "deblur_gauss": ("deblur_gauss", {}),
    "deblur_uniform": ("deblur_uniform", {}),
    "deblur_aniso": ("deblur_aniso", {}),
    "deblur_kernel": ("deblur_kernel", {"kernel": _NONSYM_KERNEL}),
    "deblur_gauss_legacy": ("deblur_gauss", {"legacy_svd": True}),
    "deblur_aniso_legacy": ("deblur_aniso", {"legacy_svd": True}),
    "deblur_uniform_zero": ("deblur_uniform", {"boundary": "zero"}),
    "inpaint_text": ("inpaint", {"mask_type": "text"}),
    "inpaint_random": ("inpaint", {"mask_type": "random", "missing_ratio": 0.7, "seed": 3}),
    "colorize": ("colorize", {}),
    "colorize_bt601": ("colorize", {"luma_weights": "bt601"}),
    "cs_walsh_hadamard": ("cs_walsh_hadamard", {"ratio": 4}),
    "denoise": ("denoise", {}),
    "compose": ("compose", {"operators": [{"name": "colorize"}, {"name": "inpaint", "mask_type": "box"}]}),
    "general_cg": ("general", {}),
}
_POW2_ONLY = {"cs_walsh_hadamard"}
PARAMS = [(case, size) for case in CASES for size in SIZES
          if not (case in _POW2_ONLY and math.log2(size[0] * size[1]) % 1)]
IDS = [f"{c}-{h}x{w}" for c, (h, w) in PARAMS]
_CACHE: dict[tuple, Operator] = {}


def build(case: str, size: tuple[int, int], channels: int = 3) -> Operator:
    key = (case, size, channels)
    if key not in _CACHE:
        name, params = CASES[case]
        shape = (channels, *size)
        if name == "general":
            _CACHE[key] = GeneralLinearOperator(_custom_forward, shape, max_iter=300, tol=1e-13)
        else:
            _CACHE[key] = make_operator(name, shape, **params)
    return _CACHE[key]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _tol(case: str) -> float:
    return 1e-8 if case == "general_cg" else 1e-11


def _x(op: Operator, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((BATCH, *op.image_shape), generator=g, dtype=torch.float64).to(dtype)


def _y(op: Operator, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((BATCH, *op.measurement_shape), generator=g, dtype=torch.float64)


def test_cases_cover_every_operator_name():
    # "generate" measures nothing (empty y): its identities are checked in test_unconditional_operator
    assert {name for name, _ in CASES.values()} >= set(OPERATOR_NAMES) - {"generate"}


def test_unconditional_operator():
    op = make_operator("generate", (3, 8, 12))
    x = _x(op)
    y = op.measure(x, 0.1, generator=torch.Generator().manual_seed(0))
    assert y.shape == (BATCH, 0) and op.measurement_shape == (0,)
    assert torch.equal(op.A_pinv(y), torch.zeros_like(x)) and torch.equal(op.A_adjoint(y), torch.zeros_like(x))
    assert torch.equal(op.project_null(x), x) and torch.equal(op.project_range(x), torch.zeros_like(x))
    assert rel(op.V(op.V_T(x)), x) < 1e-15 and op.singulars().numel() == 0 and op.pinv_noise_gain() == 0.0
    with pytest.raises(ValueError, match="measurements have shape"):
        op.A_pinv(torch.zeros(BATCH, 3))


@pytest.mark.parametrize("case,size", PARAMS, ids=IDS)
def test_pseudo_inverse_identities(case, size):
    op = build(case, size)
    x, y = _x(op), _y(op)
    ax = op.A(x)
    assert ax.shape == (BATCH, *op.measurement_shape)
    assert rel(op.A(op.A_pinv(ax)), ax) < _tol(case)  # A A+ A = A
    py = op.A_pinv(y)
    assert py.shape == (BATCH, *op.image_shape)
    assert rel(op.A_pinv(op.A(py)), py) < _tol(case)  # A+ A A+ = A+
    px = op.project_range(x)
    assert rel(op.project_range(px), px) < _tol(case)  # P idempotent
    assert float(op.project_null(py).norm()) < _tol(case) * float(py.norm())  # (I - P) A+ = 0
    assert rel(op.project_null(x) + px, x) < 1e-12


@pytest.mark.parametrize("case,size", PARAMS, ids=IDS)
def test_adjoint(case, size):
    op = build(case, size)
    x, y = _x(op), _y(op)
    lhs = (op.A(x) * y).sum()
    rhs = (x * op.A_adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-11 * float(x.norm() * y.norm())


@pytest.mark.parametrize("case,size", [p for p in PARAMS if p[0] != "compose" and p[0] != "general_cg"],
                         ids=[i for p, i in zip(PARAMS, IDS) if p[0] not in ("compose", "general_cg")])
def test_svd_contract(case, size):
    op = build(case, size)
    assert isinstance(op, SVDOperator)
    x, y = _x(op), _y(op)
    z = op.V_T(x)
    d = math.prod(op.image_shape)
    assert z.shape == (BATCH, d)
    assert rel(op.V(z), x) < 1e-12  # V V^T = I
    assert abs(float(z.norm() - x.norm())) < 1e-12 * float(x.norm())  # V^T isometric
    zz = _x(op, seed=5).reshape(BATCH, -1)
    assert rel(op.V_T(op.V(zz)), zz) < 1e-12  # V^T V = I
    s = op.singulars()
    m = s.numel()
    assert s.ndim == 1 and m <= d and bool((s >= 0).all())
    w = torch.randn(BATCH, m, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert rel(op.U_T(op.U(w)), w) < 1e-12  # U^T U = I
    uy = op.U(op.U_T(y))
    assert abs(float(uy.norm() ** 2 + (y - uy).norm() ** 2 - y.norm() ** 2)) < 1e-10 * float(y.norm()) ** 2
    assert rel(op.U(s.to(z) * z[:, :m]), op.A(x)) < 1e-12  # A = U diag(s) V^T


@pytest.mark.parametrize("case,size", PARAMS, ids=IDS)
def test_batch_agnostic_and_shapes(case, size):
    op = build(case, size)
    x = _x(op)
    big = torch.cat([x, x.flip(0), 2 * x], dim=0)  # batch 6 with repeated images
    ab = op.A(big)
    assert torch.allclose(ab[:BATCH], op.A(x), atol=1e-12)
    assert torch.allclose(ab[BATCH : 2 * BATCH], op.A(x).flip(0), atol=1e-12)
    one = op.A_pinv(op.A(x[:1]))
    assert torch.allclose(op.A_pinv(ab)[:1], one, atol=1e-9)
    assert op.y_to_image(op.A(x)).shape == x.shape
    # observed(): a measurement is its own observation, and any picture's observation is one (A A+ on it for masks)
    assert torch.allclose(op.observed(op.A(x)), op.A(x), atol=1e-9)
    junk = torch.randn_like(op.A(x))
    assert torch.allclose(op.observed(op.observed(junk)), op.observed(junk), atol=1e-12)


@pytest.mark.parametrize("case,size", [p for p in PARAMS if p[1] == (32, 32)],
                         ids=[i for p, i in zip(PARAMS, IDS) if p[1] == (32, 32)])
def test_float32_matches_float64(case, size):
    op = build(case, size)
    x = _x(op)
    y64 = op.project_range(x)
    y32 = op.project_range(x.float())
    assert y32.dtype == torch.float32
    tol = 2e-3 if "legacy" in case or case == "general_cg" else 2e-4
    assert rel(y32.double(), y64) < tol


@pytest.mark.parametrize("case", ["sr_bicubic", "deblur_gauss", "deblur_aniso_legacy", "inpaint_text",
                                  "colorize", "cs_walsh_hadamard", "compose"])
def test_module_to_dtype(case):
    op = make_operator(*CASES[case][:1], (3, 32, 32), **CASES[case][1])
    x = _x(op, dtype=torch.float32)
    ref = op.A(x.double())
    op32 = op.to(torch.float32)
    assert all(b.dtype != torch.float64 for b in op32.buffers())
    y = op32.A(x)
    assert y.dtype == torch.float32
    assert rel(y.double(), ref) < 1e-5
    assert op32.A_pinv(y).dtype == torch.float32


@pytest.mark.parametrize("case", [c for c in CASES if c not in _POW2_ONLY])
def test_rejects_wrong_image_shape(case):
    op = build(case, (32, 32))
    with pytest.raises(ValueError, match="built for images of shape"):
        op.A(torch.zeros(1, 3, 24, 40, dtype=torch.float64))


@pytest.mark.parametrize("case,size", [p for p in PARAMS if p[1] == (32, 32)],
                         ids=[i for p, i in zip(PARAMS, IDS) if p[1] == (32, 32)])
def test_pinv_noise_gain_matches_its_definition(case, size):
    """sqrt(E|A+ n|^2 / E|A+ A w|^2), checked against a direct Monte-Carlo estimate."""
    op = build(case, size)
    gain = op.pinv_noise_gain()
    g = torch.Generator().manual_seed(7)
    n = torch.randn((16, *op.measurement_shape), generator=g, dtype=torch.float64)
    w = torch.randn((16, *op.image_shape), generator=g, dtype=torch.float64)
    estimate = float(op.A_pinv(n).pow(2).sum() / op.project_range(w).pow(2).sum()) ** 0.5
    assert gain > 0
    assert abs(gain - estimate) < 0.1 * estimate


@pytest.mark.parametrize("case,expected", [("sr_avgpool", 4.0), ("sr_avgpool_x8", 8.0), ("inpaint_text", 1.0),
                                           ("denoise", 1.0), ("cs_walsh_hadamard", 1.0), ("colorize", 3**0.5)])
def test_pinv_noise_gain_known_values(case, expected):
    assert build(case, (32, 32)).pinv_noise_gain() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("case", ["sr_bicubic", "deblur_gauss", "inpaint_random", "cs_walsh_hadamard", "compose"])
def test_measure_noise_convention(case):
    """sigma_y is on the [0, 1] scale: the [-1, 1] data see std 2 sigma_y; seeded and dtype independent."""
    op = build(case, (64, 64))
    x = _x(op)
    y = op.measure(x, 0.05, generator=torch.Generator().manual_seed(11))
    noise = y - op.A(x)
    if case in ("inpaint_random", "compose"):  # noise only on observed entries
        keep = op.A(torch.ones_like(x)) != 0
        assert float(noise[~keep].abs().max()) == 0.0
        noise = noise[keep]
    assert float(noise.std()) == pytest.approx(0.1, rel=0.05)
    y32 = op.measure(x.float(), 0.05, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(y32.double(), y, atol=1e-5)
    again = op.measure(x, 0.05, generator=torch.Generator().manual_seed(11))
    assert torch.equal(again, y)
    assert torch.equal(op.measure(x, 0.0), op.A(x))


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf"), "a lot"])
def test_measure_rejects_bad_sigma(sigma):
    op = build("denoise", (32, 32))
    with pytest.raises(ValueError, match=r"sigma_y must be"):
        op.measure(torch.zeros(1, 3, 32, 32), sigma)


def test_operators_work_under_inference_mode_and_keep_gradients():
    op = build("deblur_aniso", (32, 32))
    x = _x(op).requires_grad_(True)
    op.project_null(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.inference_mode():
        assert op.project_range(_x(op)).shape == (BATCH, 3, 32, 32)
        gen = build("general_cg", (32, 32))
        assert gen.A_pinv(gen.A(_x(gen))).shape == (BATCH, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", [c for c in CASES if c != "general_cg"])
def test_cuda_matches_cpu(case):
    op = make_operator(CASES[case][0], (3, 32, 32), **CASES[case][1])
    x = _x(op, dtype=torch.float32)
    ref = op.project_range(x.double())
    opc = op.to("cuda")
    out = opc.project_range(x.cuda())
    assert out.device.type == "cuda"
    assert rel(out.double().cpu(), ref) < 2e-3
    y = opc.measure(x.cuda(), 0.1, generator=torch.Generator().manual_seed(0))
    y_cpu = op.to("cpu").measure(x, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y.cpu(), y_cpu, atol=1e-4)
