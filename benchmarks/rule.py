"""Config labels and the rule that changes a task's default (README "Defaults chosen by measurement").

Simulated photos (``benchmarks/defaults.py``'s cache) choose; photos degraded outside deqir
(``benchmarks/real_degradations.py --json``, per-image results) can veto: a candidate whose paired PSNR on such
photos is below the current default's (95 % interval below 0) is not chosen.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.stats import paired

#: short config keys -> invert.py keys
SHORT = {"skip_type": "sampler.skip_type", "t_start": "sampler.t_start", "rho": "sampler.rho", "T": "sampler.timesteps"}


def overrides_of(config: str) -> list[str]:
    """``skip_type=quad,eta=0.5`` -> invert.py overrides (``default`` alone: none)."""
    out: list[str] = []
    for part in [p for p in config.split(",") if p and p != "default"]:
        key, _, value = part.partition("=")
        if not value:
            raise ValueError(f"config part {part!r} must be key=value (e.g. skip_type=quad); config: {config!r}")
        if key == "eta":
            out += [f"sampler.etw={value}", f"sampler.nw={value}"]
        elif key == "chain":
            out.append(f"chain={value}")
        else:
            out.append(f"{SHORT.get(key, key)}={value}")
    return out


def config_key(task: str, overrides: list[str]) -> str:
    """What ``compose_config(task, overrides)`` makes of the sampler, chain and task: equal keys, equal runs."""
    from deqir.api import compose_config

    cfg = compose_config(task, overrides)
    return repr((sorted(cfg.sampler.items()), sorted(cfg.chain.items()), cfg.task))


def current_label(task: str, labels: list[str]) -> str | None:
    """The cached config label that composes to the task's current sampler and chain settings (conf/task/), if any.

    Run before a default changes: afterwards the task's own config is what the old label composes to."""
    now = config_key(task, [])
    same = [lab for lab in labels if lab not in ("default", "baseline") and not lab.startswith("deepinv")
            and config_key(task, overrides_of(lab)) == now]
    # the most explicit label: a shorter one (skip_type=quad) may have been cached before the task set the rest
    return max(same, key=lambda lab: len(overrides_of(lab)), default=None)


def _explicit_keys(task: str, labels: list[str]) -> dict[str, str]:
    """label -> config key of every explicit deqir label (``default,...`` labels are relative to the default at the
    time they were cached, so they cannot be matched by composition)."""
    return {lab: config_key(task, overrides_of(lab)) for lab in labels
            if not lab.startswith(("default", "baseline", "deepinv"))}


def _at_steps(task: str, keys: dict[str, str], base: list[str], steps: tuple[int, ...]) -> dict[int, str]:
    """Per T in ``steps``, the most explicit label that composes like ``base`` run with T steps, where one exists."""
    out: dict[int, str] = {}
    for T in steps:
        want = config_key(task, base + [f"sampler.timesteps={T}"])
        same = [lab for lab, key in keys.items() if key == want]
        if same:
            out[T] = max(same, key=lambda lab: len(overrides_of(lab)))
    return out


def default_at_steps(task: str, labels: list[str], steps: tuple[int, ...] = (25, 50, 100)) -> dict[int, str]:
    """Per T in ``steps``, the cached label that composes to the task's current default run with T steps
    (``sampler.timesteps=T``), where one exists; only explicit labels count (the most explicit, as in
    :func:`current_label`)."""
    return _at_steps(task, _explicit_keys(task, labels), [], steps)


STEPS = "more steps"


def steps_vetoes(task: str, labels: list[str], current: str | None, per: dict[str, list[dict]],
                 steps: tuple[int, ...] = (50, 100)) -> dict[str, str]:
    """label -> why, for every candidate whose own configuration run with T steps (T in ``steps``, a cached row)
    is below the current default run with the same T (paired PSNR interval below 0; ``per``: per-image rows in one
    photo order): a default is what users scale up with ``sampler.timesteps``. Where either row is missing the
    floor is silent (these rows cost 2-4x a candidate's own)."""
    keys = _explicit_keys(task, [lab for lab in labels if lab in per])
    ref = _at_steps(task, keys, [], steps)
    out: dict[str, str] = {}
    for lab in keys:  # the candidates: explicit labels other than the current default (keys are composed once)
        over = overrides_of(lab)
        if lab == current or any(o.startswith("sampler.timesteps=") for o in over):
            continue
        for T, mine in _at_steps(task, keys, over, tuple(T for T in steps if T in ref)).items():
            d = paired([x["psnr"] for x in per[mine]], [x["psnr"] for x in per[ref[T]]])
            if d["hi"] < 0:
                out[lab] = f"{STEPS}: at T = {T} {d['mean']:+.2f} dB [{d['lo']:+.2f}, {d['hi']:+.2f}] below the default"
                break
    return out


def decide(rows: list[dict], per: dict[str, list[dict]] | None = None, current: str | None = None,
           vetoes: dict[str, str] | None = None) -> dict:
    """The rule for changing a default: among the configs at the default's model evaluations per image, one
    replaces the default only if its PSNR is higher with the paired 95 % interval above 0 and its mean LPIPS is not
    higher; of those, the highest mean PSNR wins. Configs with more evaluations are reported, never chosen.

    Ties (``per``: the per-image results of every row): a passing config whose paired PSNR difference to that
    winner has an interval containing 0 ties with it (the photos cannot tell them apart). Among the tied ones the
    task's ``current`` config (its label: what conf/task/ composes to now) stays; otherwise the config whose worst
    photo loses least against the default wins (robustness over an unresolved mean).

    The real-photo, parallel and steps floors (``vetoes``: label -> why, from :func:`real_vetoes`,
    :func:`parallel_vetoes` and :func:`steps_vetoes`): a config that is worse than the current default on photos
    degraded outside deqir, whose parallel solve stops below 45 dB of its own sequential result, or that is worse
    than the default when both run with more steps, cannot be chosen."""
    default = next((r for r in rows if r["config"] == "default"), None)
    if default is None:
        return {"winner": None, "text": "no default row"}
    passing = [r for r in rows if r["config"] not in ("default", "baseline") and not r["config"].startswith("deepinv")
               and r["work"] <= default["work"] + 1e-9 and "ci_psnr_default" in r
               and r["ci_psnr_default"][0] > 0 and r.get("d_lpips_default", 0.0) <= 0]
    ok = [r for r in passing if r["config"] not in (vetoes or {})]
    if not ok:
        blocked = "; ".join(f"{r['config']} ({vetoes[r['config']]})" for r in passing)
        return {"winner": "default", "text": "keep the default (no config at equal work passes: PSNR interval > 0, "
                                            "LPIPS not higher" + (", the floors" if vetoes else "") + ")"
                                            + (f"; vetoed: {blocked}" if blocked else "")}
    best = max(ok, key=lambda r: r["psnr"])
    tie_note = ""
    if per is not None:
        def psnrs(lab):
            return [float(x["psnr"]) for x in per[lab]]

        tied = [r for r in ok if r is best or paired(psnrs(r["config"]), psnrs(best["config"]))["hi"] >= 0]
        worst = {r["config"]: min(a - b for a, b in zip(psnrs(r["config"]), psnrs("default"))) for r in tied}
        robust = next((r for r in tied if r["config"] == current), None) or max(tied, key=lambda r: worst[r["config"]])
        if robust is not best:
            why = ("the current default stays" if robust["config"] == current else
                   f"worst photo {worst[robust['config']]:+.2f} dB against the default, not {worst[best['config']]:+.2f}")
            tie_note = f"; tied with the highest mean, {best['config']} ({best['psnr']:.2f} dB): {why}"
            best = robust
    if vetoes:
        par = {k: v for k, v in vetoes.items() if v.startswith(PARALLEL)}
        steps = {k: v for k, v in vetoes.items() if v.startswith(STEPS)}
        real = {k: v for k, v in vetoes.items() if k not in par and k not in steps}
        if steps:
            tie_note += "; below the default with more steps: " + "; ".join(
                f"{k} ({v[len(STEPS) + 2:]})" for k, v in steps.items())
        worse = {k: v for k, v in real.items() if v != "not run on them"}
        if worse:
            tie_note += "; below the default on photos degraded outside deqir: " + "; ".join(
                f"{k} ({v})" for k, v in worse.items())
        if len(worse) < len(real):
            tie_note += f"; {len(real) - len(worse)} more config(s) not run on such photos"
        failed = {k: v for k, v in par.items() if v != PARALLEL_NOT_RUN}
        if failed:
            tie_note += "; " + "; ".join(f"{k} ({v})" for k, v in failed.items())
        if len(failed) < len(par):
            tie_note += f"; {len(par) - len(failed)} more config(s) not run in the parallel benchmark"
    lo, hi = best["ci_psnr_default"]
    return {"winner": best["config"], "text": f"switch to {best['config']} (PSNR {best['d_psnr_default']:+.2f} dB "
                                              f"[{lo:+.2f}, {hi:+.2f}], LPIPS {best.get('d_lpips_default', math.nan):+.3f})"
                                              + tie_note}


def _candidates(task: str, labels: list[str], current: str | None):
    """(label, config key) of every label a floor can veto: deqir configs other than the current default."""
    for lab in labels:
        if lab != current and lab not in ("default", "baseline") and not lab.startswith("deepinv"):
            yield lab, config_key(task, overrides_of(lab))


#: parallel_vetoes' reasons start with this
PARALLEL = "parallel solve"
PARALLEL_NOT_RUN = PARALLEL + ": not run"

#: real_degradations.py overrides that do not change the configuration compared (its run settings)
_RUN_ONLY = ("sampler=sequential", "model_dtype=")


def real_vetoes(task: str, labels: list[str], current: str | None, files: list[Path] | None) -> dict[str, str]:
    """label -> why, for every candidate label that ``files`` (real_degradations.py JSON, one run per config via
    ``--override``) show below the task's current default on some degradation of ``task`` (paired PSNR interval
    below 0), or that no file measured while one measured the current default. A file's configuration is its
    ``--override`` list; the current default is the file that composes like ``compose_config(task)``."""
    if not files or current is None:
        return {}
    runs = []  # (config key, {degradation: {photo: psnr}})
    for f in files:
        data = json.loads(Path(f).read_text())
        over = [o for o in data["settings"].get("override") or [] if not o.startswith(_RUN_ONLY)]
        rows = {r["degradation"]: {p["name"]: p["psnr_restored"] for p in r.get("per_image", [])}
                for r in data["rows"] if r["task"] == task}
        if rows:
            runs.append((config_key(task, over), rows))
    now = config_key(task, [])
    base = [rows for key, rows in runs if key == now]
    if not base:
        return {}
    out = {}
    for lab, key in _candidates(task, labels, current):
        if not any(k == key for k, _ in runs):
            out[lab] = "not run on them"  # the floor is checked, not assumed
            continue
        for k, rows in runs:
            if k != key:
                continue
            for deg, photos in rows.items():
                ref = base[0].get(deg, {})
                names = [n for n in photos if n in ref]
                if len(names) < 2:
                    continue
                d = paired([photos[n] for n in names], [ref[n] for n in names])
                if d["hi"] < 0:
                    out[lab] = f"{deg}: {d['mean']:+.2f} dB [{d['lo']:+.2f}, {d['hi']:+.2f}], {len(names)} photos"
    return out


def parallel_vetoes(task: str, labels: list[str], current: str | None, files: list[Path] | None,
                    floor_db: float = 45.0, T: int = 25) -> dict[str, str]:
    """label -> why, for every candidate label whose quasi-Newton solve (``benchmarks/parallel_defaults.py --json``
    at ``T``, per image; a row's configuration is its ``--override`` list) stops below ``floor_db`` of its own
    sequential result on some photo, or that no file ran while the files ran the task (the floor is checked, not
    assumed). Files run with ``--solver-options`` solve differently and are skipped; the current default is exempt
    (it is what a vetoed candidate falls back to)."""
    if not files or current is None:
        return {}
    runs = []  # (config key, [(photo, dB to sequential at the stop)])
    for f in files:
        data = json.loads(Path(f).read_text())
        if (data.get("args") or {}).get("solver_options"):
            continue
        for r in data["rows"]:
            if r["task"] == task and int(r.get("T", T)) == T and r.get("per_image"):
                over = [] if r["config"] == "default" else r["config"].split()
                runs.append((config_key(task, over), [(p["name"], float(p["psnr_seq"])) for p in r["per_image"]]))
    if not runs:
        return {}
    out = {}
    for lab, key in _candidates(task, labels, current):
        mine = [photos for k, photos in runs if k == key]
        if not mine:
            out[lab] = PARALLEL_NOT_RUN
            continue
        low = [(n, v) for photos in mine for n, v in photos if v < floor_db]
        if low:
            n, v = min(low, key=lambda x: x[1])
            out[lab] = f"{PARALLEL} stops {v:.1f} dB from its sequential result ({n}; {len(low)} photo(s) below {floor_db:g})"
    return out
