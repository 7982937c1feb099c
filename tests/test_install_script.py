"""scripts/install.sh picks the right interpreter (dry run: nothing is installed) and README uses it."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def dry_run(**env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "DEQIR_VENV")}
    full.update(DEQIR_INSTALL_DRY_RUN="1", **env)
    out = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True, env=full,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_installs_into_this_interpreter_when_pip_may_write_there():
    managed = (Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").is_file()
    in_env = sys.prefix != sys.base_prefix
    if managed and not in_env:
        pytest.skip("this interpreter is PEP 668-managed")
    assert dry_run(PYTHON=sys.executable) == f"would install with {sys.executable}"


def test_a_system_managed_python_gets_a_venv():
    system = Path("/usr/bin/python3")
    probe = "import sysconfig, os; print(os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
    if not system.is_file() or subprocess.run([str(system), "-c", probe], capture_output=True,
                                              text=True).stdout.strip() != "True":
        pytest.skip("no PEP 668-managed system python here")
    assert dry_run(PYTHON=str(system)) == f"would create .venv with {system}"
    assert dry_run(PYTHON=str(system), DEQIR_VENV="0") == f"would install with {system}"


def test_readme_and_ci_activate_what_install_sh_used():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/install.sh && . scripts/activate && python invert.py" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("bash scripts/install.sh") < ci.index(". scripts/activate") < ci.index("python -m pytest -q")
    # activate is a no-op without ./.venv and never enables errexit in the caller's shell
    out = subprocess.run(["bash", "-c", f". {REPO}/scripts/activate; echo ok; case $- in *e*) echo errexit;; esac"],
                         capture_output=True, text=True, env={**os.environ, "VIRTUAL_ENV": "/x"})
    assert out.stdout.split() == ["ok"]
