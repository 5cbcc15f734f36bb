"""The runs of an experiment as jobs: one ``python -m sort_fast.train`` / ``sort_fast.evaluate``
call each, run in this process or in a pool of processes, with a progress bar.

A job whose ``metrics.json`` exists is done and never run again; a killed one leaves none
(the report writer writes it last), so running the same jobs again continues where they
stopped.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import shlex
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from tqdm.auto import tqdm

from ..errors import CLIError

__all__ = ["Job", "run_entry_point", "execute"]


@dataclass(frozen=True)
class Job:
    """One ``python -m sort_fast.<module> argv`` call; ``out`` holds its ``metrics.json``."""

    module: str
    argv: Tuple[str, ...]
    out: Path

    @property
    def done(self) -> bool:
        return (self.out / "metrics.json").exists()

    def metrics(self) -> Dict[str, Any]:
        return json.loads((self.out / "metrics.json").read_text())["metrics"]

    @property
    def command(self) -> str:
        """The shell command that computes this job's numbers (``--resume`` left out: it only
        continues an interrupted run to the same result)."""
        argv = [a for a in self.argv if a != "--resume"]
        return shlex.join([sys.executable, "-m", f"sort_fast.{self.module}", *argv])


def run_entry_point(module: str, argv: Sequence[str], log: str) -> int:
    """Runs the ``train`` or ``evaluate`` command-line entry point in this process, its output
    appended to ``log``; returns its exit code (1 with the traceback in ``log`` for a bug)."""
    # imported here: a pool process imports only the entry point it runs
    if module == "train":
        from ..train import main as entry
    else:
        from ..evaluate import main as entry
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        try:
            return entry(list(argv))
        except SystemExit as e:  # argparse errors
            return int(e.code or 0)
        except Exception:  # a bug: its traceback goes to the log the failure message names
            traceback.print_exc()
            return 1


def _run_all(todo: Sequence[Job], logs: Sequence[str], workers: int, bar: tqdm) -> List[int]:
    """Exit codes of ``todo`` run ``workers`` at a time (in this process when one)."""
    if workers == 1:
        codes = []
        for job, log in zip(todo, logs):
            codes.append(run_entry_point(job.module, job.argv, log))
            bar.update(1)
        return codes
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
        futures = [pool.submit(run_entry_point, job.module, job.argv, log)
                   for job, log in zip(todo, logs)]
        for future in futures:
            future.add_done_callback(lambda _: bar.update(1))
        return [future.result() for future in futures]


def execute(jobs: Sequence[Job], workers: int, desc: str) -> None:
    """Runs the jobs not done yet, ``workers`` at a time (each in its own process when more
    than one), with a progress bar labelled ``desc``; a failed job is a :class:`CLIError`
    naming its log (``run.log`` in the job's folder)."""
    todo = [job for job in jobs if not job.done]
    if not todo:
        return
    for job in todo:
        job.out.mkdir(parents=True, exist_ok=True)
    logs = [str(job.out / "run.log") for job in todo]
    bar = tqdm(total=len(todo), desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr)
    try:
        codes = _run_all(todo, logs, workers, bar)
    finally:
        bar.close()
    failed = [log for code, log in zip(codes, logs) if code != 0]
    if failed:
        raise CLIError(f"{len(failed)} run(s) failed; see {failed[0]}")
