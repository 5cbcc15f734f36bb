"""The report of an evaluation: ``table1.md``, the plots and ``metrics.json`` of a run folder
(docs/metrics.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from .checkpoint import atomic_write
from .eval_result import EvalResult
from .metrics_table import format_table

__all__ = ["write_report"]


def write_report(result: EvalResult, out_dir: Path, *, method: str,
                 extra: Optional[Dict[str, Any]] = None, plots: bool = True) -> str:
    """Writes ``table1.md``, (``plots``) the plots and, last, ``metrics.json`` into
    ``out_dir``; returns the table. ``extra`` (e.g. the step) is stored in ``metrics.json``
    beside the metrics. As ``metrics.json`` comes last, its presence means the whole report was
    written (a process killed while writing leaves no ``metrics.json``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(result.metrics, method)
    payload = {"method": method, **(extra or {}), "metrics": result.metrics}
    (out_dir / "metrics.json").unlink(missing_ok=True)  # an earlier report's, until this one's
    atomic_write(out_dir / "table1.md", lambda f: f.write(
        (f"Validation metrics ({result.metrics['groups']} groups, "
         f"{result.metrics['pairs']} <reasoning, sub-question> pairs)\n\n{table}\n").encode()))
    if plots:
        from .plots import plot_all  # matplotlib is imported only when plots are written

        plot_all(result, out_dir, method)
    atomic_write(out_dir / "metrics.json",
                 lambda f: f.write(json.dumps(payload, indent=2).encode() + b"\n"))
    return table
