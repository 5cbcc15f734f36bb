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
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..data.synthetic import DESIGNS
from ..errors import CLIError
from ..training.checkpoint import atomic_write
from ..training.config import (
    OneLineParser,
    build_train_parser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from .columns import METRICS, PAPER, PRIMARY, PRIOR, Entries, prior_columns, seed_entry
from .figure import plot
from .jobs import Job, execute
from .protocol import (
    DEFAULT_ROWS,
    METHODS,
    PROBES,
    TUNED_ROWS,
    Plan,
    check_protocol,
    run_tag,
    tune,
    val_score,
)
from .stats import compare_rows
from .tables import markdown
from .wording_rule import wording_rule

__all__ = ["main", "build_parser", "run", "protocol_flags", "run_tag", "val_score", "markdown",
           "plot", "PAPER", "METHODS", "METRICS", "PRIMARY", "PRIOR", "PROBES", "prior_columns",
           "wording_rule"]

PROG = "python -m sort_fast.experiments.table1"
# the argument groups whose flags make the protocol: an --out holding runs made with other
# values of them is not continued (protocol.check_protocol)
PROTOCOL_GROUP = "protocol"
MODEL_GROUP = "model, data and device (defaults: sort_fast.train's unless stated)"


def protocol_flags(parser: argparse.ArgumentParser) -> Tuple[str, ...]:
    """The argument names of every flag in the parser's :data:`PROTOCOL_GROUP` and
    :data:`MODEL_GROUP`, in the parser's order."""
    # argparse keeps its groups' flags in private attributes only
    return tuple(action.dest for group in parser._action_groups
                 if group.title in (PROTOCOL_GROUP, MODEL_GROUP)
                 for action in group._group_actions)


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


def _check_rows(args: argparse.Namespace) -> None:
    """One-line errors for ``--rows`` the protocol cannot run."""
    if args.tune_seeds > 0 and not set(args.rows) & set(TUNED_ROWS):
        raise CLIError("--tune-seeds needs a tuned row in --rows (squint, sort_sq, "
                       "sort_sq_paper or sort)")
    if "baseline" not in args.rows:
        raise CLIError("--rows must include baseline (every row is compared with it)")


def _pretrain(plan: Plan, workers: int) -> Dict[str, List[Job]]:
    """Trains the plain models of the reported and tuning seeds and the shortcut probes;
    returns the probes' jobs (probe -> one per probe seed)."""
    probes = {probe: [plan.pretrain(s, probe) for s in plan.probe_seeds] for probe in PROBES}
    execute([plan.pretrain(s) for s in plan.seeds + plan.tune_seeds]
            + [job for jobs in probes.values() for job in jobs], workers, "pretrain")
    return probes


def _finetune_and_test(plan: Plan, chosen: Dict[str, Dict[str, float]],
                       probes: Dict[str, List[Job]], workers: int
                       ) -> Tuple[Dict[str, List[Job]], Dict[str, List[Job]]]:
    """Fine-tunes every row of every reported seed at its ``chosen`` λ and evaluates the
    fine-tuned models, the plain models and the ``probes`` on the test split; returns the
    trained jobs and their tests (row -> one per seed; ``pretrained`` holds the plain
    models)."""
    final = {row: [plan.finetune(row, chosen[row], s) for s in plan.seeds] for row in plan.rows}
    execute([job for jobs in final.values() for job in jobs], workers, "fine-tune")
    trained = {"pretrained": [plan.pretrain(s) for s in plan.seeds], **final, **probes}
    tests = {row: [plan.test(job) for job in jobs] for row, jobs in trained.items()}
    execute([job for jobs in tests.values() for job in jobs], workers, "test")
    return trained, tests


def _entries(plan: Plan, trained: Dict[str, List[Job]], tests: Dict[str, List[Job]],
             row: str, seeds: Sequence[int]) -> Entries:
    """The test entry of every seed of ``row`` with the commands of its numbers (a fine-tuned
    row's also the plain model's, ``init_command``)."""
    entries = []
    for seed, job, test in zip(seeds, trained[row], tests[row]):
        commands = {"train_command": job.command, "test_command": test.command}
        if row in plan.rows:  # fine-tuned from the plain model of its seed
            commands["init_command"] = plan.pretrain(seed).command
        entries.append(seed_entry(test.metrics(), seed, **commands))
    return entries


def _statistics(plan: Plan, per_seed: Dict[str, Entries]) -> Dict[str, Any]:
    """Paired comparisons of every row with the baseline and of the SOrT rows with the
    control (when it runs) over the :data:`PRIMARY` and :data:`PRIOR` metrics."""
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
    return stats


def _write(results: Dict[str, Any], args: argparse.Namespace) -> str:
    """Writes ``OUT/table1.md``, ``--json`` and ``--figure``; returns the Markdown tables."""
    table = markdown(results)
    atomic_write(Path(args.out) / "table1.md", lambda f: f.write((table + "\n").encode()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda f: f.write(json.dumps(results, indent=1).encode()
                                                  + b"\n"))
    if args.figure:
        plot(results, Path(args.figure))
    return table


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Runs the protocol as the flags say; returns what ``--json`` holds."""
    _check_rows(args)
    code = _commit()  # before any run: the code the numbers come from
    protocol = check_protocol(args, Path(args.out), protocol_flags(build_parser()))
    plan = Plan(args)
    probes = _pretrain(plan, args.jobs)
    tuning, chosen = tune(plan, args.jobs)
    trained, tests = _finetune_and_test(plan, chosen, probes, args.jobs)
    methods = {row: _entries(plan, trained, tests, row, plan.seeds) for row in plan.rows}
    per_seed = {"pretrained": _entries(plan, trained, tests, "pretrained", plan.seeds),
                **methods}
    stats = _statistics(plan, per_seed)
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
        "probes": {probe: _entries(plan, trained, tests, probe, plan.probe_seeds)
                   for probe in PROBES},
        "wording_rule": wording_rule(args),
        "stats": stats,
        "statistics": "per-seed paired differences (same seed = same plain model); 95 % "
                      "t-intervals; two-sided paired t-test p, Holm-corrected over every "
                      "(row, metric) of one table (one world); d_z = mean / std of the "
                      "differences; Wilcoxon signed-rank p beside it",
    }
    print(_write(results, args), flush=True)
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
    proto = p.add_argument_group(PROTOCOL_GROUP)
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
    proto.add_argument("--rows", nargs="+", choices=tuple(METHODS), default=list(DEFAULT_ROWS),
                       help="rows to fine-tune: baseline (BCE as long), control (SOrT's per-role "
                            "BCE weights at SOrT's λ, no Grad-CAM term), squint, sort_sq (only "
                            "SQ, irrelevant BCE kept at λ3), sort_sq_paper (only SQ, λ3 = 0), "
                            "sort, sort_margin (sort's λ with --margin) (default: %(default)s)")
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
    model = p.add_argument_group(MODEL_GROUP)
    model.add_argument("--hidden-dim", type=positive_int, default=train.hidden_dim,
                       help="LSTM, attention and text-classifier width (default: %(default)s)")
    model.add_argument("--joint-dim", type=positive_int, default=train.joint_dim,
                       help="joint embedding width (default: %(default)s)")
    model.add_argument("--image-glimpses", type=positive_int, default=1,
                       help="attention heads over the image (Pythia: 2; the balanced design's "
                            "templates need one; default: %(default)s)")
    model.add_argument("--batch-groups", type=positive_int, default=train.batch_groups,
                       help="groups per step (default: %(default)s)")
    model.add_argument("--lr", type=positive_float, default=train.lr,
                       help="learning rate of every run (default: %(default)s)")
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
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                       help="device of every run (default: %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in the results
    return run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
