"""The figure of Table 1: bars of mean ± std per row for the headline metrics, each seed as a dot
and the paper's value as a diamond."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

from .columns import METRICS, SCALE, SHORT_NAMES, Rows, mean_std

__all__ = ["plot"]

_TITLES = {**{key: header for key, _, header, _, _ in METRICS},
           "coupling_over_mode": "Coupling over the mode answer ↑",
           "sub_accuracy": "Sub-question accuracy ↑", "map": "MAP ↑",
           "wpr_over_range": "WPR / cosine range ↓",
           "conflicting_reasoning_accuracy": "Reasoning acc., prior-conflicting ↑",
           "shortcut_gap": "Shortcut gap (agreeing − conflicting) ↓"}


def _keys(rows: Rows) -> Tuple[str, ...]:
    """The metrics shown, one panel each: the conflicting reasoning accuracy and the shortcut
    gap too where some entry has the prior columns."""
    keys = ("consistency", "coupling_over_mode", "reasoning_accuracy", "sub_accuracy", "mp1",
            "mrr", "map", "wpr_over_range")
    if any(r.get("shortcut_gap") is not None for per_seed in rows.values() for r in per_seed):
        keys = keys[:4] + ("conflicting_reasoning_accuracy",) + keys[4:] + ("shortcut_gap",)
    return keys


def _panel(ax: Any, key: str, rows: Rows, paper: Dict[str, Dict[str, Any]],
           colours: np.ndarray) -> None:
    """One metric: per row (x = its index) a bar of mean ± std, a dot per seed and the paper's
    value as a diamond, on a y-range fitted to what is drawn."""
    k = SCALE.get(key, 100)
    everything = []
    for i, (row, per_seed) in enumerate(rows.items()):
        values = np.array([r.get(key) for r in per_seed if r.get(key) is not None]) * k
        m, s = mean_std(list(values))
        ax.bar(i, m, yerr=s, color=colours[i], alpha=0.35, capsize=3)
        ax.plot(np.full(values.size, i), values, "o", color=colours[i], ms=3)
        everything += list(values)
        value = paper.get(row, {}).get(key)
        if value is not None:
            ax.plot(i, value * k, "D", color="black", ms=5, label="paper (real data)")
            everything.append(value * k)
    if everything:
        low, high = min(everything), max(everything)
        pad = 0.1 * (high - low) + 1e-9
        ax.set_ylim(low - pad, high + pad)
    ax.set_title(_TITLES.get(key, key), fontsize=10)
    ax.set_xticks(np.arange(len(rows)), [SHORT_NAMES[row] for row in rows], fontsize=7,
                  rotation=30)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], fontsize=7, loc="best")


def plot(results: Dict[str, Any], path: Path) -> None:
    """Writes the figure of ``results`` (what ``--json`` holds) to ``path``: for each headline
    metric a panel of bars of mean ± std per row, each seed as a dot and the paper's value as a
    black diamond (real data: compare directions, not levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"pretrained": results["pretrained"], **results["methods"]}
    keys = _keys(rows)
    colours = plt.get_cmap("tab10")(np.arange(len(rows)))
    fig, axes = plt.subplots(2, len(keys) // 2, figsize=(4 * len(keys) // 2, 7))
    for ax, key in zip(axes.ravel(), keys):
        _panel(ax, key, rows, results["paper"], colours)
    fig.suptitle(f"Table 1 on the synthetic benchmark ({results['protocol']['synthetic_design']} "
                 f"design, world {results['protocol']['synthetic_seed']}), test split, "
                 f"{len(results['pretrained'])} seeds (bars: mean ± std, dots: seeds)",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
