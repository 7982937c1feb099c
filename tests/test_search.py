"""Hyper-parameter search through Hydra's Optuna sweeper (docs/app.md "Search"): the objective, the checks
before any trial, W&B-grouped trials with their sweep outputs, and one study shared by two processes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app_support import REPO, error_lines, run_cli

OPTUNA = ["-m", "hydra/sweeper=optuna", "debug=tiny"]


def _objective(**kw):
    from deqir.lit.search import Objective

    cfg = {"metric": "psnr", "direction": "maximize", "floor": None, "floor_metric": "psnr", "penalty": 1000.0}
    return Objective.from_config({**cfg, **kw})


def test_objective_values_and_the_quality_floor():
    assert _objective().value({"psnr": 27.5, "rounds": 4.0}) == 27.5
    assert _objective(metric="lpips", direction="minimize").value({"psnr": 27.5}) is None  # not measured
    floor = _objective(metric="rounds", direction="minimize", floor=30.0)
    assert floor.value({"psnr": 31.0, "rounds": 6.0}) == 6.0
    missed = floor.value({"psnr": 28.0, "rounds": 2.0})
    assert missed == pytest.approx(1002.0)  # penalty + the 2 dB shortfall: worse than any run above the floor
    assert floor.value({"psnr": 29.0, "rounds": 2.0}) < missed  # nearer the floor is better
    up = _objective(metric="ssim", floor=30.0)
    assert up.value({"psnr": 28.0, "ssim": 0.9}) == pytest.approx(-1002.0)


@pytest.mark.parametrize("bad, match", [({"metric": "psnrr"}, "objective.metric=psnrr is not a metric"),
                                        ({"direction": "up"}, "maximize or minimize"),
                                        ({"floor_metric": "dB"}, "objective.floor_metric=dB")])
def test_bad_objective_is_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        _objective(**bad)


def _check(overrides: list[str], sweep: list[str] | None = None, params: dict | None = None):
    """check_search on the config ``python invert.py -m hydra/sweeper=optuna OVERRIDES SWEEP`` composes
    (``params``: ``hydra.sweeper.params``, as a preset sets them)."""
    from omegaconf import open_dict, read_write

    from app_support import compose_cfg
    from deqir.lit.search import check_search

    cfg = compose_cfg(["hydra/sweeper=optuna", "debug=tiny", *overrides])
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [*cfg.hydra.overrides.task, *(sweep or ["sampler.timesteps=range(3,5)"])]
        cfg.hydra.overrides.hydra = [o for o in overrides if o.startswith("hydra.")]
        if params:
            cfg.hydra.sweeper.params = params
    return check_search(cfg), cfg


def test_objective_that_is_not_a_metric_is_refused():
    with pytest.raises(ValueError, match="objective.metric=psnrr is not a metric of metrics.json"):
        _check(["objective.metric=psnrr"])


def test_search_space_on_a_missing_key_is_refused():
    with pytest.raises(ValueError, match="the search space names sampler.timestepz, which is not a key.*timesteps"):
        _check([], sweep=["sampler.timestepz=range(3,5)"])
    with pytest.raises(ValueError, match="names eta"):  # hydra.sweeper.params count too
        _check([], sweep=[], params={"eta": "interval(0,1)"})
    _check([], sweep=["task=deblur,sr4", "sampler.skip_type=choice(uniform,quad)", "+new_key=choice(1,2)"])


def test_sweeper_direction_follows_the_objective_unless_given():
    from deqir.lit.search import sweeper_directions

    _, cfg = _check(["objective.metric=lpips", "objective.direction=minimize", "eval=default"])
    assert sweeper_directions(cfg.hydra.sweeper) == ["minimize"]
    _, cfg = _check([])
    assert sweeper_directions(cfg.hydra.sweeper) == ["maximize"]  # the plugin's default (minimize) follows the objective
    with pytest.raises(ValueError, match="disagrees with objective.direction=maximize"):
        _check(["hydra.sweeper.direction=minimize"])
    with pytest.raises(ValueError, match="eval.lpips is null"):
        _check(["objective.metric=lpips", "objective.direction=minimize"])  # debug=tiny: eval=fast


def test_unreachable_storage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hydra.sweeper.storage=sqlite:///.*cannot be opened"):
        _check([f"hydra.sweeper.storage=sqlite:///{tmp_path}/no/dir/s.db"])
    with pytest.raises(ValueError, match="cannot be opened"):
        _check([f"hydra.sweeper.storage=postgresql://nobody@127.0.0.1:9/none"])
    _check([f"hydra.sweeper.storage=sqlite:///{tmp_path}/ok.db"])  # a reachable one passes


@pytest.mark.slow
def test_unreachable_storage_fails_before_any_trial(tmp_path):
    """The CLI: one error line, exit status 2, and no trial ran (no sweep directory)."""
    sweep = tmp_path / "sweep"
    proc = run_cli([*OPTUNA, "sampler.timesteps=range(3,5)", f"hydra.sweeper.storage=sqlite:///{tmp_path}/no/dir/s.db",
                    f"hydra.sweep.dir={sweep}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: hydra.sweeper.storage=sqlite:///") and "cannot be opened" in lines[0]
    assert not sweep.exists()


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow
def test_optuna_search_logs_each_trial_to_wandb(tmp_path):
    """The documented command: 4 trials, each a W&B run (offline) grouped by the sweep, with its metrics.json;
    the sweep directory holds optimization_results.yaml, multirun_summary.csv and objective.png."""
    sweep = tmp_path / "search"
    proc = run_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4", "sampler.timesteps=range(3,8)",
                    "logger=wandb", "debug=tiny", f"hydra.sweep.dir={sweep}"], env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(sweep)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    values = {}
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["objective"] == metrics["psnr"]  # the default objective: PSNR, maximised
        values[job.name] = metrics["objective"]
        runs = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1
        assert f"search/{job.name}".encode() in runs[0].read_bytes()  # W&B run name = <sweep>/<job>, group = sweep
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(values.values()))
    best_job = max(values, key=values.get)
    overrides = yaml.safe_load((sweep / best_job / ".hydra" / "overrides.yaml").read_text())
    assert f"sampler.timesteps={results['best_params']['sampler.timesteps']}" in overrides
    with open(sweep / "multirun_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"] and all(r["objective"] for r in rows)
    assert (sweep / "objective.png").stat().st_size > 0
    assert "objective (psnr, maximize) over 4 trials" in proc.stdout


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path):
    """Two processes, one Optuna study in a shared storage: every trial runs exactly once (one run directory
    each, its value the study's), and the study's best is the best of all their runs."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs = []
    for k in range(2):
        args = [*OPTUNA, "hydra.sweeper.n_trials=2", "sampler.timesteps=range(3,9)", "sampler.skip_type=choice(uniform,quad)",
                f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
                f"hydra.sweeper.sampler.seed={k}", f"hydra.sweep.dir={tmp_path / f'p{k}'}"]
        procs.append(subprocess.Popen([sys.executable, str(REPO / "invert.py"), *args], cwd=str(REPO), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    runs = []  # (params, objective) of every run directory of both processes
    for k in range(2):
        for job in _jobs(tmp_path / f"p{k}"):
            overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
            params = {"sampler.timesteps": int(overrides["sampler.timesteps"]),
                      "sampler.skip_type": overrides["sampler.skip_type"]}
            runs.append((params, json.loads((job / "metrics.json").read_text())["objective"]))
    assert len(runs) == 4
    unmatched = list(runs)
    for t in trials:  # each trial is exactly one run directory
        match = [r for r in unmatched if r[0] == t.params and r[1] == pytest.approx(t.value)]
        assert match, (t.params, t.value, runs)
        unmatched.remove(match[0])
    best = max(v for _, v in runs)
    assert study.best_value == pytest.approx(best)
    last = yaml.safe_load(max((tmp_path / f"p{k}" / "optimization_results.yaml" for k in range(2)),
                              key=lambda p: p.stat().st_mtime).read_text())
    assert last["best_value"] == pytest.approx(best)  # the process that finished last saw every trial
    for out, _ in outs:  # each process reports the shared study at its end
        assert "study shared: " in out and "trials finished over all processes" in out
