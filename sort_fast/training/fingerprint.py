"""A fingerprint of a run's data, stored in its checkpoint: ``--resume`` refuses to continue a
run on vocabularies or training data other than those it was trained on (docs/RELIABILITY.md).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..data import Group
from ..errors import CLIError
from .config import DataConfig
from .data import TRAIN_FILES, Datasets

__all__ = ["data_fingerprint", "check_fingerprint", "FINGERPRINT_PARTS"]

# the parts of a fingerprint, with the words a refused resume uses for them
FINGERPRINT_PARTS = {"vocab": "question vocabulary", "answer_vocab": "answer vocabulary",
                     "train": "training data"}
_CHUNK = 1 << 20


def _tokens_digest(tokens: Sequence[str]) -> str:
    """SHA-256 of a vocabulary's tokens in their order (an answer's index is its class)."""
    h = hashlib.sha256()
    for token in tokens:
        h.update(f"{len(token)}:{token};".encode())
    return h.hexdigest()


def _array(h: "hashlib._Hash", values: Optional[np.ndarray]) -> None:
    if values is None:
        h.update(b"none;")
        return
    values = np.ascontiguousarray(values)
    h.update(f"{values.dtype.str} {values.shape};".encode())
    h.update(values.tobytes())


@lru_cache(maxsize=4)
def _groups_digest(groups: Sequence[Group]) -> str:
    """SHA-256 of every group's content, in order: question ids, texts, tokens, answers, soft
    targets, ``num_sub``, region features, boxes and grounding. Computed once per data set
    object (about a second for 3,000 groups): the synthetic splits are built once per process
    and read only, so a process running many short runs pays it once."""
    h = hashlib.sha256()
    for group in groups:
        h.update(repr((group.image_id, group.question_ids, group.questions,
                       group.question_tokens, group.answers,
                       [sorted(t.items()) for t in group.targets], group.num_answers,
                       group.num_sub)).encode())
        _array(h, group.features)
        _array(h, group.boxes)
        _array(h, group.grounding)
    return h.hexdigest()


def _file(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def _files_digest(paths: Sequence[str], features: str) -> str:
    """SHA-256 of the content of the JSON files ``paths`` and of the names and sizes of the
    region feature files (a ``.tsv`` or every entry of a directory; their content is not read,
    which would cost a pass over all features at every start)."""
    h = hashlib.sha256()
    for path in paths:
        _file(h, Path(path))
    entries: List[os.DirEntry] = []
    if Path(features).is_dir():
        with os.scandir(features) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            h.update(f"{entry.name}:{entry.stat().st_size};".encode())
    else:
        h.update(f"{Path(features).name}:{Path(features).stat().st_size};".encode())
    return h.hexdigest()


def data_fingerprint(args: DataConfig, data: Datasets) -> Dict[str, str]:
    """``{"vocab", "answer_vocab", "train"}``: SHA-256 (hex) of the question and answer
    vocabularies (tokens in order) and of the training data. For the synthetic benchmark that
    is every training group's content, so a generator that changed is seen whatever its seed
    and design; for real data the content of the three JSON files and the names and sizes of
    the feature files (``TRAIN_FILES`` flags of ``args``)."""
    assert data.train is not None
    if data.source["kind"] == "synthetic":
        train = _groups_digest(data.train)
    else:
        *json_files, features = (getattr(args, name) for name in TRAIN_FILES)
        try:
            train = _files_digest(json_files, features)
        except OSError as e:
            raise CLIError(f"cannot read the training data ({e})") from None
    return {"vocab": _tokens_digest(data.vocab.tokens),
            "answer_vocab": _tokens_digest(data.answer_vocab.tokens), "train": train}


def check_fingerprint(stored: Dict[str, str], current: Dict[str, str], path: Path) -> None:
    """Raises :class:`CLIError` naming every part of ``current`` (this run's data) that differs
    from ``stored`` (the checkpoint ``path``'s)."""
    changed = [words for part, words in FINGERPRINT_PARTS.items()
               if stored.get(part) != current[part]]
    if changed:
        raise CLIError(f"cannot resume {path}: its {', '.join(changed)} differ from this run's "
                       "data (the data files or the synthetic generator changed since it was "
                       "written); restore that data, or start afresh with --overwrite")
