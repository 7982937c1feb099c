"""The rule that changes a task's default (benchmarks/rule.py; README "Defaults chosen by measurement")."""
from __future__ import annotations

import json
import sys

from app_support import REPO

sys.path.insert(0, str(REPO))
from benchmarks.rule import (PARALLEL_NOT_RUN, STEPS, current_label, decide, default_at_steps,  # noqa: E402
                            parallel_vetoes, real_vetoes, steps_vetoes)
from benchmarks.stats import paired  # noqa: E402


def _rows(per: dict[str, list[float]], lpips: dict[str, float] | None = None) -> list[dict]:
    """Report rows (means and paired differences to "default") from per-image PSNRs."""
    rows = []
    for lab, vals in per.items():
        r = {"config": lab, "psnr": sum(vals) / len(vals), "work": 25.0, "lpips": (lpips or {}).get(lab, 0.1)}
        if lab != "default":
            d = paired(vals, per["default"])
            r["d_psnr_default"], r["ci_psnr_default"] = d["mean"], (d["lo"], d["hi"])
            r["d_lpips_default"] = r["lpips"] - (lpips or {}).get("default", 0.1)
        rows.append(r)
    return rows


BASE = [30.0, 31.0, 29.0, 32.0, 30.5, 28.0]
PER = {
    "default": BASE,
    "a": [x + 1.0 + 0.01 * i for i, x in enumerate(BASE)],                 # +1.0, every photo better
    "b": [x + 1.05 + (0.3 if i % 2 else -0.3) for i, x in enumerate(BASE)],  # the highest mean, photos +0.75 only
    "c": [x + 0.3 for x in BASE],                                          # better, but clearly below a and b
    "worse_lpips": [x + 2.0 for x in BASE],                                # best PSNR, LPIPS higher: never chosen
}


def _per(per):
    return {lab: [{"psnr": v} for v in vals] for lab, vals in per.items()}


def test_highest_mean_passing_config_wins_without_per_image_data():
    rows = _rows(PER, lpips={"worse_lpips": 0.2})
    assert decide(rows)["winner"] == "b"
    assert decide(_rows({"default": BASE, "c": [x - 0.3 for x in BASE]}))["winner"] == "default"


def test_ties_go_to_the_current_default_then_to_the_most_robust():
    rows = _rows(PER, lpips={"worse_lpips": 0.2})
    assert decide(rows, _per(PER))["winner"] == "a"  # a ties with b (interval contains 0), its worst photo is better
    assert decide(rows, _per(PER), current="b")["winner"] == "b"  # the current default stays when tied
    assert decide(rows, _per(PER), current="c")["winner"] == "a"  # ... but not when it is below the best


def test_the_real_photo_floor_vetoes_candidates(tmp_path):
    """real_degradations.py results: a candidate below the current default there, or never run there, is vetoed."""
    def run(name, overrides, psnrs):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({"settings": {"override": ["sampler=sequential", *overrides]},
                                 "rows": [{"degradation": "jpeg", "task": "deblur",
                                           "per_image": [{"name": str(i), "psnr_restored": v}
                                                         for i, v in enumerate(psnrs)]}]}))
        return f

    files = [run("now", [], BASE), run("low", ["sampler.t_start=100"], [x - 0.4 + 0.01 * i for i, x in enumerate(BASE)]),
             run("high", ["sampler.t_start=650"], [x + 0.1 for x in BASE])]
    labels = ["default", "skip_type=quad,t_start=500", "skip_type=quad,t_start=100", "skip_type=quad,t_start=650",
              "skip_type=quad,t_start=300"]
    current = current_label("deblur", labels)
    assert current == "skip_type=quad,t_start=500"  # conf/task/deblur.yaml's grid and start
    vetoes = real_vetoes("deblur", labels, current, files)
    assert set(vetoes) == {"skip_type=quad,t_start=100", "skip_type=quad,t_start=300"}
    assert vetoes["skip_type=quad,t_start=300"] == "not run on them" and "jpeg: -0.3" in vetoes["skip_type=quad,t_start=100"]
    assert real_vetoes("deblur", labels, current, None) == {}
    rows = _rows({"default": BASE, "skip_type=quad,t_start=100": [x + 2 for x in BASE],
                  "skip_type=quad,t_start=650": [x + 1 for x in BASE]})
    assert decide(rows, vetoes=vetoes)["winner"] == "skip_type=quad,t_start=650"


def test_the_parallel_floor_vetoes_candidates_whose_solve_stops_short(tmp_path):
    """parallel_defaults.py results: a candidate whose quasi-Newton solve stops below 45 dB of its own sequential
    result on some photo, or that was never run there, is vetoed; runs with other solver options do not count."""
    def run(name, rows, solver_options=()):
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({"args": {"solver_options": list(solver_options)},
                                 "rows": [{"task": "deblur", "T": 25, "config": cfg,
                                           "per_image": [{"name": str(i), "psnr_seq": v} for i, v in enumerate(vals)]}
                                          for cfg, vals in rows]}))
        return f

    files = [run("a", [("sampler.nw=0.9", [50.0, 47.0, 52.0]), ("sampler.nw=0.3", [60.0, 30.5, 44.0])]),
             run("b", [("sampler.nw=0.8", [50.0, 51.0, 52.0])], solver_options=["tol=0.001"])]
    labels = ["default", "skip_type=quad,t_start=500", "skip_type=quad,t_start=500,sampler.nw=0.9",
              "skip_type=quad,t_start=500,sampler.nw=0.3", "skip_type=quad,t_start=500,sampler.nw=0.8"]
    current = "skip_type=quad,t_start=500"
    vetoes = parallel_vetoes("deblur", labels, current, files)
    assert set(vetoes) == {"skip_type=quad,t_start=500,sampler.nw=0.3", "skip_type=quad,t_start=500,sampler.nw=0.8"}
    assert "30.5 dB" in vetoes["skip_type=quad,t_start=500,sampler.nw=0.3"] and "2 photo(s)" in vetoes[
        "skip_type=quad,t_start=500,sampler.nw=0.3"]
    assert vetoes["skip_type=quad,t_start=500,sampler.nw=0.8"] == PARALLEL_NOT_RUN  # its only run used other options
    assert parallel_vetoes("deblur", labels, current, None) == {}
    assert parallel_vetoes("sr4", labels, current, files) == {}  # no parallel run of the task: nothing to check
    rows = _rows({"default": BASE, current: [x + 0.5 for x in BASE],
                  "skip_type=quad,t_start=500,sampler.nw=0.3": [x + 2 for x in BASE],
                  "skip_type=quad,t_start=500,sampler.nw=0.9": [x + 1 + 0.01 * i for i, x in enumerate(BASE)],
                  "skip_type=quad,t_start=500,sampler.nw=0.8": [x + 1.5 for x in BASE]})
    dec = decide(rows, vetoes=vetoes)
    assert dec["winner"] == "skip_type=quad,t_start=500,sampler.nw=0.9"
    assert "parallel solve stops 30.5 dB" in dec["text"] and "1 more config(s) not run in the parallel" in dec["text"]


def test_the_default_with_more_steps_is_found_by_composition():
    """README's "more steps" table: per T, the cached label that composes to conf/task/deblur.yaml at T steps;
    ``default,...`` labels (relative to an older default) and other starts or noise weights never count."""
    labels = ["default", "default,T=100", "skip_type=quad,t_start=500,sampler.nw=0.7",
              "skip_type=quad,t_start=500,T=100,sampler.nw=1.0", "skip_type=quad,t_start=300,T=100,sampler.nw=0.7",
              "skip_type=uniform,t_start=500,T=100,sampler.nw=0.7", "skip_type=quad,t_start=500,T=50,sampler.nw=0.7",
              "t_start=500,skip_type=quad,T=100,sampler.nw=0.7"]
    at = default_at_steps("deblur", labels)
    assert at == {25: "skip_type=quad,t_start=500,sampler.nw=0.7", 50: "skip_type=quad,t_start=500,T=50,sampler.nw=0.7",
                  100: "t_start=500,skip_type=quad,T=100,sampler.nw=0.7"}
    assert default_at_steps("deblur", labels[:2]) == {}


def test_the_steps_floor_vetoes_candidates_that_lose_with_more_steps():
    """A candidate whose own configuration at T = 50 or 100 is below the current default at the same T (paired
    interval below 0) is vetoed; one above it, or without such rows, is not."""
    cur = "skip_type=quad,t_start=500,sampler.nw=0.7"
    base = [30.0, 31.5, 29.0, 33.0, 28.5, 32.0]
    per = {lab: [{"psnr": v + off} for v in base] for lab, off in [
        (cur, 0.0), ("skip_type=quad,t_start=500,T=100,sampler.nw=0.7", 0.0),
        ("skip_type=quad,t_start=500,T=50,sampler.nw=0.7", 0.1),
        ("skip_type=quad,t_start=500,sampler.nw=0.8", 0.3), ("skip_type=quad,t_start=500,T=100,sampler.nw=0.8", -0.5),
        ("skip_type=quad,t_start=400", 0.2), ("skip_type=quad,t_start=400,T=50", 0.4),
        ("skip_type=quad,t_start=300", 0.2)]}
    per["skip_type=quad,t_start=500,T=100,sampler.nw=0.8"][0]["psnr"] += 0.1  # not all equal: a real interval
    labels = list(per)
    out = steps_vetoes("deblur", labels, cur, per)
    assert set(out) == {"skip_type=quad,t_start=500,sampler.nw=0.8"}
    assert out["skip_type=quad,t_start=500,sampler.nw=0.8"].startswith(f"{STEPS}: at T = 100 -0.")
    # no current-default row at T: the floor is silent
    del per["skip_type=quad,t_start=500,T=100,sampler.nw=0.7"]
    assert steps_vetoes("deblur", list(per), cur, per) == {}
