"""``python -m sort_fast.experiments.table1``: the paper's Table 1 on the embedded benchmark.

Protocol (``docs/REPRODUCTION.md``), as in the paper every row is fine-tuned from the same
plain model:

1. *pretrain*: for every seed, a plain model (``--loss bce``) from scratch;
2. *tune*: for the tuning seeds, every λ of the grids fine-tunes SQuINT, SOrT (only SQ) and
   SOrT (SQ + IQ) from that seed's plain model; each λ is scored on the **val** split by
   ``(consistency + reasoning accuracy) / 2`` averaged over the tuning seeds (the paper tuned
   on "a combination of consistency and accuracy") and the best is kept;
3. *fine-tune*: every seed fine-tunes the four rows (the baseline continues with BCE for the
   same number of epochs) at the chosen λ;
4. *report*: every fine-tuned model (and the plain model itself) is evaluated on the held-out
   **test** split, which no choice above has seen.

Each run is an ordinary ``python -m sort_fast.train`` / ``sort_fast.evaluate`` call with its
own directory under ``--out``; a finished run is not repeated and a killed one resumes from its
checkpoint, so rerunning the command after an interruption continues where it stopped.
Results: ``--json`` (per-seed metrics of every row, the chosen λ and the tuning scores),
``--figure`` and a Markdown table (printed, and written to ``OUT/table1.md``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..training.checkpoint import atomic_write
from ..training.config import (METHOD_NAMES, CLIError, OneLineParser, build_train_parser,
                               non_negative_float, positive_float, positive_int, run_command)
from ..training.evaluation import COLUMNS, format_metric

__all__ = ["main", "build_parser", "run_tag", "val_score", "markdown", "plot", "PAPER",
           "METHODS", "METRICS"]

PROG = "python -m sort_fast.experiments.table1"
# row key -> --loss of sort_fast.train
METHODS = {"baseline": "bce", "squint": "squint", "sort_sq": "sort-sq", "sort": "sort"}
ROW_NAMES = {"pretrained": "Pythia (plain model, not fine-tuned)",
             "baseline": "Pythia (BCE fine-tuned as long)", "squint": "Pythia + SQuINT",
             "sort_sq": "Pythia + SOrT (only SQ)", "sort": "Pythia + SOrT (SQ + IQ)"}
# Table 1's columns as the evaluator prints them: (key in table1.json, key in metrics.json,
# header with its arrow, scale, higher is better)
METRICS = tuple(("grounding" if key == "grounding_spearman" else key, key,
                 f"{header} {arrow}", scale, arrow == "↑")
                for header, key, scale, arrow in COLUMNS)
_SCALE = {key: scale for key, _, _, scale, _ in METRICS}
# Table 1 of the paper (fractions; it prints percentages) and the VQA-HAT grounding of §4.2
# (Spearman's rho; not reported for SOrT with only sub-questions)
_PAPER_ROWS = {
    "baseline": (50.61, 19.88, 17.15, 12.36, 71.81, 75.15, 64.95, 57.75, 30.33, 71.87, 52.75,
                 0.080),
    "squint": (53.03, 17.58, 18.63, 10.74, 75.10, 74.95, 64.75, 55.87, 29.45, 71.49, 39.20,
               0.060),
    "sort_sq": (54.34, 15.44, 20.08, 10.14, 77.87, 73.78, 63.69, 59.47, 30.73, 74.22, 41.06,
                None),
    "sort": (54.62, 15.09, 20.31, 9.97, 78.35, 74.18, 64.07, 61.73, 31.90, 74.43, 40.03, 0.103),
}
PAPER = {row: {key: None if v is None else round(v / _SCALE[key], 6)
               for (key, *_), v in zip(METRICS, values)}
         for row, values in _PAPER_ROWS.items()}
# flags that must not change between an interrupted invocation and its continuation
_PROTOCOL_FLAGS = ("seeds", "tune_seeds", "pretrain_epochs", "finetune_epochs",
                   "attention_grid", "bce_grid", "irrelevant_grid", "hidden_dim", "joint_dim",
                   "batch_groups", "lr", "synthetic_seed", "synthetic_train_groups",
                   "synthetic_val_groups", "synthetic_test_groups", "device")


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


def _run_job(module: str, argv: Sequence[str], log: str) -> int:
    """Runs a command-line entry point in this process, its output appended to ``log``."""
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


def _execute(jobs: Sequence[Job], workers: int, desc: str) -> None:
    """Runs the jobs not done yet, ``workers`` at a time (each in its own process when more
    than one), with a progress bar; a failed job is a :class:`CLIError` naming its log."""
    todo = [job for job in jobs if not job.done]
    if not todo:
        return
    for job in todo:
        job.out.mkdir(parents=True, exist_ok=True)
    logs = [str(job.out / "run.log") for job in todo]
    bar = tqdm(total=len(todo), desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr)
    try:
        if workers == 1:
            codes = []
            for job, log in zip(todo, logs):
                codes.append(_run_job(job.module, job.argv, log))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
                futures = [pool.submit(_run_job, job.module, job.argv, log)
                           for job, log in zip(todo, logs)]
                for future in futures:
                    future.add_done_callback(lambda _: bar.update(1))
                codes = [future.result() for future in futures]
    finally:
        bar.close()
    failed = [log for code, log in zip(codes, logs) if code != 0]
    if failed:
        raise CLIError(f"{len(failed)} run(s) failed; see {failed[0]}")


def run_tag(lambdas: Dict[str, float]) -> str:
    """The directory name of a fine-tuning setting, e.g. ``reasoning2.27_sub2.27_irrelevant0.0003``
    (``default`` without λ)."""
    return "_".join(f"{k.removeprefix('lambda_')}{v:g}" for k, v in lambdas.items()) or "default"


class Plan:
    """The runs of the protocol, named by their place under ``args.out``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.root = args, Path(args.out)
        self.seeds = list(range(args.seeds))
        self.tune_seeds = self.seeds[:args.tune_seeds]
        self.grids: Dict[str, List[Dict[str, float]]] = {
            "baseline": [{}],
            "squint": [{"lambda_attention": a} for a in args.attention_grid],
            **{row: [{"lambda_reasoning": b, "lambda_sub": b, "lambda_irrelevant": i}
                     for b, i in product(args.bce_grid, args.irrelevant_grid)]
               for row in ("sort_sq", "sort")},
        }

    def _common(self) -> List[str]:
        a = self.args
        return ["--threads", "1", "--device", a.device, "--eval-every", "0",
                "--batch-groups", str(a.batch_groups), "--lr", str(a.lr),
                "--hidden-dim", str(a.hidden_dim), "--joint-dim", str(a.joint_dim),
                "--synthetic-seed", str(a.synthetic_seed),
                "--synthetic-train-groups", str(a.synthetic_train_groups),
                "--synthetic-val-groups", str(a.synthetic_val_groups)]

    @staticmethod
    def _resume(out: Path) -> List[str]:
        return ["--resume"] if (out / "checkpoint.pt").exists() else []

    def pretrain(self, seed: int) -> Job:
        out = self.root / "pretrain" / f"seed{seed}"
        return Job("train", ("--out", str(out), "--loss", "bce", "--seed", str(seed),
                             "--epochs", str(self.args.pretrain_epochs), *self._common(),
                             *self._resume(out)), out)

    def finetune(self, row: str, lambdas: Dict[str, float], seed: int) -> Job:
        out = self.root / "finetune" / row / run_tag(lambdas) / f"seed{seed}"
        flags = [x for k, v in lambdas.items() for x in ("--" + k.replace("_", "-"), repr(v))]
        init = self.pretrain(seed).out / "checkpoint.pt"
        return Job("train", ("--out", str(out), "--loss", METHODS[row], "--seed", str(seed),
                             "--init", str(init), "--epochs", str(self.args.finetune_epochs),
                             *flags, *self._common(), *self._resume(out)), out)

    def test(self, job: Job) -> Job:
        out = job.out / "test"
        return Job("evaluate", (str(job.out / "checkpoint.pt"), "--out", str(out),
                                "--synthetic-split", "test", "--synthetic-val-groups",
                                str(self.args.synthetic_test_groups), "--threads", "1",
                                "--device", self.args.device), out)


def val_score(metrics: Dict[str, Any]) -> float:
    """The tuning criterion: ``(consistency + reasoning accuracy) / 2`` on the val split."""
    return 0.5 * (metrics["consistency"] + metrics["reasoning_accuracy"])


def _row(metrics: Dict[str, Any], seed: int) -> Dict[str, Any]:
    return {"seed": seed, **{key: metrics.get(source) for key, source, *_ in METRICS}}


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[float, float]:
    x = np.array([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def _number(key: str, value: float, sign: str = "") -> str:
    return format_metric(value, _SCALE[key], sign)


def markdown(results: Dict[str, Any]) -> str:
    """Table 1 as mean ± std over seeds beside the paper's numbers, then each row's paired
    difference from the baseline (same seed, same plain model) with its sign count."""
    headers = [header for _, _, header, _, _ in METRICS]
    lines = ["| Method | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(METRICS)]
    rows = {"pretrained": results["pretrained"], **results["methods"]}
    for row, per_seed in rows.items():
        cells = []
        for key, *_ in METRICS:
            m, s = _mean_std([r[key] for r in per_seed])
            cells.append("–" if m != m else f"{_number(key, m)} ± {_number(key, s)}")
        lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    for row, paper in PAPER.items():
        cells = ["–" if paper[key] is None else _number(key, paper[key]) for key, *_ in METRICS]
        lines.append(f"| *paper: {METHOD_NAMES[METHODS[row]]}* | " + " | ".join(cells) + " |")
    base = results["methods"]["baseline"]
    lines += ["", f"Paired difference from the baseline, mean ± std over {len(base)} seeds "
              "(and in how many seeds the row is better):", "",
              "| Method | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(METRICS)]
    for row, per_seed in rows.items():
        if row == "baseline":
            continue
        cells = []
        for key, _, _, _, up in METRICS:
            pairs = [(r[key], b[key]) for r, b in zip(per_seed, base)
                     if r[key] is not None and b[key] is not None]
            d = [x - y for x, y in pairs]
            m, s = _mean_std(d)
            better = sum((x > 0) if up else (x < 0) for x in d)
            cells.append(f"{_number(key, m, '+')} ± {_number(key, s)} ({better}/{len(d)})")
        lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Dict[str, Any], path: Path) -> None:
    """Bars of mean ± std per row for the headline metrics, each seed as a dot and the
    paper's value as a black diamond (real data: compare directions, not levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("consistency", "reasoning_accuracy", "vqa_accuracy", "mp1", "ranking_accuracy",
            "mrr", "wpr", "grounding")
    titles = {key: header for key, _, header, _, _ in METRICS}
    rows = {"pretrained": results["pretrained"], **results["methods"]}
    colours = ["tab:gray", "tab:purple", "tab:blue", "tab:orange", "tab:green"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    x = np.arange(len(rows))
    for ax, key in zip(axes.ravel(), keys):
        k = _SCALE[key]
        for i, (row, per_seed) in enumerate(rows.items()):
            values = np.array([r[key] for r in per_seed if r[key] is not None]) * k
            m, s = _mean_std(list(values))
            ax.bar(i, m, yerr=s, color=colours[i], alpha=0.35, capsize=3)
            ax.plot(np.full(values.size, i), values, "o", color=colours[i], ms=3)
            paper = PAPER.get(row, {}).get(key)
            if paper is not None:
                ax.plot(i, paper * k, "D", color="black", ms=5,
                        label="paper (real data)" if i == 1 else None)
        values = [r[key] * k for per_seed in rows.values() for r in per_seed
                  if r[key] is not None]
        papers = [PAPER[r][key] * k for r in PAPER if PAPER[r][key] is not None]
        low, high = min(values + papers), max(values + papers)
        pad = 0.1 * (high - low) + 1e-9
        ax.set_ylim(low - pad, high + pad)
        ax.set_title(titles[key], fontsize=10)
        ax.set_xticks(x, ["plain", "BCE", "SQuINT", "SOrT SQ", "SOrT"], fontsize=8)
    axes[0, 0].legend(fontsize=8, loc="best")
    seeds = len(results["methods"]["baseline"])
    fig.suptitle(f"Table 1 on the synthetic benchmark, test split, {seeds} seeds "
                 "(bars: mean ± std, dots: seeds)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _check_protocol(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    """Refuses to continue an ``--out`` started with another protocol (its runs would mix);
    returns the protocol (the values of the protocol flags), stored in ``OUT/protocol.json``."""
    config = {name: getattr(args, name) for name in _PROTOCOL_FLAGS}
    stored_path = root / "protocol.json"
    if stored_path.exists() and not args.overwrite:
        stored = json.loads(stored_path.read_text())
        changed = [f"--{k.replace('_', '-')}" for k in config if stored.get(k) != config[k]]
        if changed:
            raise CLIError(f"{root} holds runs of another protocol ({', '.join(changed)} "
                           "differ): pass the same flags to continue, --overwrite to start "
                           "afresh, or another --out")
    if args.overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(stored_path, lambda f: f.write(json.dumps(config, indent=2).encode()))
    return config


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Runs the protocol as the flags say; returns what ``--json`` holds."""
    if args.tune_seeds > args.seeds:
        raise CLIError(f"--tune-seeds {args.tune_seeds} exceeds --seeds {args.seeds}")
    root = Path(args.out)
    protocol = _check_protocol(args, root)
    plan = Plan(args)
    workers = args.jobs

    _execute([plan.pretrain(s) for s in plan.seeds], workers, "pretrain")
    tuned = {row: grid for row, grid in plan.grids.items() if len(grid) > 1}
    tune_jobs = [plan.finetune(row, lam, s) for row, grid in tuned.items() for lam in grid
                 for s in plan.tune_seeds]
    _execute(tune_jobs, workers, "tune (val)")

    tuning: Dict[str, List[Dict[str, Any]]] = {}
    chosen: Dict[str, Dict[str, float]] = {}
    for row, grid in plan.grids.items():
        if row not in tuned:
            chosen[row] = grid[0]
            continue
        scored = []
        for lam in grid:
            val = [plan.finetune(row, lam, s).metrics() for s in plan.tune_seeds]
            scored.append({"lambdas": lam, "val_score": float(np.mean([val_score(m)
                                                                        for m in val])),
                           "val": [_row(m, s) for m, s in zip(val, plan.tune_seeds)]})
        tuning[row] = scored
        chosen[row] = max(scored, key=lambda r: r["val_score"])["lambdas"]  # first on ties

    final = {row: [plan.finetune(row, chosen[row], s) for s in plan.seeds] for row in METHODS}
    _execute([job for jobs in final.values() for job in jobs], workers, "fine-tune")
    pretrained = [plan.pretrain(s) for s in plan.seeds]
    tests = {row: [plan.test(job) for job in jobs] for row, jobs in
             {"pretrained": pretrained, **final}.items()}
    _execute([job for jobs in tests.values() for job in jobs], workers, "test")

    report = {row: [_row(job.metrics(), s) for job, s in zip(jobs, plan.seeds)]
              for row, jobs in tests.items()}
    results = {
        "split": "test",
        "units": "fractions (the paper prints percentages; WPR x100); grounding is Spearman's "
                 "rho against the synthetic grounding truth (the paper: against VQA-HAT)",
        "protocol": protocol,
        "lambdas": chosen,
        "tuning": tuning,
        "paper": PAPER,
        "pretrained": report.pop("pretrained"),
        "methods": report,
    }
    table = markdown(results)
    atomic_write(root / "table1.md", lambda f: f.write((table + "\n").encode()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda f: f.write(json.dumps(results, indent=1).encode()
                                                  + b"\n"))
    if args.figure:
        plot(results, Path(args.figure))
    print(table, flush=True)
    return results


def build_parser() -> OneLineParser:
    """The parser of ``python -m sort_fast.experiments.table1``."""
    train = build_train_parser().parse_args([])  # its defaults are the runs' defaults
    p = OneLineParser(prog=PROG, description=(
        "Reproduce the paper's Table 1 on the embedded synthetic benchmark. Trains the four "
        "rows of Table 1 from the same plain model over several seeds, tunes λ on the val split "
        "and reports the held-out test split. The defaults take about 25 minutes on a 2-core "
        "CPU."))
    p.add_argument("--out", default="runs/table1",
                   help="directory of all runs (pretrain/, finetune/<row>/<λ>/seed<k>/, "
                        "table1.md); rerunning continues an interrupted invocation "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete --out first instead of continuing the runs in it")
    p.add_argument("--json", default="docs/table1.json",
                   help="results file; empty to skip (default: %(default)s)")
    p.add_argument("--figure", default="docs/table1.png",
                   help="figure file; empty to skip (default: %(default)s)")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="runs at a time, one process and one CPU thread each "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="device of every run (default: %(default)s)")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--seeds", type=positive_int, default=5,
                       help="seeds 0..N-1 of every row (initialisation, dropout, data order; "
                            "default: %(default)s)")
    proto.add_argument("--tune-seeds", type=positive_int, default=2,
                       help="the first N seeds also train every λ of the grids, scored on val "
                            "(default: %(default)s)")
    proto.add_argument("--pretrain-epochs", type=positive_int, default=train.epochs,
                       help="epochs of the plain model (default: %(default)s)")
    proto.add_argument("--finetune-epochs", type=positive_int, default=5,
                       help="epochs of every fine-tuned row, the baseline included "
                            "(default: %(default)s)")
    proto.add_argument("--attention-grid", type=non_negative_float, nargs="+",
                       default=[0.1, 1.0, 10.0],
                       help="SQuINT's --lambda-attention values (default: %(default)s)")
    proto.add_argument("--bce-grid", type=non_negative_float, nargs="+",
                       default=[0.227, 2.27, 22.7],
                       help="SOrT's λ1 = λ2 (--lambda-reasoning = --lambda-sub) values "
                            "(default: %(default)s; the paper's is 2.27)")
    proto.add_argument("--irrelevant-grid", type=non_negative_float, nargs="+",
                       default=[3e-4, 2.27],
                       help="SOrT's λ3 (--lambda-irrelevant) values (default: %(default)s; "
                            "the paper's is 3e-4)")
    model = p.add_argument_group("model and data (defaults: sort_fast.train's)")
    model.add_argument("--lr", type=positive_float, default=train.lr,
                       help="learning rate of every run (default: %(default)s)")
    model.add_argument("--batch-groups", type=positive_int, default=train.batch_groups,
                       help="groups per step (default: %(default)s)")
    model.add_argument("--hidden-dim", type=positive_int, default=train.hidden_dim,
                       help="LSTM, attention and text-classifier width (default: %(default)s)")
    model.add_argument("--joint-dim", type=positive_int, default=train.joint_dim,
                       help="joint embedding width (default: %(default)s)")
    model.add_argument("--synthetic-seed", type=int, default=train.synthetic_seed,
                       help="seed of the synthetic benchmark (default: %(default)s)")
    model.add_argument("--synthetic-train-groups", type=positive_int,
                       default=train.synthetic_train_groups,
                       help="training groups (default: %(default)s)")
    model.add_argument("--synthetic-val-groups", type=positive_int,
                       default=train.synthetic_val_groups,
                       help="val groups, for tuning (default: %(default)s)")
    model.add_argument("--synthetic-test-groups", type=positive_int, default=1000,
                       help="test groups, for the reported numbers (default: %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_command(PROG, run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
