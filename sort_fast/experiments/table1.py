"""``python -m sort_fast.experiments.table1``: the paper's Table 1 on the embedded benchmark.

Protocol (``docs/REPRODUCTION.md``), as in the paper every row is fine-tuned from the same
plain model:

1. *pretrain*: for every seed (the reported ones and the tuning ones), a plain model
   (``--loss bce``) from scratch; with ``--probe-seeds``, also plain models that see only the
   question text or only the image (the shortcut probes);
2. *tune*: on the tuning seeds (disjoint from the reported ones), every λ of the grids
   fine-tunes the tuned rows from that seed's plain model; each λ is scored on the **val**
   split by ``(consistency + reasoning accuracy) / 2`` averaged over the tuning seeds and the
   best is kept;
3. *fine-tune*: every reported seed fine-tunes every row at its λ (the baseline continues with
   BCE as long; the control takes SOrT's λ with the Grad-CAM term off; the margin row takes
   SOrT's λ with ``--margin``);
4. *report*: every fine-tuned model, the plain models and the probes are evaluated on the
   held-out **test** split, which no choice above has seen; paired differences per seed with
   t-intervals, Holm-corrected p-values and effect sizes (:mod:`.stats`).

Each run is an ordinary ``python -m sort_fast.train`` / ``sort_fast.evaluate`` call with its
own directory under ``--out``; a finished run is not repeated and a killed one resumes from its
checkpoint, so rerunning the command after an interruption continues where it stopped.
Results: ``--json`` (per-seed metrics of every row with the command of every number, the
commit, the chosen λ, the tuning scores and the statistics), ``--figure`` and a Markdown table
(printed, and written to ``OUT/table1.md``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..training.checkpoint import atomic_write
from ..data.synthetic import COLOURS, DESIGNS, TYPES
from ..errors import CLIError
from ..training.config import (OneLineParser, build_train_parser, non_negative_float,
                               non_negative_int, positive_float, positive_int, run_command)
from ..training.data import synthetic_split
from ..training.evaluation import COLUMNS, format_metric
from .stats import compare_rows, format_difference

__all__ = ["main", "build_parser", "run_tag", "val_score", "markdown", "plot", "PAPER",
           "METHODS", "METRICS", "PRIMARY", "PRIOR", "prior_columns"]

PROG = "python -m sort_fast.experiments.table1"
# row key -> --loss of sort_fast.train
METHODS = {"baseline": "bce", "control": "role-bce", "squint": "squint", "sort_sq": "sort-sq",
           "sort_sq_paper": "sort-sq", "sort": "sort", "sort_margin": "sort"}
DEFAULT_ROWS = ("baseline", "control", "sort_sq", "sort_sq_paper", "sort", "sort_margin")
ROW_NAMES = {"pretrained": "Pythia (plain model, not fine-tuned)",
             "baseline": "Pythia (BCE fine-tuned as long)",
             "control": "Control: SOrT's BCE weights and λ, no Grad-CAM term",
             "squint": "Pythia + SQuINT",
             "sort_sq": "Pythia + SOrT (only SQ), irrelevant BCE kept at λ3",
             "sort_sq_paper": "Pythia + SOrT (only SQ), λ3 = 0 (the paper's row)",
             "sort": "Pythia + SOrT (SQ + IQ)", "sort_margin": "Pythia + SOrT (SQ + IQ), margin > 0"}
SHORT_NAMES = {"pretrained": "plain", "baseline": "BCE", "control": "control",
               "squint": "SQuINT", "sort_sq": "SOrT SQ", "sort_sq_paper": "SOrT SQ λ3=0",
               "sort": "SOrT", "sort_margin": "SOrT m>0"}
# our row of each row of the paper, whose numbers are printed beside ours (the paper's SOrT
# with only sub-questions discards the irrelevant questions: λ3 = 0)
PAPER_ROWS = {"baseline": "baseline", "squint": "squint", "sort_sq": "sort_sq_paper",
              "sort": "sort"}
# shortcut probes: row key -> --input-ablation
PROBES = {"text_only": "text-only", "image_only": "image-only"}
# the metrics compared per seed (key -> higher is better); coupling_over_mode is consistency
# beyond the model's own per-template answer bias (docs/metrics.md); the primary ranking metrics
# are MP@1, MRR and MAP (scale-free), WPR is reported with its scale-free version beside it
PRIMARY = {"consistency": True, "coupling_over_mode": True, "coupling": True,
           "reasoning_accuracy": True,
           "sub_accuracy": True, "vqa_accuracy": True, "mp1": True, "mrr": True, "map": True,
           "wpr": False, "wpr_over_range": False}
# the metrics of a design with a training prior (the shifted-prior world), compared per seed
# beside PRIMARY: reasoning accuracy, consistency and R✓S✗ on the test questions whose answer
# agrees or conflicts with the training prior, and the shortcut gap (docs/metrics.md)
PRIOR = {"shortcut_gap": False, "conflicting_reasoning_accuracy": True,
         "agreeing_reasoning_accuracy": True, "conflicting_consistency": True,
         "agreeing_consistency": True, "conflicting_r_right_s_wrong": False,
         "agreeing_r_right_s_wrong": False}
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
PAPER = {PAPER_ROWS[row]: {key: None if v is None else round(v / _SCALE[key], 6)
                           for (key, *_), v in zip(METRICS, values)}
         for row, values in _PAPER_ROWS.items()}
# flags that must not change between an interrupted invocation and its continuation
_PROTOCOL_FLAGS = ("seeds", "tune_seeds", "probe_seeds", "rows", "pretrain_epochs",
                   "finetune_epochs", "attention_grid", "bce_grid", "irrelevant_grid", "margin",
                   "hidden_dim", "joint_dim", "image_glimpses", "batch_groups", "lr",
                   "synthetic_seed", "synthetic_design", "synthetic_train_groups",
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

    @property
    def command(self) -> str:
        """The shell command that computes this job's numbers (``--resume`` left out: it only
        continues an interrupted run to the same result)."""
        argv = [a for a in self.argv if a != "--resume"]
        return shlex.join([sys.executable, "-m", f"sort_fast.{self.module}", *argv])


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
        self.rows = list(args.rows)
        self.seeds = list(range(args.seeds))
        # tuning seeds come after the reported ones: no reported number was seen in tuning
        self.tune_seeds = list(range(args.seeds, args.seeds + args.tune_seeds))
        self.probe_seeds = list(range(args.probe_seeds))
        sort_grid = [{"lambda_reasoning": b, "lambda_sub": b, "lambda_irrelevant": i}
                     for b, i in product(args.bce_grid, args.irrelevant_grid)]
        # rows tuned on val (rows not listed take another row's λ, see chosen_lambdas)
        self.grids: Dict[str, List[Dict[str, float]]] = {
            "squint": [{"lambda_attention": a} for a in args.attention_grid],
            "sort_sq": sort_grid, "sort": sort_grid,
            "sort_sq_paper": [{"lambda_reasoning": b, "lambda_sub": b, "lambda_irrelevant": 0.0}
                              for b in args.bce_grid],
        }
        self.tuned = [row for row in self.rows if row in self.grids]

    def _common(self) -> List[str]:
        a = self.args
        return ["--threads", "1", "--device", a.device, "--eval-every", "0", "--no-plots",
                "--batch-groups", str(a.batch_groups), "--lr", str(a.lr),
                "--hidden-dim", str(a.hidden_dim), "--joint-dim", str(a.joint_dim),
                "--image-glimpses", str(a.image_glimpses),
                "--synthetic-seed", str(a.synthetic_seed),
                "--synthetic-design", a.synthetic_design,
                "--synthetic-train-groups", str(a.synthetic_train_groups),
                "--synthetic-val-groups", str(a.synthetic_val_groups)]

    @staticmethod
    def _resume(out: Path) -> List[str]:
        return ["--resume"] if (out / "checkpoint.pt").exists() else []

    def pretrain(self, seed: int, probe: Optional[str] = None) -> Job:
        """The plain model of ``seed``, or with ``probe`` a shortcut probe (:data:`PROBES`)."""
        out = self.root / ("pretrain" if probe is None else f"probe_{probe}") / f"seed{seed}"
        ablation = [] if probe is None else ["--input-ablation", PROBES[probe]]
        return Job("train", ("--out", str(out), "--loss", "bce", "--seed", str(seed),
                             "--epochs", str(self.args.pretrain_epochs), *ablation,
                             *self._common(), *self._resume(out)), out)

    def finetune(self, row: str, lambdas: Dict[str, float], seed: int) -> Job:
        out = self.root / "finetune" / row / run_tag(lambdas) / f"seed{seed}"
        flags = [x for k, v in lambdas.items() for x in ("--" + k.replace("_", "-"), repr(v))]
        if row == "sort_margin":
            flags += ["--margin", repr(self.args.margin)]
        init = self.pretrain(seed).out / "checkpoint.pt"
        return Job("train", ("--out", str(out), "--loss", METHODS[row], "--seed", str(seed),
                             "--init", str(init), "--epochs", str(self.args.finetune_epochs),
                             *flags, *self._common(), *self._resume(out)), out)

    def test(self, job: Job) -> Job:
        out = job.out / "test"
        return Job("evaluate", (str(job.out / "checkpoint.pt"), "--out", str(out),
                                "--synthetic-split", "test", "--synthetic-val-groups",
                                str(self.args.synthetic_test_groups), "--threads", "1",
                                "--device", self.args.device, "--no-plots"), out)

    def chosen_lambdas(self, tuned: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
        """Every row's λ from the tuned rows' choices: the baseline has none, the control and
        the margin row take full SOrT's."""
        sort = tuned.get("sort", {"lambda_reasoning": self.args.bce_grid[0],
                                  "lambda_sub": self.args.bce_grid[0],
                                  "lambda_irrelevant": self.args.irrelevant_grid[0]})
        derived = {"baseline": {}, "control": sort, "sort_margin": sort}
        return {row: tuned[row] if row in tuned else derived[row] for row in self.rows}


def val_score(metrics: Dict[str, Any]) -> float:
    """The tuning criterion: ``(consistency + reasoning accuracy) / 2`` on the val split."""
    return 0.5 * (metrics["consistency"] + metrics["reasoning_accuracy"])


def _row(metrics: Dict[str, Any], seed: int, **commands: str) -> Dict[str, Any]:
    """One seed's entry: every metric of the run (Table 1's under their table1.json names too)
    and the commands its numbers come from."""
    row = {"seed": seed, **metrics}
    row.update({key: metrics.get(source) for key, source, *_ in METRICS})
    row.update(prior_columns(metrics))
    row.update(commands)
    return row


def prior_columns(metrics: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """The :data:`PRIOR` metrics of a run's ``prior_agreement`` breakdown under flat names
    (none for a design without a training prior)."""
    breakdown = metrics.get("prior_agreement")
    if not breakdown:
        return {}
    flat = {f"{subset}_{key}": breakdown[subset][key] for subset in ("agreeing", "conflicting")
            for key in ("reasoning_accuracy", "consistency", "r_right_s_wrong")}
    return {key: breakdown["shortcut_gap"] if key == "shortcut_gap" else flat[key]
            for key in PRIOR}


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[float, float]:
    x = np.array([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def _number(key: str, value: float, sign: str = "") -> str:
    return format_metric(value, _SCALE.get(key, 100), sign)


def _cell(key: str, values: Sequence[Optional[float]]) -> str:
    m, s = _mean_std(values)
    return "–" if m != m else f"{_number(key, m)} ± {_number(key, s)}"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(line) + " |" for line in lines)]


def _template_value(entry: Dict[str, Any], template: str, key: str) -> Optional[float]:
    return entry.get("per_template", {}).get(template, {}).get(key)


def markdown(results: Dict[str, Any]) -> str:
    """Table 1 as mean ± std over seeds beside the paper's numbers; the primary metrics; each
    row's paired difference from the baseline and of the SOrT rows from the control (mean,
    95 % t-interval, p and Holm-corrected p, d_z, seeds better); per-template numbers with the
    shortcut probes."""
    rows = {"pretrained": results["pretrained"], **results["methods"]}
    seeds = len(results["pretrained"])
    lines = _table(["Method", *(header for _, _, header, _, _ in METRICS)],
                   [[ROW_NAMES[row], *(_cell(key, [r[key] for r in per_seed])
                                       for key, *_ in METRICS)]
                    for row, per_seed in rows.items()]
                   + [[f"*paper: {ROW_NAMES[row]}*",
                       *("–" if results["paper"][row][key] is None
                         else _number(key, results["paper"][row][key]) for key, *_ in METRICS)]
                      for row in PAPER_ROWS.values() if row in results["paper"]])
    lines += ["", f"Primary metrics, mean ± std over {seeds} seeds (coupling_over_mode: "
              "consistency beyond the model's per-template mode answer; coupling: beyond what "
              "per-template sub-question accuracy predicts under independence; wpr_over_range: "
              "WPR divided by each group's cosine range):", ""]
    extra = ("mode_consistency", "similarity_sub_mean", "similarity_irrelevant_mean",
             "similarity_group_range_mean")
    lines += _table(["Method", *PRIMARY, *extra],
                    [[ROW_NAMES[row], *(_cell(key, [r.get(key) for r in per_seed])
                                        for key in (*PRIMARY, *extra))]
                     for row, per_seed in rows.items()])
    prior = [key for key in PRIOR if any(r.get(key) is not None for per_seed in rows.values()
                                         for r in per_seed)]
    if prior:
        lines += ["", f"Test questions whose answer agrees or conflicts with the training "
                  f"prior of their template, mean ± std over {seeds} seeds (shortcut_gap: "
                  "reasoning accuracy on agreeing minus conflicting questions):", ""]
        lines += _table(["Method", *prior],
                        [[ROW_NAMES[row], *(_cell(key, [r.get(key) for r in per_seed])
                                            for key in prior)]
                         for row, per_seed in rows.items()])
    compared = (*PRIMARY, *prior)
    for family, title in (("vs_baseline", "Paired difference from the baseline"),
                          ("vs_control", "Paired difference from the control (isolates the "
                                         "Grad-CAM term)")):
        comparisons = results["stats"].get(family)
        if not comparisons:
            continue
        lines += ["", f"{title}: mean [95 % CI] p (Holm over this table), d_z, seeds better:",
                  ""]
        lines += _table(["Method", *compared],
                        [[ROW_NAMES[row], *("–" if key not in d else format_difference(
                            d[key], scale=_SCALE.get(key, 100)) for key in compared)]
                         for row, d in comparisons.items()])
    probes = results.get("probes", {})
    templates = sorted({t for per_seed in rows.values() for r in per_seed
                        for t in r.get("per_template", {})})
    for key, title in (("reasoning_accuracy", "Reasoning accuracy"),
                       ("sub_accuracy", "Sub-question accuracy"),
                       ("consistency", "Consistency"),
                       ("coupling_over_mode", "Coupling over the mode answer"),
                       ("yes_rate", "Yes-rate of the reasoning answers")):
        if not templates:
            break
        reasoning = key == "reasoning_accuracy"
        columns = {**({f"probe: {p}": v for p, v in probes.items()} if reasoning else {}),
                   **{SHORT_NAMES[row]: per_seed for row, per_seed in rows.items()}}
        rule = results.get("wording_rule", {}) if reasoning else {}
        lines += ["", f"{title} per template, mean ± std over seeds"
                  + (" (rule: the wording-only majority rule)" if rule else "") + ":", ""]
        lines += _table(["Template", *(["rule: wording"] if rule else []), *columns],
                        [[t, *([_number(key, rule[t])] if rule else []),
                          *(_cell(key, [_template_value(r, t, key) for r in per_seed])
                            for per_seed in columns.values())] for t in templates])
    return "\n".join(lines)


def plot(results: Dict[str, Any], path: Path) -> None:
    """Bars of mean ± std per row for the headline metrics, each seed as a dot and the
    paper's value as a black diamond (real data: compare directions, not levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"pretrained": results["pretrained"], **results["methods"]}
    keys = ("consistency", "coupling_over_mode", "reasoning_accuracy", "sub_accuracy", "mp1",
            "mrr", "map", "wpr_over_range")
    if any(r.get("shortcut_gap") is not None for per_seed in rows.values() for r in per_seed):
        keys = keys[:4] + ("conflicting_reasoning_accuracy",) + keys[4:] + ("shortcut_gap",)
    titles = {**{key: header for key, _, header, _, _ in METRICS},
              "coupling_over_mode": "Coupling over the mode answer ↑",
              "sub_accuracy": "Sub-question accuracy ↑", "map": "MAP ↑",
              "wpr_over_range": "WPR / cosine range ↓",
              "conflicting_reasoning_accuracy": "Reasoning acc., prior-conflicting ↑",
              "shortcut_gap": "Shortcut gap (agreeing − conflicting) ↓"}
    colours = plt.get_cmap("tab10")(np.arange(len(rows)))
    fig, axes = plt.subplots(2, len(keys) // 2, figsize=(4 * len(keys) // 2, 7))
    x = np.arange(len(rows))
    for ax, key in zip(axes.ravel(), keys):
        k = _SCALE.get(key, 100)
        everything = []
        for i, (row, per_seed) in enumerate(rows.items()):
            values = np.array([r.get(key) for r in per_seed if r.get(key) is not None]) * k
            m, s = _mean_std(list(values))
            ax.bar(i, m, yerr=s, color=colours[i], alpha=0.35, capsize=3)
            ax.plot(np.full(values.size, i), values, "o", color=colours[i], ms=3)
            everything += list(values)
            paper = results["paper"].get(row, {}).get(key)
            if paper is not None:
                ax.plot(i, paper * k, "D", color="black", ms=5, label="paper (real data)")
                everything.append(paper * k)
        if everything:
            low, high = min(everything), max(everything)
            pad = 0.1 * (high - low) + 1e-9
            ax.set_ylim(low - pad, high + pad)
        ax.set_title(titles.get(key, key), fontsize=10)
        ax.set_xticks(x, [SHORT_NAMES[row] for row in rows], fontsize=7, rotation=30)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles[:1], labels[:1], fontsize=7, loc="best")
    fig.suptitle(f"Table 1 on the synthetic benchmark ({results['protocol']['synthetic_design']} "
                 f"design, world {results['protocol']['synthetic_seed']}), test split, "
                 f"{len(results['pretrained'])} seeds (bars: mean ± std, dots: seeds)",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def wording_rule(args: argparse.Namespace) -> Dict[str, float]:
    """Accuracy on the test split's reasoning questions, per template and overall (``"all"``),
    of the rule that reads only the wording: the training split's majority answer for the same
    question with object types and colour words masked (the template's majority when the
    masked wording never occurred in training). A text-only shortcut without any learning."""
    masked = re.compile(r"\b(%s)\b" % "|".join(TYPES + COLOURS))
    data = {split: synthetic_split(args.synthetic_seed, split, groups, args.synthetic_design)
            for split, groups in (("train", args.synthetic_train_groups),
                                  ("test", args.synthetic_test_groups))}
    by_wording: Dict[str, Counter] = defaultdict(Counter)
    by_template: Dict[str, Counter] = defaultdict(Counter)
    for group, template in zip(data["train"], data["train"].templates):
        by_wording[masked.sub("_", group.questions[0])][group.answers[0]] += 1
        by_template[template][group.answers[0]] += 1
    right: Dict[str, List[bool]] = defaultdict(list)
    for group, template in zip(data["test"], data["test"].templates):
        votes = by_wording.get(masked.sub("_", group.questions[0])) or by_template[template]
        right[template].append(votes.most_common(1)[0][0] == group.answers[0])
    accuracy = {t: float(np.mean(v)) for t, v in sorted(right.items())}
    accuracy["all"] = float(np.mean([x for v in right.values() for x in v]))
    return accuracy


def _commit() -> Dict[str, Any]:
    """The git commit of the code that ran (``None`` outside a git checkout) and whether the
    working tree had changes."""
    cwd = Path(__file__).resolve().parent

    def git(*argv: str) -> Optional[str]:
        try:
            return subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status)}


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
    if args.tune_seeds > 0 and not set(args.rows) & {"squint", "sort_sq", "sort_sq_paper",
                                                      "sort"}:
        raise CLIError("--tune-seeds needs a tuned row in --rows (squint, sort_sq, "
                       "sort_sq_paper or sort)")
    if "baseline" not in args.rows:
        raise CLIError("--rows must include baseline (every row is compared with it)")
    code = _commit()  # before any run: the code the numbers come from
    root = Path(args.out)
    protocol = _check_protocol(args, root)
    plan = Plan(args)
    workers = args.jobs

    probe_jobs = {probe: [plan.pretrain(s, probe) for s in plan.probe_seeds] for probe in PROBES}
    _execute([plan.pretrain(s) for s in plan.seeds + plan.tune_seeds]
             + [job for jobs in probe_jobs.values() for job in jobs], workers, "pretrain")
    tuned = {row: plan.grids[row] for row in plan.tuned if plan.tune_seeds}
    tune_jobs = [plan.finetune(row, lam, s) for row, grid in tuned.items() for lam in grid
                 for s in plan.tune_seeds]
    _execute(tune_jobs, workers, "tune (val)")

    tuning: Dict[str, List[Dict[str, Any]]] = {}
    best: Dict[str, Dict[str, float]] = {}
    for row, grid in tuned.items():
        scored = []
        for lam in grid:
            jobs = [plan.finetune(row, lam, s) for s in plan.tune_seeds]
            val = [job.metrics() for job in jobs]
            scored.append({"lambdas": lam, "val_score": float(np.mean([val_score(m)
                                                                        for m in val])),
                           "val": [_row(m, s, train_command=job.command)
                                   for m, s, job in zip(val, plan.tune_seeds, jobs)]})
        tuning[row] = scored
        best[row] = max(scored, key=lambda r: r["val_score"])["lambdas"]  # first on ties
    chosen = plan.chosen_lambdas({row: best.get(row, plan.grids[row][0]) for row in plan.tuned})

    final = {row: [plan.finetune(row, chosen[row], s) for s in plan.seeds] for row in plan.rows}
    _execute([job for jobs in final.values() for job in jobs], workers, "fine-tune")
    trained = {"pretrained": [plan.pretrain(s) for s in plan.seeds], **final, **probe_jobs}
    tests = {row: [plan.test(job) for job in jobs] for row, jobs in trained.items()}
    _execute([job for jobs in tests.values() for job in jobs], workers, "test")

    def report(row: str, seeds: Sequence[int]) -> List[Dict[str, Any]]:
        entries = []
        for seed, job, test in zip(seeds, trained[row], tests[row]):
            commands = {"train_command": job.command, "test_command": test.command}
            if row in final:  # fine-tuned from the plain model of its seed
                commands["init_command"] = plan.pretrain(seed).command
            entries.append(_row(test.metrics(), seed, **commands))
        return entries

    methods = {row: report(row, plan.seeds) for row in plan.rows}
    per_seed = {"pretrained": report("pretrained", plan.seeds), **methods}
    def compare(control: str, rows: List[str]) -> Dict[str, Any]:
        # a metric undefined in some seed (e.g. coupling without a right reasoning answer) is
        # left out of the family rather than compared on fewer seeds
        defined = {key: up for key, up in {**PRIMARY, **PRIOR}.items()
                   if all(r.get(key) is not None for row in (control, *rows)
                          for r in per_seed[row])}
        if not rows or len(plan.seeds) < 2 or not defined:
            return {}
        return compare_rows(per_seed, control, rows, defined)

    stats = {"vs_baseline": compare("baseline", [row for row in plan.rows if row != "baseline"])}
    if "control" in plan.rows:
        stats["vs_control"] = compare("control", [
            row for row in ("sort", "sort_sq_paper", "sort_sq", "sort_margin")
            if row in plan.rows])
    results = {
        "split": "test",
        "units": "fractions (the paper prints percentages; WPR x100); grounding is Spearman's "
                 "rho against the synthetic grounding truth (the paper: against VQA-HAT)",
        **code,
        "command": shlex.join([sys.executable, "-m", "sort_fast.experiments.table1",
                               *args.argv]),
        "protocol": protocol,
        "lambdas": chosen,
        "tuning": tuning,
        "paper": PAPER,
        "pretrained": per_seed["pretrained"],
        "methods": methods,
        "probes": {probe: report(probe, plan.probe_seeds) for probe in PROBES},
        "wording_rule": wording_rule(args),
        "stats": stats,
        "statistics": "per-seed paired differences (same seed = same plain model); 95 % "
                      "t-intervals; two-sided paired t-test p, Holm-corrected over every "
                      "(row, metric) of one table (one world); d_z = mean / std of the "
                      "differences; Wilcoxon signed-rank p beside it",
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
        "Reproduce the paper's Table 1 on the embedded synthetic benchmark. Trains plain "
        "models into the perception regime, fine-tunes every row from the same plain model "
        "over several seeds, tunes λ on the val split with seeds of its own, and reports the "
        "held-out test split with paired statistics and shortcut probes. The defaults take "
        "about 35 minutes per world on a 2-core CPU; --synthetic-seed picks the world."))
    p.add_argument("--out", default="runs/table1-balanced-world0",
                   help="directory of all runs (pretrain/, probe_*/, finetune/<row>/<λ>/seed<k>/, "
                        "table1.md); rerunning continues an interrupted invocation "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete --out first instead of continuing the runs in it")
    p.add_argument("--json", default="docs/table1_balanced_world0.json",
                   help="results file; empty to skip (default: %(default)s)")
    p.add_argument("--figure", default="docs/table1_balanced_world0.png",
                   help="figure file; empty to skip (default: %(default)s)")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="runs at a time, one process and one CPU thread each "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="device of every run (default: %(default)s)")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--rows", nargs="+", choices=tuple(METHODS), default=list(DEFAULT_ROWS),
                       help="rows to fine-tune: baseline (BCE as long), control (SOrT's per-role "
                            "BCE weights at SOrT's λ, no Grad-CAM term), squint, sort_sq (only "
                            "SQ, irrelevant BCE kept at λ3), sort_sq_paper (only SQ, λ3 = 0), "
                            "sort, sort_margin (sort's λ with --margin) (default: %(default)s)")
    proto.add_argument("--seeds", type=positive_int, default=10,
                       help="reported seeds 0..N-1 of every row (initialisation, dropout, data "
                            "order; default: %(default)s)")
    proto.add_argument("--tune-seeds", type=non_negative_int, default=2,
                       help="seeds N..N+K-1 (after the reported ones) train every λ of the "
                            "grids, scored on val; 0 takes each grid's first value "
                            "(default: %(default)s)")
    proto.add_argument("--probe-seeds", type=non_negative_int, default=2,
                       help="seeds of the shortcut probes, plain models that see only the "
                            "question (text-only) or only the image (image-only) "
                            "(default: %(default)s)")
    proto.add_argument("--pretrain-epochs", type=positive_int, default=60,
                       help="epochs of the plain models and probes (default: %(default)s)")
    proto.add_argument("--finetune-epochs", type=positive_int, default=8,
                       help="epochs of every fine-tuned row, the baseline included "
                            "(default: %(default)s)")
    proto.add_argument("--attention-grid", type=non_negative_float, nargs="+",
                       default=[0.1, 1.0, 10.0],
                       help="SQuINT's --lambda-attention values (default: %(default)s)")
    proto.add_argument("--bce-grid", type=non_negative_float, nargs="+",
                       default=[0.227, 2.27],
                       help="SOrT's λ1 = λ2 (--lambda-reasoning = --lambda-sub) values "
                            "(default: %(default)s; the paper's is 2.27)")
    proto.add_argument("--irrelevant-grid", type=non_negative_float, nargs="+",
                       default=[3e-4, 2.27],
                       help="SOrT's λ3 (--lambda-irrelevant) values of sort and sort_sq "
                            "(default: %(default)s; the paper's is 3e-4)")
    proto.add_argument("--margin", type=positive_float, default=0.25,
                       help="hinge margin of the sort_margin row (default: %(default)s)")
    model = p.add_argument_group("model and data (defaults: sort_fast.train's unless stated)")
    model.add_argument("--lr", type=positive_float, default=train.lr,
                       help="learning rate of every run (default: %(default)s)")
    model.add_argument("--batch-groups", type=positive_int, default=train.batch_groups,
                       help="groups per step (default: %(default)s)")
    model.add_argument("--hidden-dim", type=positive_int, default=train.hidden_dim,
                       help="LSTM, attention and text-classifier width (default: %(default)s)")
    model.add_argument("--joint-dim", type=positive_int, default=train.joint_dim,
                       help="joint embedding width (default: %(default)s)")
    model.add_argument("--image-glimpses", type=positive_int, default=1,
                       help="attention heads over the image (Pythia: 2; the balanced design's "
                            "templates need one; default: %(default)s)")
    model.add_argument("--synthetic-seed", type=int, default=train.synthetic_seed,
                       help="the world: seed of the synthetic benchmark (default: %(default)s)")
    model.add_argument("--synthetic-design", choices=sorted(DESIGNS), default="balanced",
                       help="reasoning templates: balanced (even answer priors; "
                            "docs/synthetic_benchmark.md), shift (strong priors in train and "
                            "val, the balanced test split: the shifted-prior world) or v1 (the "
                            "original, with answer priors) (default: %(default)s)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the results
    return run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
