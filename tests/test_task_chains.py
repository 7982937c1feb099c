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
