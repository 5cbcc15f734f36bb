"""The evaluation's metrics as a Markdown table in the layout of the paper's Table 1
(docs/metrics.md)."""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["COLUMNS", "format_metric", "format_table"]

# (header, metrics key, scale, arrow) in the column order of the paper's Table 1
COLUMNS = (
    ("R✓S✓", "r_right_s_right", 100, "↑"), ("R✓S✗", "r_right_s_wrong", 100, "↓"),
    ("R✗S✓", "r_wrong_s_right", 100, "↓"), ("R✗S✗", "r_wrong_s_wrong", 100, "↓"),
    ("Consistency%", "consistency", 100, "↑"), ("Reas. Accuracy%", "reasoning_accuracy", 100, "↑"),
    ("VQA Accuracy%", "vqa_accuracy", 100, "↑"), ("MP@1", "mp1", 100, "↑"),
    ("Ranking Accuracy", "ranking_accuracy", 100, "↑"), ("MRR", "mrr", 100, "↑"),
    ("WPR", "wpr", 100, "↓"), ("Grounding ρ", "grounding_spearman", 1, "↑"),
)


def format_metric(value: float, scale: float, sign: str = "") -> str:
    """One cell of Table 1: a fraction as a percentage (``scale`` 100) with 2 decimals, an
    unscaled value (grounding's rho) with 3; ``sign="+"`` prints the sign of a difference."""
    return f"{value * scale:{sign}.2f}" if scale != 1 else f"{value:{sign}.3f}"


def format_table(metrics: Mapping[str, Any], method: str) -> str:
    """A Markdown table in the layout of the paper's Table 1 (fractions as percentages, WPR
    ×100 as in the paper; grounding as Spearman's rho), one row named ``method``."""
    header = "| Method | " + " | ".join(f"{h} {a}" for h, _, _, a in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    cells = []
    for _, key, scale, _ in COLUMNS:
        value = metrics.get(key)
        cells.append("–" if value is None else format_metric(value, scale))
    return "\n".join([header, rule, f"| {method} | " + " | ".join(cells) + " |"])
