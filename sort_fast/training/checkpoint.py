"""Atomic, checksummed checkpoint files, the model they hold, the run-folder lock, and the
random-number-generator state checkpoints carry.

A checkpoint is a plain ``torch.save`` dict with a ``"sha256"`` entry: the SHA-256 of its
content (every other entry, tensors by dtype, shape and bytes, other values by ``repr``), so
``torch.load`` still reads it and a damaged tensor record is caught on load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence, Union

import numpy as np
import torch

from ..errors import CLIError
from ..models import MODEL_CONFIGS, VQAModel

__all__ = ["save_checkpoint", "write_run_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "atomic_write", "content_digest", "lock_run_dir",
           "remove_stale_temp_files", "model_from_checkpoint",
           "MODEL_KEYS", "TRAINING_KEYS"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = 2  # format 1 (older versions): the same without "sha256"
# entries a checkpoint written by training holds: enough for the model, and for resuming
MODEL_KEYS = ("model", "model_config", "vocab", "answer_vocab", "source", "method", "step")
TRAINING_KEYS = MODEL_KEYS + ("optimizer", "scheduler", "rng", "data", "config")
LOCK = ".lock"
TEMP = re.compile(r"\..+\.tmp-(?P<pid>\d+)")


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # as TEMP matches
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


def _update(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)};".encode())
        for key, value in obj.items():
            _update(h, key)
            _update(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            _update(h, value)
    else:
        text = repr(obj)
        h.update(f"{len(text)}:{text};".encode())


def content_digest(state: Dict[str, Any]) -> str:
    """SHA-256 (hex) of ``state``'s entries other than ``"sha256"``: equal for a state before
    ``torch.save`` and after ``torch.load``, different when any tensor byte or value changed."""
    h = hashlib.sha256()
    _update(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Writes ``state`` (tensors, numbers, strings, lists, dicts) atomically to ``path``, with
    the checksum :func:`load_checkpoint` verifies."""
    state = {"format": FORMAT, **state}
    state["sha256"] = content_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def write_run_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """:func:`save_checkpoint` for the trainer: a failed write (a full disk, which
    ``torch.save`` reports as ``RuntimeError``) is a one-line :class:`CLIError` saying that the
    previous checkpoint is kept."""
    try:
        save_checkpoint(state, path)
    except (OSError, RuntimeError) as e:
        raise CLIError(f"cannot write {path} ({_first_line(e)}): the disk may be full; the "
                       "previous checkpoint is kept") from None


def load_checkpoint(path: PathLike, keys: Sequence[str] = ()) -> Dict[str, Any]:
    """Reads a checkpoint (``weights_only``: no code runs) and verifies its checksum; a
    missing, truncated, damaged or foreign file, or one without the entries ``keys``, is a
    :class:`CLIError` naming it, and so is a file of a newer format (written by a newer
    version). A format-1 file (no checksum) is read with a warning."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CLIError(f"{path}: no such checkpoint") from None
    except Exception as e:  # torch raises several types for corrupt files
        raise CLIError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise CLIError(f"{path}: not a sort_fast checkpoint")
    if state["format"] > FORMAT:
        raise CLIError(f"{path}: checkpoint format {state['format']} is newer than this "
                       f"version of sort_fast reads (formats 1-{FORMAT}); upgrade sort_fast")
    if state["format"] < 1:
        raise CLIError(f"{path}: not a sort_fast checkpoint (format {state['format']})")
    if state["format"] == 1:
        logging.getLogger("sort_fast").warning(
            "%s has no checksum (written by an older version): its integrity is not checked",
            path)
    elif state.get("sha256") != content_digest(state):
        raise CLIError(f"{path}: damaged checkpoint (its checksum does not match its content)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CLIError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
    return state


def _first_line(e: Exception) -> str:
    return next(iter(str(e).splitlines()), type(e).__name__)


def model_from_checkpoint(state: Dict[str, Any], path: PathLike) -> VQAModel:
    """The model that ``state`` (a checkpoint read from ``path`` by :func:`load_checkpoint`)
    describes, with its weights: its ``model_kind`` (``"pythia"`` when absent, as in
    checkpoints written before there was a second kind) and ``model_config``. An unknown kind,
    a ``model_config`` key the model does not know or lacks, a value that cannot build the
    model, a weight that is not finite, and weights of other names or shapes than the
    configured model's are a :class:`CLIError` naming ``path`` and the key or parameter."""
    config, weights = state["model_config"], state["model"]
    if not isinstance(config, dict) or not isinstance(weights, dict):
        raise CLIError(f"{path}: model_config and model must be dicts")
    kind = state.get("model_kind", "pythia")
    if kind not in MODEL_CONFIGS:
        raise CLIError(f"{path}: unknown model_kind {kind!r} (written by another version of "
                       "sort_fast?)")
    config_class = MODEL_CONFIGS[kind]
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = [k for k in config if k not in fields]
    if unknown:
        raise CLIError(f"{path}: unknown model_config key {unknown[0]!r} (written by another "
                       "version of sort_fast?)")
    needed = [name for name, f in fields.items() if name not in config
              and f.default is dataclasses.MISSING]
    if needed:
        raise CLIError(f"{path}: model_config has no {needed[0]!r}")
    try:
        model = config_class(**config).build()
    except (TypeError, ValueError, RuntimeError) as e:
        raise CLIError(f"{path}: its model_config cannot build a model ({_first_line(e)})"
                       ) from None
    expected = model.state_dict()
    for name, value in weights.items():
        if name not in expected:
            raise CLIError(f"{path}: weight {name!r} is not a parameter of the model its "
                           "model_config describes")
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise CLIError(f"{path}: weight {name!r} has shape {shape}, its model_config's "
                           f"model {tuple(expected[name].shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CLIError(f"{path}: weight {name!r} is not finite (NaN or inf)")
    missing = [name for name in expected if name not in weights]
    if missing:
        raise CLIError(f"{path}: no weight {missing[0]!r}, which its model_config's model has")
    model.load_state_dict(weights)
    return model


@contextlib.contextmanager
def lock_run_dir(directory: Path) -> Iterator[None]:
    """Holds an exclusive advisory lock (``flock``) on ``directory``'s lock file for the
    block; a run folder locked by another process is a :class:`CLIError`."""
    with open(directory / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            owner = f.read().strip() or "?"
            raise CLIError(f"{directory} is in use by another run (process {owner}); wait for "
                           "it to end or choose another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # the lock goes with the file's closing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_files(directory: Path) -> None:
    """Removes the temporary files of :func:`atomic_write` left in ``directory`` by processes
    that no longer run (killed during a write)."""
    for path in directory.iterdir():
        match = TEMP.fullmatch(path.name)
        if match and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)


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
