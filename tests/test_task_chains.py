"""Tasks that recommend a chain (conf/task/*.yaml, measured in README "Every chain") and the command line wins."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
RECOMMENDED = {"inpaint_box": "ddnm", "cs2": "pigdm", "deblur": "ddnm", "sr4": "ddnm", "sr_avgpool4": "ddnm",
               "inpaint_random": "ddnm", "inpaint_text": "ddnm", "denoise": "ddnm", "colorize": "ddnm"}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="invert", overrides=overrides), resolve=False)


@pytest.mark.parametrize("task", sorted(RECOMMENDED))
def test_task_recommends_its_measured_chain(task):
    assert _compose([f"task={task}"])["chain"]["name"] == RECOMMENDED[task]


@pytest.mark.parametrize("order", ["before", "after"])
def test_command_line_chain_wins(order):
    over = ["task=cs2", "chain=ddnm"] if order == "after" else ["chain=ddnm", "task=cs2"]
    cfg = _compose(over)
    assert cfg["chain"] == {"name": "ddnm"} and cfg["task"]["name"] == "cs_walsh_hadamard"
    cfg = _compose(["task=cs2", "chain=ddrm", "chain.eta=0.5"])
    assert cfg["chain"]["name"] == "ddrm" and cfg["chain"]["eta"] == 0.5
    assert cfg["solver"]["name"] == "auto" and cfg["sampler"]["clip_x0"] is True and cfg["sampler"]["t_start"] == 300  # the task's other presets stay


def test_optimize_init_runs_on_a_pigdm_task():
    from deqir.lit.builders import optimization_kwargs

    assert "optimization" in optimization_kwargs("optimize_init", _compose(["task=cs2", "mode=optimize_init"]),
                                                 (3, 16, 16))


def test_box_inpainting_tightens_the_quasi_newton_slot_tolerance():
    """conf/task/inpaint_box.yaml (and inpaint_text.yaml, for its noise weight 0.7, and the two 4x SR tasks) set
    quasi_newton's slot tolerance (docs/solvers.md "Box inpainting", "Super-resolution's slot tolerance"), only there, only for quasi_newton / auto, and the command line
    still wins."""
    from deqir.api import compose_config

    box = compose_config("inpaint_box")
    assert box.task.quasi_newton_tol == box.solver.tol == 0.005
    assert compose_config("inpaint_random").solver.tol == compose_config().solver.tol == 0.02
    assert compose_config("inpaint_text").solver.tol == 0.01
    for sr in ("sr4", "sr_avgpool4"):  # 24 photos: 2 stopped 39.8-44.2 dB from the sequential result with 0.02
        assert compose_config(sr).task.quasi_newton_tol == compose_config(sr).solver.tol == 0.01
    assert compose_config("inpaint_box", ["solver=quasi_newton"]).solver.tol == 0.005
    assert compose_config("inpaint_box", ["solver.tol=0.05"]).solver.tol == 0.05
    assert compose_config("inpaint_box", ["solver=anderson"]).solver.tol == 1e-3  # another solver's own tolerance
    assert compose_config("deblur", ["+task.quasi_newton_tol=0.01"]).solver.tol == 0.01
