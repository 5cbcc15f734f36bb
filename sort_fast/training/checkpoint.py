"""Atomic checkpoint files and the random-number-generator state they carry."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from .config import CLIError

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "atomic_write"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = 1


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Any) -> None:
    """Calls ``write(file)`` on a temporary file in ``path``'s directory, flushes and fsyncs
    it, renames it over ``path`` and fsyncs the directory. If anything fails the temporary file
    is removed and ``path`` keeps its previous content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Writes ``state`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Reads a checkpoint (``weights_only``: no code runs); a missing, truncated or foreign
    file is a :class:`CLIError` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"{path}: no such checkpoint") from None
    except Exception as e:  # torch raises several types for corrupt files
        raise CLIError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CLIError(f"{path}: not a sort_fast checkpoint")
    return state


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, in types ``weights_only`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
