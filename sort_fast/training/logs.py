"""Readable logs (stderr and ``train.log``), the machine-readable ``log.jsonl``, and the
trainer's per-step records, read from the device in batches."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import CLIError
from .checkpoint import atomic_write
from .distributed import DistContext, average_over_processes

__all__ = ["setup_logging", "JsonLog", "StepLog"]


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


def _postfix(parts: Dict[str, float], groups_per_s: float) -> str:
    """The progress bar's text: the latest loss parts and the throughput."""
    return " ".join(f"{k}={v:.3g}" for k, v in parts.items()) + f" {groups_per_s:.0f} grp/s"


class StepLog:
    """The trainer's train records: each step's record and its loss parts (0-d device
    tensors) wait in :meth:`add` until :meth:`flush` reads them all (one host sync; under
    ``torchrun`` averaged over the processes, which all flush at the same steps), checks them
    and writes them to ``jsonl`` (rank 0) and the progress ``bar``'s text."""

    def __init__(self, jsonl: JsonLog, bar: tqdm, ctx: DistContext) -> None:
        self.jsonl, self.bar, self.ctx = jsonl, bar, ctx
        self.pending: List[Tuple[Dict[str, Any], Dict[str, torch.Tensor]]] = []

    def add(self, record: Dict[str, Any], parts: Dict[str, torch.Tensor]) -> None:
        self.pending.append((record, parts))
        if self.ctx.is_main:
            self.bar.update(1)

    def flush(self, *, check_gradient: bool, kept: str) -> None:
        """Writes the pending records. A non-finite loss (or, with ``check_gradient``, a
        non-finite gradient norm of a finite loss) is a :class:`CLIError` naming its step and
        ending with ``kept`` (what remains on disk)."""
        if not self.pending:
            return
        names = list(self.pending[0][1])
        stacked = torch.stack([torch.stack([parts[n].float() for n in names])
                               for _, parts in self.pending])
        values = average_over_processes(stacked, self.ctx).tolist()
        for (record, _), row in zip(self.pending, values):
            parts = dict(zip(names, row))
            if not math.isfinite(parts["loss"]):
                raise CLIError(f"the loss is not finite at step {record['step']}; {kept}; try "
                               "a lower --lr")
            if check_gradient and not math.isfinite(parts.get("grad_norm", 0.0)):
                raise CLIError(f"the gradient is not finite at step {record['step']} (its loss "
                               f"is finite); {kept}; try a lower --lr")
            if self.ctx.is_main:
                self.jsonl.write({**record, **parts, "groups_per_s": record["groups_per_s"]})
        if self.ctx.is_main:
            self.bar.set_postfix_str(_postfix(parts, record["groups_per_s"]), refresh=False)
        self.pending.clear()
