"""PNG plots of an evaluation (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from ..data import regions_to_map  # noqa: E402
from ..layout import ROLE_IRRELEVANT, ROLE_SUB  # noqa: E402
from .evaluation import EvalResult, Example  # noqa: E402

__all__ = ["plot_all", "PLOTS"]

PLOTS = ("quadrants.png", "similarity_hist.png", "examples.png")
_ROLE_COLOUR = {0: "black", ROLE_SUB: "tab:green", ROLE_IRRELEVANT: "tab:red"}


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
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(-1, 1, 41)
    for role, label in ((ROLE_SUB, "sub-questions"), (ROLE_IRRELEVANT, "irrelevant")):
        values = result.similarity[result.roles == role]
        if values.size:
            ax.hist(values, bins=bins, alpha=0.6, density=True, color=_ROLE_COLOUR[role],
                    label=f"{label} (mean {values.mean():.2f})")
    ax.set_xlabel("Grad-CAM cosine similarity with the reasoning question")
    ax.set_ylabel("density")
    ax.set_title(method)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples(examples: List[Example], path: Path) -> None:
    rows = max(1, len(examples))
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.2 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1, 1]})
    for ax_row, ex in zip(axes, examples):
        text_ax, cam_ax, truth_ax = ax_row
        text_ax.axis("off")
        mark = "✓" if ex.correct[0] else "✗"
        lines = [(f"R: {ex.questions[0]} → {ex.predicted[0]} {mark}", "black")]
        for i in np.argsort(-ex.similarity[1:], kind="stable") + 1:
            mark = "✓" if ex.correct[i] else "✗"
            lines.append((f"{ex.similarity[i]:+.2f}  {ex.questions[i]} → {ex.predicted[i]} "
                          f"{mark}", _ROLE_COLOUR[int(ex.roles[i])]))
        for k, (line, colour) in enumerate(lines):
            text_ax.text(0, 1 - k / max(len(lines), 12), line, color=colour, fontsize=8,
                         va="top", transform=text_ax.transAxes)
        cam_ax.imshow(regions_to_map(ex.cam, ex.boxes), cmap="jet")
        cam_ax.set_title("region Grad-CAM", fontsize=8)
        truth = ex.grounding if ex.grounding is not None else np.zeros_like(ex.cam)
        truth_ax.imshow(regions_to_map(truth, ex.boxes), cmap="jet")
        truth_ax.set_title("grounding truth" if ex.grounding is not None else "no grounding",
                           fontsize=8)
        for ax in (cam_ax, truth_ax):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Questions ranked by Grad-CAM similarity (green: sub-question, red: "
                 "irrelevant)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_all(result: EvalResult, out_dir: Path, method: str) -> None:
    """Writes the :data:`PLOTS`: consistency quadrants, similarity histogram of sub vs
    irrelevant questions, and example groups with ranked questions and region heatmaps."""
    _quadrants(result, out_dir / PLOTS[0], method)
    _histogram(result, out_dir / PLOTS[1], method)
    _examples(result.examples, out_dir / PLOTS[2])
