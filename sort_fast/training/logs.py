"""Readable logs (stderr and ``train.log``) and the machine-readable ``log.jsonl``."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from tqdm.auto import tqdm

from .checkpoint import atomic_write

__all__ = ["setup_logging", "JsonLog"]


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines above an active tqdm progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # pragma: no cover - as logging.StreamHandler does
            self.handleError(record)


def setup_logging(log_file: Optional[Path], *, quiet: bool = False) -> logging.Logger:
    """The ``sort_fast`` logger: ``HH:MM:SS level message`` to stderr (warnings only when
    ``quiet``, e.g. on ranks > 0) and, with ``log_file``, the same lines appended there."""
    logger = logging.getLogger("sort_fast")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stderr = _TqdmHandler()
    stderr.setLevel(logging.WARNING if quiet else logging.INFO)
    handlers = [stderr]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class JsonLog:
    """``log.jsonl``: one JSON object per line (``{"event": "train"|"eval", "step": ...}``),
    flushed after every line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int, *, drop_eval_at_step: bool = False) -> None:
        """Drops the lines of steps after ``step`` (written by a run that was killed before its
        next checkpoint), so a resumed run's log has no duplicate steps; with
        ``drop_eval_at_step`` also the evaluation at ``step`` (a finished run's final one,
        when it evaluates again to complete its report)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines(True):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if not isinstance(record, dict):
                continue
            at_step = record.get("step", 0)
            dropped = drop_eval_at_step and at_step == step and record.get("event") == "eval"
            if at_step <= step and not dropped:
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write(self.path, lambda f: f.write("".join(kept).encode()))

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
