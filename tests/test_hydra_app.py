"""Hydra conventions of invert.py: _target_ trainer/callbacks (unknown keys fail), multirun table, inheritance."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from app_support import TINY, compose_cfg, error_lines, run_cli, run_inprocess


def test_trainer_keys_reach_lightning(tmp_path, capsys):
    """Any Trainer argument can be added; limit_predict_batches=1 restores one of the two images."""
    summary = run_inprocess([*TINY, "+trainer.limit_predict_batches=1",
                             "+callbacks.timer._target_=pytorch_lightning.callbacks.Timer"], tmp_path)
    assert summary["n_images"] == 1
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    # an explicit dataset.size that resizes says so (the 256 px samples at dataset.size=32)
    assert "note: resizing 2 of 2 images (256x256) to 32x32" in capsys.readouterr().out


@pytest.mark.parametrize("override, needle", [("+trainer.no_such_arg=1", "no_such_arg"),
                                              pytest.param("+callbacks.bad._target_=no.such.Class", "callbacks.bad",
                                                           marks=pytest.mark.slow)])
def test_unknown_keys_are_one_line_errors(tmp_path, override, needle):
    proc = run_cli([*TINY, override, f"hydra.run.dir={tmp_path}"], timeout=300)
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]


def test_every_trainer_option_is_a_target_config():
    for name in ("auto", "cpu", "gpu", "ddp", "slurm"):
        tr = compose_cfg([f"trainer={name}"]).trainer
        assert tr._target_ == "pytorch_lightning.Trainer", name


def test_sequential_sampler_inherits_the_deq_chain():
    deq = OmegaConf.to_container(compose_cfg([]).sampler)
    seq = OmegaConf.to_container(compose_cfg(["sampler=sequential", "sampler.etw=0.5"]).sampler)
    assert seq.pop("name") == "sequential" and seq.pop("etw") == 0.5
    assert seq == {k: v for k, v in deq.items() if k not in ("name", "etw")}


def test_multirun_summary_table(tmp_path, capsys):
    from deqir.lit.multirun import MultirunSummary

    for num, (task, psnr) in enumerate([("deblur", 30.0), ("sr4", 25.5), ("colorize", None)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- task={task}\n")
        if psnr is not None:
            (job / "metrics.json").write_text(json.dumps({"psnr": psnr, "n_images": 3, "rounds": 9.0}))
    MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    lines = (tmp_path / "multirun_summary.csv").read_text().splitlines()
    assert lines[0] == "job,overrides,n_images,psnr,rounds,status"
    assert lines[1].startswith("0,task=deblur,3,30.0000") and lines[3].startswith("2,task=colorize,,,")
    assert "task=sr4" in capsys.readouterr().out


def test_multirun_callback_is_configured():
    cfg = compose_cfg([])
    assert cfg.hydra.callbacks.multirun_summary._target_ == "deqir.lit.multirun.MultirunSummary"
