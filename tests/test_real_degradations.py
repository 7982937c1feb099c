"""Photos degraded outside deqir (scipy / PIL / JPEG), restored as a user's photos with the embedded default model:
better than the input (SR: than bicubic upscaling); deqir's simulation operator on the same photo is flagged."""
from __future__ import annotations

import sys

import pytest
from app_support import REPO

import deqir

sys.path.insert(0, str(REPO))
from benchmarks.real_degradations import DEGRADATIONS, _t, crops, pil_bicubic_up  # noqa: E402
from deqir.metrics.fidelity import psnr as _psnr  # noqa: E402
from deqir.utils.images import quantize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAST = ["sampler=sequential", "eval=fast"]


def psnr(a, clean) -> float:
    return float(_psnr(quantize(a.clamp(0, 1))[None], clean[None]))


@pytest.fixture(scope="module")
def photo():
    return crops(1, 48, 40)[0][1]  # astronaut, 48 x 40: not square on purpose


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_restoration_beats_its_input(name, photo):
    degrade, task, extra, kind = DEGRADATIONS[name]
    clean, y8 = _t(photo), degrade(photo)
    res = deqir.restore(_t(y8), task=task, overrides=[*FAST, *extra])
    assert res.images.shape[1:] == clean.shape  # the photo's restored size
    # the input to beat: bicubic upscaling (SR), the measured pixels (inpainting: holes are not data), the photo
    reference = {"sr4": lambda: _t(pil_bicubic_up(y8, 4)), "inpaint": lambda: res.inputs[0]}.get(kind, lambda: _t(y8))()
    assert psnr(res.images[0], clean) > psnr(reference, clean) + 0.3, name
    assert not res.stats[0].get("warning"), res.stats[0].get("warning")


def test_the_simulation_operator_on_a_real_blur_is_flagged(photo):
    """The circular operator the simulations use does not fit a reflect-padded blur: said, not silent."""
    degrade, task, extra, _ = DEGRADATIONS["scipy reflect blur"]
    res = deqir.restore(_t(degrade(photo)), task=task, overrides=[*FAST, "dataset.boundary=circular"])
    assert "inconsistent with the input" in res.stats[0]["warning"]


def test_a_damaged_photos_holes_are_not_measurements(photo):
    """Inpainting a user's photo: what is in the holes (here: white paint) changes neither the restoration nor its
    consistency with the photo (Operator.observed keeps only the pixels the mask measures). sigma_y is given: its
    estimate from the whole photo does see the paint (docs/app.md "Your own photos")."""
    import torch

    _, task, _, _ = DEGRADATIONS["JPEG q90, text mask"]
    clean = _t(photo)
    over = [*FAST, "sampler.timesteps=5", "dataset.sigma_y=0.01"]
    plain = deqir.restore(clean, task=task, overrides=over)
    painted = deqir.restore(torch.where(plain.inputs[0] == 0.5, torch.ones_like(clean), clean), task=task,
                            overrides=over)
    assert torch.equal(plain.images, painted.images)
    assert plain.stats[0]["consistency"] == painted.stats[0]["consistency"] < 1.0
    assert not painted.stats[0].get("warning")
