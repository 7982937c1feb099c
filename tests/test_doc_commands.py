"""Every documented command runs: README.md's and docs/*.md's ```bash blocks, parsed at test time.

Each command (continuation lines joined, comments dropped) is run as written with a small override appended --
the tiny random model (``debug=tiny``), 32 px, one image, one optimisation step, a temporary run directory; appended
last, these win over the document's own values -- in a temporary working
directory that holds the files the commands name (``my_photos/``, ``photos/``, ``blurry/``, ``small/``,
``holed/``, ``ref.png``, ``mask.png``; searches run 2 trials), as
deepinv runs its gallery. A command that needs what a CPU test machine lacks carries a trailing marker comment in
its document, ``needs: gpu`` inside the trailing ``#`` comment (or ``checkpoint``, ``data``, ``slurm``,
``wandb``, ``network``; several separated by commas), and is skipped with that reason, by name. An unmarked command that fails turns the suite red; so does
a marker outside :data:`LACKING` (a typo would otherwise hide a command).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: What a CPU test machine lacks; a command marked ``# needs: X`` with X among these is skipped by name.
LACKING = {"gpu", "checkpoint", "data", "slurm", "wandb", "network"}
#: Commands that are not examples to run here, by name: the test suite itself (this test runs inside it).
NOT_EXAMPLES = {"python -m pytest": "the test suite itself"}
#: Appended to every invert.py / train.py command: tiny model, one optimisation step, small and quick.
INVERT_OVERRIDES = ["debug=tiny", "dataset.size=32", "dataset.limit=1", "optimize.steps=1", "logger=none"]
TRAIN_OVERRIDES = ["model=tiny_ddpm", "trainer=cpu", "logger=none", "batch_size=2", "num_threads=1",
                   "trainer.precision=32-true", "trainer.max_steps=2", "sample_every=0",
                   "train_data.scales=[0.5,0.25]"]
FENCE = re.compile(r"^```(?:bash|sh|shell)\s*\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"needs:\s*([a-z]+(?:\s*,\s*[a-z]+)*)")


def documented_commands() -> list[tuple[str, str, set[str]]]:
    """(id "FILE:LINE", command, needs) for every command of every bash block."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            first = text[: block.start(1)].count("\n") + 1
            pending, start = "", None
            for k, line in enumerate(block.group(1).splitlines()):
                if start is None:
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    start = first + k
                pending += line.rstrip()
                if pending.endswith("\\"):
                    pending = pending[:-1] + " "
                    continue
                found = NEEDS.search(pending)
                needs = {n.strip() for n in found.group(1).split(",")} if found else set()
                out.append((f"{doc.relative_to(ROOT)}:{start}", pending, needs))
                pending, start = "", None
    return out


def _strip_comment(cmd: str) -> str:
    """The command without its trailing comment (a '#' that starts a word, outside quotes)."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=False)
    lex.whitespace_split, lex.commenters = True, "#"
    return " ".join(shlex.quote(w) if w not in ("&&", "||", ";", "|") else w for w in lex)


def _with_overrides(cmd: str, run_dir: Path) -> str:
    """Append the small overrides to every ``python invert.py`` / ``python train.py`` of the command."""
    parts = re.split(r"(\s&&\s|\s;\s|\s\|\|\s)", cmd)
    out = []
    for part in parts:
        words = part.split()
        env = []
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):  # VAR=value python ...
            env.append(words.pop(0))
        if len(words) >= 2 and words[0] == "python" and words[1] in ("invert.py", "train.py"):
            script = words[1]
            extra = INVERT_OVERRIDES if script == "invert.py" else TRAIN_OVERRIDES
            flags_only = any(w in ("--help", "-h", "--cfg") for w in words)
            words = [*env, "python", str(ROOT / script), *words[2:]]
            if not flags_only:  # appended last, so they win (Hydra: the last value of a key counts)
                words += [*extra, f"hydra.run.dir={run_dir}"]
                if any(w.startswith(("hparams_search=", "hydra/sweeper=")) for w in words):  # a search: 2 trials
                    words += ["hydra.sweeper.n_trials=2", f"hydra.sweep.dir={run_dir}_sweep"]
            part = " ".join(words)
        elif env:
            part = " ".join([*env, *words])
        out.append(part)
    return "".join(out)


COMMANDS = documented_commands()


def test_documents_have_commands():
    assert any(cid.startswith("README.md") for cid, _, _ in COMMANDS)
    assert len(COMMANDS) >= 10, [cid for cid, _, _ in COMMANDS]


@pytest.mark.parametrize("cid, cmd, needs", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_markers_name_known_needs(cid, cmd, needs):
    assert needs <= LACKING, f"{cid}: unknown '# needs:' marker(s) {sorted(needs - LACKING)}; known: {sorted(LACKING)}"


def _workdir(tmp_path: Path) -> Path:
    """A working directory with the inputs the documented commands name."""
    import numpy as np
    from PIL import Image

    work = tmp_path / "work"
    g = np.random.default_rng(0)
    for folder in ("my_photos", "photos", "blurry", "small", "holed"):
        (work / folder).mkdir(parents=True)
        Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(work / folder / "a.png")
    Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(work / "ref.png")
    mask = np.full((32, 32), 255, np.uint8)
    mask[8:20, 10:24] = 0
    Image.fromarray(mask).save(work / "mask.png")
    return work


@pytest.mark.slow
@pytest.mark.parametrize("cid, cmd, needs", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_runs(cid, cmd, needs, tmp_path):
    if needs & LACKING:
        pytest.skip(f"needs: {', '.join(sorted(needs & LACKING))} (marked in {cid.split(':')[0]})")
    for prefix, why in NOT_EXAMPLES.items():
        if _strip_comment(cmd).startswith(prefix):
            pytest.skip(f"{prefix!r}: {why}")
    work = _workdir(tmp_path)
    full = _with_overrides(_strip_comment(cmd), tmp_path / "run")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    proc = subprocess.run(["bash", "-c", full], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (f"{cid}: `{cmd}` failed (ran: {full}):\n"
                                  f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
