"""Table 1 as Markdown: mean ± std over seeds beside the paper's numbers, the primary and prior
metrics, the paired differences, and the per-template numbers with the shortcut probes
(docs/REPRODUCTION.md)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ..training.metrics_table import format_metric
from .columns import (
    METRICS,
    PAPER_ROWS,
    PRIMARY,
    PRIOR,
    ROW_NAMES,
    SCALE,
    SHORT_NAMES,
    Rows,
    mean_std,
)
from .stats import format_difference

__all__ = ["markdown"]


def _number(key: str, value: float, sign: str = "") -> str:
    return format_metric(value, SCALE.get(key, 100), sign)


def _cell(key: str, values: Sequence[Optional[float]]) -> str:
    m, s = mean_std(values)
    return "–" if m != m else f"{_number(key, m)} ± {_number(key, s)}"


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(line) + " |" for line in lines)]


def _template_value(entry: Dict[str, Any], template: str, key: str) -> Optional[float]:
    return entry.get("per_template", {}).get(template, {}).get(key)


def _mean_rows(rows: Rows, keys: Sequence[str]) -> List[List[str]]:
    """Every row's name and its mean ± std over seeds of each of ``keys``."""
    return [[ROW_NAMES[row], *(_cell(key, [r.get(key) for r in per_seed]) for key in keys)]
            for row, per_seed in rows.items()]


def _headline(results: Dict[str, Any], rows: Rows) -> List[str]:
    """Table 1's columns, mean ± std over seeds, and the paper's rows below ours."""
    keys = [key for key, *_ in METRICS]
    paper = results["paper"]
    return _table(["Method", *(header for _, _, header, _, _ in METRICS)],
                  _mean_rows(rows, keys)
                  + [[f"*paper: {ROW_NAMES[row]}*",
                      *("–" if paper[row][key] is None else _number(key, paper[row][key])
                        for key in keys)]
                     for row in PAPER_ROWS.values() if row in paper])


def _primary(rows: Rows, seeds: int) -> List[str]:
    """The :data:`PRIMARY` metrics and the cosines' means and spread."""
    extra = ("mode_consistency", "similarity_sub_mean", "similarity_irrelevant_mean",
             "similarity_group_range_mean")
    return ["", f"Primary metrics, mean ± std over {seeds} seeds (coupling_over_mode: "
            "consistency beyond the model's per-template mode answer; coupling: beyond what "
            "per-template sub-question accuracy predicts under independence; wpr_over_range: "
            "WPR divided by each group's cosine range):", "",
            *_table(["Method", *PRIMARY, *extra], _mean_rows(rows, (*PRIMARY, *extra)))]


def _prior(rows: Rows, seeds: int, prior: Sequence[str]) -> List[str]:
    """The ``prior`` metrics (none: no table)."""
    if not prior:
        return []
    return ["", f"Test questions whose answer agrees or conflicts with the training "
            f"prior of their template, mean ± std over {seeds} seeds (shortcut_gap: "
            "reasoning accuracy on agreeing minus conflicting questions):", "",
            *_table(["Method", *prior], _mean_rows(rows, prior))]


def _differences(stats: Dict[str, Any], compared: Sequence[str]) -> List[str]:
    """The paired differences from the baseline and from the control, where computed."""
    lines: List[str] = []
    for family, title in (("vs_baseline", "Paired difference from the baseline"),
                          ("vs_control", "Paired difference from the control (isolates the "
                                         "Grad-CAM term)")):
        comparisons = stats.get(family)
        if not comparisons:
            continue
        lines += ["", f"{title}: mean [95 % CI] p (Holm over this table), d_z, seeds better:",
                  ""]
        lines += _table(["Method", *compared],
                        [[ROW_NAMES[row], *("–" if key not in d else format_difference(
                            d[key], scale=SCALE.get(key, 100)) for key in compared)]
                         for row, d in comparisons.items()])
    return lines


def _per_template(results: Dict[str, Any], rows: Rows) -> List[str]:
    """Per-template tables; reasoning accuracy's with the shortcut probes and the wording
    rule."""
    probes = results.get("probes", {})
    templates = sorted({t for per_seed in rows.values() for r in per_seed
                        for t in r.get("per_template", {})})
    if not templates:
        return []
    lines: List[str] = []
    for key, title in (("reasoning_accuracy", "Reasoning accuracy"),
                       ("sub_accuracy", "Sub-question accuracy"),
                       ("consistency", "Consistency"),
                       ("coupling_over_mode", "Coupling over the mode answer"),
                       ("yes_rate", "Yes-rate of the reasoning answers")):
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
    return lines


def markdown(results: Dict[str, Any]) -> str:
    """Table 1 (what ``--json`` holds) as mean ± std over seeds beside the paper's numbers;
    the primary metrics; the prior metrics of a design with a training prior; each row's paired
    difference from the baseline and of the SOrT rows from the control (mean, 95 % t-interval,
    p and Holm-corrected p, d_z, seeds better); per-template numbers with the shortcut
    probes."""
    rows = {"pretrained": results["pretrained"], **results["methods"]}
    seeds = len(results["pretrained"])
    prior = [key for key in PRIOR if any(r.get(key) is not None for per_seed in rows.values()
                                         for r in per_seed)]
    return "\n".join([*_headline(results, rows), *_primary(rows, seeds),
                      *_prior(rows, seeds, prior),
                      *_differences(results["stats"], (*PRIMARY, *prior)),
                      *_per_template(results, rows)])
