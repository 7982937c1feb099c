"""The vendored checkpoint manifests and golden fixtures (``tests/data/checkpoint-manifests``, see its README).

The golden models' weights are not stored: they are the manifests' "scaled" initialisation with seed 0,
which :func:`deqir.models.loading.init_random_` rebuilds exactly; :func:`golden_state_dict` checks every
rebuilt tensor against the sha256 of the original fixture file before a test uses it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from deqir.models import build_model
from deqir.models.loading import init_random_

MANIFESTS = Path(__file__).resolve().parent / "data" / "checkpoint-manifests"
GOLDEN = MANIFESTS / "golden"
ARCH_CONFIG_KEY = {"ddpm": "config", "adm": "ctor_kwargs"}


def manifest(name: str) -> dict:
    """A JSON manifest by its path under ``tests/data/checkpoint-manifests``."""
    return json.loads((MANIFESTS / name).read_text())


def golden_config(arch: str) -> dict:
    """Constructor kwargs of the reduced golden model (``ddpm`` or ``adm``)."""
    info = manifest(f"golden/{arch}_small.json")[ARCH_CONFIG_KEY[arch]]
    return {k: v for k, v in info.items() if k != "num_diffusion_timesteps"}


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over ``key:dtype:shape`` lines and the raw bytes of every tensor, in order."""
    h = hashlib.sha256()
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{str(v.dtype).removeprefix('torch.')}:{'x'.join(map(str, v.shape))}\n".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def golden_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The golden fixture's float16 state dict, rebuilt and verified bit for bit against its recorded hash."""
    net = init_random_(build_model(arch, **golden_config(arch)), seed=0)
    sd = {k: v.half() for k, v in net.state_dict().items()}
    want = manifest("golden/state_dicts.sha256.json")[f"{arch}_small_state_dict.pt"]["sha256"]
    got = state_dict_sha256(sd)
    assert got == want, f"rebuilt {arch} golden weights differ from the fixture (sha256 {got[:12]} != {want[:12]})"
    return sd


def save_golden_state_dict(arch: str, path: Path) -> Path:
    """Write the golden state dict as the fixture file was (a flat float16 state dict)."""
    torch.save(golden_state_dict(arch), path)
    return path


def golden_io(arch: str) -> dict:
    """Inputs, timesteps and reference outputs of the golden model (``*_small_io.pt``)."""
    return torch.load(GOLDEN / f"{arch}_small_io.pt", weights_only=True)
