"""What Table 1 reports: its rows' names, its columns and metrics, the paper's numbers, and one
seed's entry of a row (docs/REPRODUCTION.md, docs/metrics.md)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..training.metrics_table import COLUMNS

__all__ = ["Entries", "Rows", "ROW_NAMES", "SHORT_NAMES", "PAPER_ROWS", "PAPER", "PRIMARY", "PRIOR",
           "METRICS", "SCALE", "seed_entry", "prior_columns", "mean_std"]

Entries = List[Dict[str, Any]]  # one row's entries, one per seed (seed_entry)
Rows = Dict[str, Entries]  # row key -> its entries
ROW_NAMES = {"pretrained": "Pythia (plain model, not fine-tuned)",
             "baseline": "Pythia (BCE fine-tuned as long)",
             "control": "Control: SOrT's BCE weights and λ, no Grad-CAM term",
             "squint": "Pythia + SQuINT",
             "sort_sq": "Pythia + SOrT (only SQ), irrelevant BCE kept at λ3",
             "sort_sq_paper": "Pythia + SOrT (only SQ), λ3 = 0 (the paper's row)",
             "sort": "Pythia + SOrT (SQ + IQ)",
             "sort_margin": "Pythia + SOrT (SQ + IQ), margin > 0"}
SHORT_NAMES = {"pretrained": "plain", "baseline": "BCE", "control": "control",
               "squint": "SQuINT", "sort_sq": "SOrT SQ", "sort_sq_paper": "SOrT SQ λ3=0",
               "sort": "SOrT", "sort_margin": "SOrT m>0"}
# our row of each row of the paper, whose numbers are printed beside ours (the paper's SOrT
# with only sub-questions discards the irrelevant questions: λ3 = 0)
PAPER_ROWS = {"baseline": "baseline", "squint": "squint", "sort_sq": "sort_sq_paper",
              "sort": "sort"}
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
SCALE = {key: scale for key, _, _, scale, _ in METRICS}  # metrics not listed: x100
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
PAPER = {PAPER_ROWS[row]: {key: None if v is None else round(v / SCALE[key], 6)
                           for (key, *_), v in zip(METRICS, values)}
         for row, values in _PAPER_ROWS.items()}


def prior_columns(metrics: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """The :data:`PRIOR` metrics of a run's ``prior_agreement`` breakdown under flat names,
    ``{subset}_{metric}`` and ``shortcut_gap`` (none for a design without a training prior)."""
    breakdown = metrics.get("prior_agreement")
    if not breakdown:
        return {}
    flat = {f"{subset}_{key}": breakdown[subset][key] for subset in ("agreeing", "conflicting")
            for key in ("reasoning_accuracy", "consistency", "r_right_s_wrong")}
    return {key: breakdown["shortcut_gap"] if key == "shortcut_gap" else flat[key]
            for key in PRIOR}


def seed_entry(metrics: Dict[str, Any], seed: int, **commands: str) -> Dict[str, Any]:
    """One seed's entry of a row: every metric of the run's ``metrics.json``, Table 1's under
    their table1.json names too, the :data:`PRIOR` columns, and the commands its numbers come
    from."""
    row = {"seed": seed, **metrics}
    row.update({key: metrics.get(source) for key, source, *_ in METRICS})
    row.update(prior_columns(metrics))
    row.update(commands)
    return row


def mean_std(values: Sequence[Optional[float]]) -> Tuple[float, float]:
    """Mean and sample standard deviation of the values that are not ``None`` (std 0 for one
    value, both NaN for none)."""
    x = np.array([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0
