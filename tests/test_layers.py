"""Imports run downward (docs/solvers.md "Module map"): operators, models, data, schedule -> chains -> deq (map,
solvers, gradients) -> samplers -> optimisation -> app / API. Every import of every module counts, including the
lazy ones inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "deqir"
#: package -> layer; a module may import its own layer or any lower one
LAYERS = {
    "deqir.utils": 0, "deqir.operators": 0, "deqir.models": 0, "deqir.datasets": 0, "deqir.metrics": 0,
    "deqir.diffusion": 0, "deqir.chains": 1, "deqir.deq": 2, "deqir.samplers": 3, "deqir.optim": 4,
    "deqir.lit": 5, "deqir.api": 6, "deqir": 7,
}


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(module)


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("deqir")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deqir") and node.level == 0:
            out += [f"{node.module}.{a.name}" if node.module == "deqir" else node.module for a in node.names]
    return out


def test_every_import_runs_downward():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if mod == "deqir":
            continue  # the package's lazy re-export of the API (deqir.restore, ...) is its top
        for target in imports(path):
            if layer(target) > layer(mod):
                upward.append(f"{mod} imports {target}")
    assert not upward, "\n".join(upward)
