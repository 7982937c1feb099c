"""Reading checkpoint files without running them, and one-line explanations when that is refused.

:func:`pickle_globals` lists the globals a raw pickle would import, by parsing its opcodes
(``pickletools.genops``: nothing is imported or called), so a refused file can be described truthfully:
a pickle that calls ``posix.system`` is not a "truncated download".
"""
from __future__ import annotations

import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

_PICKLE_PROTO = 0x80
#: Top-level modules whose globals in a checkpoint mean code execution, never weights.
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "builtins", "__builtin__", "sys", "shutil", "socket",
                 "importlib", "runpy", "pty", "code", "pickle", "marshal", "ctypes", "webbrowser"}
_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING")


def pickle_globals(path: str | Path, limit: int = 4) -> list[str] | None:
    """``module.name`` of the first ``limit`` globals a raw pickle file would import; None if it is no pickle.

    Raises:
        ValueError: the pickle stream ends early (a truncated file).
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data or data[0] != _PICKLE_PROTO or zipfile.is_zipfile(path):
        return None
    found: list[str] = []
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
            strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
        elif op.name == "GLOBAL" and isinstance(arg, str):
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if len(found) >= limit:
            break
    return found


def describe_refused(path: Path, torch_message: str) -> str:
    """Why the weights-only unpickler refused ``path``, in one line (for a ``ValueError``)."""
    import re

    hit = re.search(r"GLOBAL ([\w.]+)", torch_message)
    names = [hit.group(1)] if hit else None
    if names is None:
        try:
            names = pickle_globals(path)
        except ValueError:
            return (f"{path} is not a readable PyTorch checkpoint: the file ends in the middle of its data "
                    f"(truncated download?)")
    if names and names[0].split(".")[0] in _CODE_MODULES:
        return (f"refusing to load {path}: unpickling it would call {names[0]} (it runs code, it holds no "
                f"weights); do not load this file, get the checkpoint from its original source")
    if names:
        return (f"refusing to load {path} (it contains a {names[0]} object): deqir only reads weights-only "
                f"checkpoints and never unpickles code; if you trust the file, re-save its weights once as a plain "
                f"state_dict, e.g. python -c \"import torch; c = torch.load('{path}', weights_only=False); "
                f"torch.save(c.state_dict() if hasattr(c, 'state_dict') else c['state_dict'], 'weights.pt')\"")
    if names is not None:  # a pickle without globals that the weights-only unpickler still cannot read
        return f"{path} is a pickle that weights-only loading cannot read (no tensors in torch's format); refusing it"
    return (f"{path} is not a readable PyTorch checkpoint (the unpickler stopped at an invalid byte: a truncated "
            f"download or a different file format?)")


def load_safetensors(path: Path) -> dict[str, Any]:
    """``safetensors.torch.load_file`` on the CPU, with a one-line ``ValueError`` for a file it cannot parse."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError, ...)
        with open(path, "rb") as f:
            head = f.read(1)
        kind = " (it is a pickle, not safetensors: refused)" if head and head[0] == _PICKLE_PROTO else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a readable safetensors file{kind}: {reason}") from None


def quiet_torch_load(path: Path, safe_globals: list) -> Any:
    """``torch.load(weights_only=True)`` on the CPU without torch's pickle-protocol warning lines."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected pickle protocol")
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(path, map_location="cpu", weights_only=True)
