"""Every config group of invert.py composes; tasks build their operator; SLURM/submitit and sweep files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf, open_dict

from app_support import CONF, REPO, compose_cfg, run_cli

GROUPS = ("task", "dataset", "model", "sampler", "solver", "gradient", "eval", "logger", "trainer", "experiment",
          "debug")


def plain(cfg) -> dict:
    """The job config (without the hydra node) as resolved plain values."""
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    np.save(d / "kernel.npy", np.ones((3, 3)) / 9)
    mask = np.ones((64, 64))
    mask[20:30] = 0
    np.save(d / "mask.npy", mask)
    return d


EXTRA = {  # options with mandatory values (???): what a user would pass
    ("task", "deblur_kernel"): lambda d: [f"task.params.kernel_path={d}/kernel.npy"],
    ("task", "inpaint_mask"): lambda d: [f"task.params.mask_path={d}/mask.npy"],
    ("dataset", "folder"): lambda d: [f"dataset.path={d}"],
    ("dataset", "real"): lambda d: [f"dataset.path={d}"],
}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, user_files):
    extra = EXTRA.get((group, option), lambda d: [])(user_files)
    cfg = compose_cfg([f"{group}={option}", *extra])
    plain_cfg = plain(cfg)
    assert plain_cfg["mode"] == "restore"
    assert plain_cfg["trainer"]["inference_mode"] is False
    if group == "task":
        from deqir.lit.builders import build_operator

        op = build_operator(plain_cfg["task"], (3, 64, 64))
        assert tuple(op.image_shape) == (3, 64, 64)
        assert plain_cfg["task"]["sigma_y"] >= 0
    if group in ("sampler", "solver"):
        from deqir.lit.builders import chain_settings

        chain = chain_settings(plain_cfg["sampler"], plain_cfg["solver"])
        assert chain.max_iter >= 1


def test_task_defaults_follow_the_paper():
    deblur = compose_cfg([])
    assert OmegaConf.to_container(deblur.task) == {
        "name": "deblur_gauss", "params": {"kernel_size": 5, "sigma": 10.0, "legacy_svd": False}, "sigma_y": 0.0}
    assert compose_cfg(["task=sr4"]).task.params.scale == 4
    assert compose_cfg(["task=denoise"]).task.sigma_y == 0.1
    auto = compose_cfg([]).solver  # the default: quasi_newton with a device-measured schedule (docs/solvers.md)
    assert (auto.name, auto.stop_mode, auto.tol, auto.window, auto.history_size, auto.output_tol, auto.slot_floor,
            auto.knee_factor, auto.max_iter) == ("auto", "noise", 0.02, None, 4, 0.5, None, 1.5, None)
    assert compose_cfg([]).sampler.init == "surrogate"
    solver = compose_cfg(["solver=anderson"]).solver  # the official constants, up to 30 rounds (measured, README)
    assert (solver.name, solver.history_size, solver.lam, solver.beta, solver.max_iter, solver.tol, solver.stop_mode,
            solver.mixing) == ("anderson", 5, 1e-3, 1.0, 30, 1e-3, "rel", "image")
    official = compose_cfg(["solver=anderson_official"]).solver  # the paper's sampler constants
    assert (official.history_size, official.lam, official.beta, official.max_iter, official.tol) == (5, 1e-3, 1.0, 15, 1e-3)
    cfg = compose_cfg([])
    assert (cfg.dataset.name, cfg.model.name, cfg.sampler.name, cfg.logger.get("_target_", "").split(".")[-1],
            cfg.sampler.timesteps) == ("samples", "default", "deq", "CSVLogger", 25)


def test_official_readme_experiment():
    cfg = compose_cfg(["experiment=deqir_celeba_deblur", "dataset.path=/data/celeba_hq"])
    assert cfg.task.name == "deblur_gauss" and cfg.task.params.legacy_svd is True
    assert (cfg.sampler.timesteps, cfg.sampler.etw, cfg.sampler.nw) == (25, 0.1, 0.0)
    assert cfg.model.name == "celeba_hq_ddpm" and cfg.dataset.subset == "every_10th"
    assert (cfg.solver.mixing, cfg.solver.return_value, cfg.solver.select) == ("slot", "x", "last")


@pytest.mark.parametrize("override", ["task=deblurr", "solver=newtonn", "sampler=ddim", "trainer=tpu"])
def test_unknown_options_fail_with_the_valid_list(override):
    with pytest.raises((ConfigCompositionException, MissingConfigException)) as info:
        compose_cfg([override])
    group = override.split("=")[0]
    assert "Available options" in str(info.value) or all(o in str(info.value) for o in options(group)[:2])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_slurm_launcher_parameters(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cfg(["hydra/launcher=submitit_slurm", "trainer=slurm", "trainer.num_nodes=3", "trainer.devices=4",
                       "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("SlurmLauncher")
    lc = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    tr = plain(cfg)["trainer"]
    assert (lc["nodes"], lc["tasks_per_node"], lc["gpus_per_node"]) == (3, 4, 4)
    assert (tr["num_nodes"], tr["devices"], tr["strategy"], tr["accelerator"]) == (3, 4, "ddp", "gpu")
    # the sbatch script submitit would submit (same parameter translation as the hydra launcher)
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in lc.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    executor = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm", slurm_max_num_timeout=lc["max_num_timeout"])
    executor.update_parameters(**params)
    script = executor._executor._make_submission_file_text("python invert.py", "uid")
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=60"):
        assert line in script, line
    assert "srun" in script


def test_sweep_files_are_valid_overrides():
    sweeps = sorted((REPO / "sweeps").glob("*.yaml"))
    assert len(sweeps) >= 3
    for path in sweeps:
        spec = yaml.safe_load(path.read_text())
        assert spec["program"] == "invert.py" and "${args_no_hyphens}" in spec["command"]
        assert spec["metric"]["name"].startswith("metrics/")
        overrides = []
        for key, p in spec["parameters"].items():
            value = p["value"] if "value" in p else p["values"][0] if "values" in p else p["min"]
            overrides.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        compose_cfg(overrides)  # every swept key exists (no '+' needed)


@pytest.mark.slow
def test_help_lists_the_groups():
    proc = run_cli(["--help"], timeout=120)
    assert proc.returncode == 0
    for group in ("task:", "dataset:", "sampler:", "solver:", "trainer:", "logger:", "experiment:", "gradient:"):
        assert group in proc.stdout
    assert "deblur_aniso" in proc.stdout and "submitit" not in proc.stdout.split("== Config ==")[0].split("task:")[0]


def test_signature_ignores_what_does_not_change_results():
    from deqir.lit.builders import signature

    a = plain(compose_cfg([]))
    b = plain(compose_cfg(["batch_size=4", "trainer=ddp", "logger=none", "parallel.timesteps=true",
                           "dataset.limit=1", "num_workers=2", "eval.fid=true"]))
    assert signature(a) == signature(b)
    c = plain(compose_cfg(["sampler.etw=0.2"]))
    assert signature(a) != signature(c)


def test_single_lightning_namespace():
    files = [REPO / "invert.py", *sorted((REPO / "deqir" / "lit").glob("*.py"))]
    for f in files:
        text = Path(f).read_text()
        assert "import lightning" not in text and "from lightning" not in text, f
