"""The Table 1 protocol (docs/REPRODUCTION.md): which runs it makes with which flags, how λ is
chosen on the val split, and the record of the flags that must not change between an
interrupted invocation and its continuation."""
from __future__ import annotations

import argparse
import json
import shutil
from itertools import product
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CLIError
from ..training.checkpoint import atomic_write
from .columns import seed_entry
from .jobs import Job, execute

__all__ = ["METHODS", "DEFAULT_ROWS", "TUNED_ROWS", "PROBES", "run_tag", "val_score", "Plan",
           "tune", "check_protocol"]

# row key -> --loss of sort_fast.train
METHODS = {"baseline": "bce", "control": "role-bce", "squint": "squint", "sort_sq": "sort-sq",
           "sort_sq_paper": "sort-sq", "sort": "sort", "sort_margin": "sort"}
DEFAULT_ROWS = ("baseline", "control", "sort_sq", "sort_sq_paper", "sort", "sort_margin")
TUNED_ROWS = ("squint", "sort_sq", "sort_sq_paper", "sort")  # the rows with a λ grid
# shortcut probes: row key -> --input-ablation
PROBES = {"text_only": "text-only", "image_only": "image-only"}

Lambdas = Dict[str, float]


def run_tag(lambdas: Lambdas) -> str:
    """The directory name of a fine-tuning setting, e.g. ``reasoning2.27_sub2.27_irrelevant0.0003``
    (``default`` without λ)."""
    return "_".join(f"{k.removeprefix('lambda_')}{v:g}" for k, v in lambdas.items()) or "default"


def val_score(metrics: Dict[str, Any]) -> float:
    """The tuning criterion: ``(consistency + reasoning accuracy) / 2`` on the val split."""
    return 0.5 * (metrics["consistency"] + metrics["reasoning_accuracy"])


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
        self.grids: Dict[str, List[Lambdas]] = {
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

    def finetune(self, row: str, lambdas: Lambdas, seed: int) -> Job:
        """``row`` at ``lambdas`` fine-tuned from the plain model of ``seed``."""
        out = self.root / "finetune" / row / run_tag(lambdas) / f"seed{seed}"
        flags = [x for k, v in lambdas.items() for x in ("--" + k.replace("_", "-"), repr(v))]
        if row == "sort_margin":
            flags += ["--margin", repr(self.args.margin)]
        init = self.pretrain(seed).out / "checkpoint.pt"
        return Job("train", ("--out", str(out), "--loss", METHODS[row], "--seed", str(seed),
                             "--init", str(init), "--epochs", str(self.args.finetune_epochs),
                             *flags, *self._common(), *self._resume(out)), out)

    def test(self, job: Job) -> Job:
        """The evaluation of ``job``'s checkpoint on the test split."""
        out = job.out / "test"
        return Job("evaluate", (str(job.out / "checkpoint.pt"), "--out", str(out),
                                "--synthetic-split", "test", "--synthetic-val-groups",
                                str(self.args.synthetic_test_groups), "--threads", "1",
                                "--device", self.args.device, "--no-plots"), out)

    def chosen_lambdas(self, tuned: Dict[str, Lambdas]) -> Dict[str, Lambdas]:
        """Every row's λ from the tuned rows' choices: the baseline has none, the control and
        the margin row take full SOrT's."""
        sort = tuned.get("sort", {"lambda_reasoning": self.args.bce_grid[0],
                                  "lambda_sub": self.args.bce_grid[0],
                                  "lambda_irrelevant": self.args.irrelevant_grid[0]})
        derived = {"baseline": {}, "control": sort, "sort_margin": sort}
        return {row: tuned[row] if row in tuned else derived[row] for row in self.rows}


def _scored(plan: Plan, row: str, lambdas: Lambdas) -> Dict[str, Any]:
    """One λ of a grid: its val score averaged over the tuning seeds and each seed's entry."""
    jobs = [plan.finetune(row, lambdas, s) for s in plan.tune_seeds]
    val = [job.metrics() for job in jobs]
    return {"lambdas": lambdas, "val_score": float(np.mean([val_score(m) for m in val])),
            "val": [seed_entry(m, s, train_command=job.command)
                    for m, s, job in zip(val, plan.tune_seeds, jobs)]}


def tune(plan: Plan, workers: int) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, Lambdas]]:
    """Trains every λ of the tuned rows' grids on the tuning seeds (none without tuning seeds:
    each grid's first λ is taken) and keeps the best val score, the first on ties. Returns the
    scores of every row's grid and every row's λ (:meth:`Plan.chosen_lambdas`)."""
    grids = {row: plan.grids[row] for row in plan.tuned if plan.tune_seeds}
    execute([plan.finetune(row, lam, s) for row, grid in grids.items() for lam in grid
             for s in plan.tune_seeds], workers, "tune (val)")
    tuning = {row: [_scored(plan, row, lam) for lam in grid] for row, grid in grids.items()}
    best = {row: max(scored, key=lambda r: r["val_score"])["lambdas"]
            for row, scored in tuning.items()}
    chosen = plan.chosen_lambdas({row: best.get(row, plan.grids[row][0]) for row in plan.tuned})
    return tuning, chosen


def check_protocol(args: argparse.Namespace, root: Path, flags: Sequence[str]
                   ) -> Dict[str, Any]:
    """Refuses to continue an ``--out`` started with other values of the protocol ``flags``
    (argument names; its runs would mix); returns the protocol (``{flag: value}`` in the order
    of ``flags``), stored in ``OUT/protocol.json``. With ``args.overwrite`` ``root`` is deleted
    first."""
    config = {name: getattr(args, name) for name in flags}
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
