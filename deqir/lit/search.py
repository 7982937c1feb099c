"""Hyper-parameter search: the objective ``invert.py`` returns, checks before any trial, the objective plot.

``python invert.py -m hydra/sweeper=optuna ...`` (Hydra's Optuna sweeper, ``pip install -e '.[search]'``) or a
preset ``hparams_search=...`` (conf/hparams_search/) optimises the value ``invert.py`` returns:
:class:`Objective` (``objective/`` keys of conf/invert.yaml) maps a run's ``metrics.json`` means to one number:

* ``metric`` with ``direction`` (e.g. PSNR, maximise; LPIPS, minimise);
* with ``floor``: a quality floor, e.g. the fewest ``rounds`` among runs with ``floor_metric`` (PSNR) >= ``floor``.
  A run below the floor returns ``penalty + shortfall`` (negated when maximising), worse than every run
  that meets it, and still ordered by how far it missed (so the sampler learns where the floor lies).

:class:`SearchCallback` (``hydra.callbacks.search``) checks, before any trial runs, the objective, that the
sweeper's ``direction`` agrees with it, that every key of the search space exists and that the Optuna storage
opens (one ``error:`` line, exit status 2); a sweeper direction nobody chose (the plugin's default, minimize)
follows ``objective.direction``. At the end it draws ``objective.png`` over the trials (docs/app.md
"Search").
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from deqir.lit.report import MEAN_COLUMNS

#: metrics.json values an objective may use
METRICS = (*MEAN_COLUMNS, "fid", "converged_fraction")
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class Objective:
    """What a search optimises (plain values of ``objective``; the defaults live in conf/invert.yaml only)."""

    metric: str
    direction: str
    floor: float | None
    floor_metric: str
    penalty: float

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Objective:
        known = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(cfg) - known), sorted(known - set(cfg))
        if unknown or missing:
            raise ValueError(f"objective: unknown key(s) {unknown} / missing {missing}; keys: {', '.join(sorted(known))}")
        obj = cls(metric=str(cfg["metric"]), direction=str(cfg["direction"]),
                  floor=None if cfg["floor"] is None else float(cfg["floor"]), floor_metric=str(cfg["floor_metric"]),
                  penalty=float(cfg["penalty"]))
        for key, value in (("metric", obj.metric), ("floor_metric", obj.floor_metric)):
            if value not in METRICS:
                raise ValueError(f"objective.{key}={value} is not a metric of metrics.json; valid: {', '.join(METRICS)}")
        if obj.direction not in DIRECTIONS:
            raise ValueError(f"objective.direction={obj.direction} must be maximize or minimize")
        return obj

    def value(self, summary: dict[str, Any]) -> float | None:
        """The objective of a run's summary; None when the run lacks the metric (e.g. no ground truth)."""
        v = summary.get(self.metric)
        if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            return None
        if self.floor is None:
            return float(v)
        q = summary.get(self.floor_metric)
        if not isinstance(q, (int, float)) or math.isnan(float(q)):
            return None
        if float(q) >= self.floor:
            return float(v)
        missed = self.penalty + (self.floor - float(q))
        return missed if self.direction == "minimize" else -missed


# ------------------------------------------------------------------------------------------- checks
def sweeper_directions(sweeper: Any) -> list[str]:
    """``hydra.sweeper.direction`` as names (a string, an enum name, or a list of them)."""
    raw = sweeper.get("direction") if sweeper is not None else None
    items = list(raw) if isinstance(raw, (list, tuple)) or OmegaConf.is_list(raw) else [raw]
    return [str(getattr(d, "name", d)) for d in items if d is not None]


def search_keys(config: DictConfig) -> list[str]:
    """Keys of the search space: the sweep overrides of the command line and ``hydra.sweeper.params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [str(o) for o in (config.hydra.overrides.get("task") or [])]
    params = config.hydra.sweeper.get("params") or {}
    parsed = OverridesParser.create().parse_overrides(overrides + [f"{k}={v}" for k, v in params.items()])
    keys = []
    for o in parsed:
        if o.is_sweep_override() or o.get_key_element() in params:
            if not (o.is_add() or o.is_force_add()):  # +key adds a key that need not exist
                keys.append(o.key_or_group)
    return keys


def check_keys(config: DictConfig, keys: list[str]) -> None:
    choices = config.hydra.runtime.get("choices") or {}
    missing = object()
    for key in keys:
        if key in choices or OmegaConf.select(config, key, default=missing) is not missing:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        hint = ""
        if parent and isinstance(OmegaConf.select(config, parent, default=None), DictConfig):
            hint = f"; {parent} has: {', '.join(str(k) for k in OmegaConf.select(config, parent).keys())}"
        raise ValueError(f"the search space names {key}, which is not a key of the config{hint}")


def check_storage(storage: Any) -> None:
    """Open the Optuna storage (an RDB URL such as sqlite:///PATH): every process of a study must reach it."""
    if storage is None:
        return
    import optuna

    try:
        for attempt in range(5):
            try:
                optuna.storages.get_storage(str(storage))
                break
            except Exception as err:  # noqa: PERF203
                # two jobs that open a new database at once both create its schema: the loser's CREATE TABLE or
                # version insert fails (IntegrityError, or OperationalError "already exists") while the
                # winner's schema is complete, so opening it again succeeds
                racing = type(err).__name__ == "IntegrityError" or "already exists" in str(err)
                if not racing or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
    except Exception as err:  # any failure to open it (bad URL, missing driver, unreachable server, no such dir)
        text = " ".join(str(err).split())[:300] or type(err).__name__
        raise ValueError(f"hydra.sweeper.storage={storage} cannot be opened ({type(err).__name__}: {text}); use "
                         f"sqlite:///PATH on a file system every job can write, or a database URL "
                         f"(docs/app.md \"Search\")") from None


def check_search(config: DictConfig) -> Objective:
    """Everything a search needs, checked before its first trial (raises ValueError with one line)."""
    objective = Objective.from_config(OmegaConf.to_container(config.objective, resolve=True))  # type: ignore[arg-type]
    sweeper = config.hydra.get("sweeper")
    optuna = "optuna" in str((sweeper or {}).get("_target_", "")).lower()
    if optuna:
        directions = sweeper_directions(sweeper)
        given = any(str(o).lstrip("+").startswith("hydra.sweeper.direction=")
                    for o in (config.hydra.overrides.get("hydra") or []))
        if directions != [objective.direction] and not given:
            # the plugin's default (minimize) was not chosen by anyone: the sweeper follows the objective
            with open_dict(config.hydra.sweeper), read_write(config.hydra.sweeper):
                config.hydra.sweeper.direction = objective.direction
            print(f"note: hydra.sweeper.direction={objective.direction} (objective.direction, "
                  f"objective.metric={objective.metric})", flush=True)
        elif directions != [objective.direction]:
            raise ValueError(f"hydra.sweeper.direction={','.join(directions)} disagrees with objective.direction="
                             f"{objective.direction} (objective.metric={objective.metric}): set both the same")
    if objective.metric == "lpips" or (objective.floor_metric == "lpips" and objective.floor is not None):
        if OmegaConf.select(config, "eval.lpips") is None:
            raise ValueError("the objective uses lpips but eval.lpips is null: choose eval=default (or set eval.lpips)")
    if "psnr_to_sequential" in (objective.metric, objective.floor_metric if objective.floor is not None else ""):
        if not OmegaConf.select(config, "eval.compare_sequential", default=False):
            raise ValueError("the objective uses psnr_to_sequential: set eval.compare_sequential=true")
    check_keys(config, search_keys(config))
    if optuna:
        check_storage(sweeper.get("storage"))
    return objective


# ------------------------------------------------------------------------------------------- the plot
def trial_values(sweep_dir: Path) -> list[tuple[int, float | None]]:
    """(job number, objective) of every job directory of a sweep, from its metrics.json (None: failed)."""
    out = []
    for job in sweep_dir.iterdir():
        if job.is_dir() and job.name.isdigit() and (job / ".hydra").is_dir():
            metrics = job / "metrics.json"
            value = json.loads(metrics.read_text()).get("objective") if metrics.is_file() else None
            out.append((int(job.name), None if value is None else float(value)))
    return sorted(out)


def write_objective_plot(sweep_dir: Path, values: list[tuple[int, float | None]], objective: Objective) -> Path | None:
    """``objective.png``: each trial's objective and the best so far."""
    from deqir.lit.report import _figure, _save

    done = [(k, v) for k, v in values if v is not None]
    if not done:
        return None
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([k for k, _ in done], [v for _, v in done], "o", markersize=4, label="trial")
    best, running = [], None
    pick = max if objective.direction == "maximize" else min
    for _, v in done:
        running = v if running is None else pick(running, v)
        best.append(running)
    ax.step([k for k, _ in done], best, where="post", linewidth=1.5, label=f"best so far ({objective.direction})")
    what = objective.metric + (f" ({objective.floor_metric} >= {objective.floor:g}, else penalised)"
                               if objective.floor is not None else "")
    ax.set(title=f"objective: {what}", xlabel="trial (job number)", ylabel=objective.metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, sweep_dir / "objective.png")


class SearchCallback(Callback):
    """``hydra.callbacks.search``: checks a multirun before its first job, plots the objective at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_search(config)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        objective = Objective.from_config(OmegaConf.to_container(config.objective, resolve=True))  # type: ignore[arg-type]
        values = trial_values(sweep_dir)
        path = write_objective_plot(sweep_dir, values, objective)
        if path is not None:
            print(f"objective ({objective.metric}, {objective.direction}) over {len(values)} trials -> {path}", flush=True)
        sweeper = config.hydra.get("sweeper") or {}
        if sweeper.get("storage") is not None and sweeper.get("study_name") is not None:
            print(study_line(str(sweeper.storage), str(sweeper.study_name)), flush=True)


def study_line(storage: str, study_name: str) -> str:
    """The shared study as every process sees it now (trials of all processes)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    if not done:
        return f"study {study_name}: no finished trial yet ({running} running)"
    best = study.best_trial
    return (f"study {study_name}: {len(done)} trials finished over all processes ({running} still running), best "
            f"{best.value:.6g} (trial {best.number}: {best.params})")
