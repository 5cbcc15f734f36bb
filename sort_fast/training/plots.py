"""PNG plots of an evaluation and of training runs (matplotlib, Agg backend).

    python -m sort_fast.training.plots curves RUN_DIR            # RUN_DIR/training_curves.png
    python -m sort_fast.training.plots compare RUN_DIR ... --out compare.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from ..data import regions_to_map  # noqa: E402
from ..layout import ROLE_IRRELEVANT, ROLE_SUB  # noqa: E402
from .eval_result import EvalResult, Example  # noqa: E402

__all__ = ["plot_all", "plot_training_curves", "plot_comparison", "PLOTS", "CURVES"]

PLOTS = ("quadrants.png", "similarity_hist.png", "examples.png")
CURVES = "training_curves.png"  # written beside the PLOTS when the run folder has a log.jsonl
_ROLE_COLOUR = {0: "black", ROLE_SUB: "tab:green", ROLE_IRRELEVANT: "tab:red"}
_ROLE_TAG = {0: "R", ROLE_SUB: "S", ROLE_IRRELEVANT: "I"}
# what the comparison plot shows: metrics.json key -> label (all fractions, shown in %)
_COMPARED = {"consistency": "consistency", "reasoning_accuracy": "reasoning acc.",
             "sub_accuracy": "sub-question acc.", "mp1": "MP@1", "mrr": "MRR", "map": "MAP",
             "ranking_accuracy": "ranking acc."}


def _quadrants(result: EvalResult, path: Path, method: str) -> None:
    m = result.metrics
    names = ["R✓S✓", "R✓S✗", "R✗S✓", "R✗S✗"]
    values = [100 * m[k] for k in ("r_right_s_right", "r_right_s_wrong", "r_wrong_s_right",
                                   "r_wrong_s_wrong")]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(names, values, color=["tab:green", "tab:orange", "tab:blue", "tab:gray"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("% of <reasoning, sub-question> pairs")
    ax.set_title(f"{method}: consistency {100 * m['consistency']:.1f}%")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histogram(result: EvalResult, path: Path, method: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.8))
    bins = np.linspace(-1, 1, 41)
    for role, label in ((ROLE_SUB, "sub-questions"), (ROLE_IRRELEVANT, "irrelevant")):
        values = result.similarity[result.roles == role]
        if values.size:
            ax.hist(values, bins=bins, alpha=0.6, density=True, color=_ROLE_COLOUR[role],
                    label=f"{label} (mean {values.mean():.2f})")
    ax.set_xlabel("Grad-CAM cosine similarity with the reasoning question")
    ax.set_ylabel("density")
    # the legend sits above the axes, where it cannot cover the tallest bars
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(method, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples(examples: List[Example], path: Path) -> None:
    rows = max(1, len(examples))
    fig, axes = plt.subplots(rows, 3, figsize=(10, 2.9 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for ax_row, ex in zip(axes, examples):
        text_ax, cam_ax, truth_ax = ax_row
        text_ax.axis("off")
        # role by colour and letter (R, S, I), answer right/wrong as a word: no meaning rides
        # on colour alone
        lines = [(f"R  {ex.questions[0]} → {ex.predicted[0]} "
                  f"({'right' if ex.correct[0] else 'wrong'})", _ROLE_COLOUR[0])]
        for i in np.argsort(-ex.similarity[1:], kind="stable") + 1:
            role = int(ex.roles[i])
            lines.append((f"{_ROLE_TAG[role]}  {ex.similarity[i]:+.2f}  {ex.questions[i]} → "
                          f"{ex.predicted[i]} ({'right' if ex.correct[i] else 'wrong'})",
                          _ROLE_COLOUR[role]))
        for k, (line, colour) in enumerate(lines):
            text_ax.text(0, 1 - k / max(len(lines), 12), line, color=colour, fontsize=7.5,
                         va="top", transform=text_ax.transAxes)
        maps = [regions_to_map(ex.cam, ex.boxes),
                regions_to_map(ex.grounding if ex.grounding is not None
                               else np.zeros_like(ex.cam), ex.boxes)]
        # one colour scale for both maps: each normalised to its maximum, shared 0..1
        maps = [m / m.max() if m.max() > 0 else m for m in maps]
        titles = ["model: region Grad-CAM",
                  "person: grounding" if ex.grounding is not None else "no grounding"]
        for ax, heat, title in zip((cam_ax, truth_ax), maps, titles):
            image = ax.imshow(heat, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=[cam_ax, truth_ax], fraction=0.046, pad=0.02,
                     label="weight / max")
    fig.suptitle("Questions ranked by Grad-CAM similarity with the reasoning question "
                 "(R reasoning, S sub-question, I irrelevant)", fontsize=9)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _read_log(log: Path) -> Dict[str, List[dict]]:
    records: Dict[str, List[dict]] = {"train": [], "eval": []}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record.get("event", ""), []).append(record)
    return records


def plot_training_curves(log: Path, path: Path, title: str = "") -> None:
    """Loss parts (left) and evaluation metrics (right) over the steps of a run's
    ``log.jsonl``."""
    records = _read_log(log)
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = records["train"]
    skip = {"event", "step", "epoch", "lr", "groups_per_s", "grad_norm"}
    steps = [r["step"] for r in train]
    for key in [k for k in (train[0] if train else {}) if k not in skip]:
        values = np.array([r.get(key, np.nan) for r in train], dtype=float)
        loss_ax.plot(steps, values, label=key, linewidth=1)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (per step)")
    loss_ax.set_yscale("symlog", linthresh=1e-3)
    loss_ax.legend(fontsize=7)
    evals = records["eval"]
    for key, label in _COMPARED.items():
        if evals and key in evals[0]:
            eval_ax.plot([r["step"] for r in evals], [100 * r[key] for r in evals], marker="o",
                         markersize=3, label=label, linewidth=1)
    eval_ax.set_xlabel("step")
    eval_ax.set_ylabel("% (validation)")
    if evals:
        eval_ax.legend(fontsize=7)
    fig.suptitle(title or str(log.parent), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(run_dirs: Sequence[Path], path: Path) -> None:
    """Grouped bars of the final metrics (``metrics.json``) of several runs."""
    runs = []
    for run in run_dirs:
        data = json.loads((Path(run) / "metrics.json").read_text())
        runs.append((f"{Path(run).name} ({data.get('method', '?')})", data["metrics"]))
    keys = [k for k in _COMPARED if all(k in m for _, m in runs)]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) + 1), 3.8))
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.9, len(runs)))
    for i, ((name, metrics), colour) in enumerate(zip(runs, colours)):
        x = np.arange(len(keys)) + (i - (len(runs) - 1) / 2) * width
        bars = ax.bar(x, [100 * metrics[k] for k in keys], width, label=name, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(np.arange(len(keys)), [_COMPARED[k] for k in keys], fontsize=8)
    ax.set_ylabel("%")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(runs), 3),
              fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all(result: EvalResult, out_dir: Path, method: str) -> None:
    """Writes the :data:`PLOTS`: consistency quadrants, similarity histogram of sub vs
    irrelevant questions, and example groups with ranked questions and region heatmaps; and
    :data:`CURVES` when ``out_dir`` holds a training ``log.jsonl``."""
    _quadrants(result, out_dir / PLOTS[0], method)
    _histogram(result, out_dir / PLOTS[1], method)
    _examples(result.examples, out_dir / PLOTS[2])
    if (out_dir / "log.jsonl").exists():
        plot_training_curves(out_dir / "log.jsonl", out_dir / CURVES, method)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sort_fast.training.plots",
        description="Plots of training runs written by python -m sort_fast.train.")
    sub = parser.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", help="loss parts and validation metrics over the steps "
                                           "of a run (from RUN_DIR/log.jsonl)")
    curves.add_argument("run_dir", type=Path, help="a run folder (--out of the trainer)")
    curves.add_argument("--out", type=Path, default=None,
                        help=f"the PNG to write (default: RUN_DIR/{CURVES})")
    compare = sub.add_parser("compare", help="final metrics of several runs side by side "
                                             "(from each RUN_DIR/metrics.json)")
    compare.add_argument("run_dirs", type=Path, nargs="+", help="run folders")
    compare.add_argument("--out", type=Path, default=Path("compare.png"),
                         help="the PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "curves":
            out = args.out or args.run_dir / CURVES
            plot_training_curves(args.run_dir / "log.jsonl", out)
        else:
            out = args.out
            plot_comparison(args.run_dirs, out)
    except (OSError, ValueError, KeyError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
