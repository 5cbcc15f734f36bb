"""Paired comparisons for the reproduction study.

Every method row is fine-tuned with the same seeds as a control row (same seed = same initial
model), so a row is compared with the control **per seed**: the unit of analysis is the
difference ``treatment - control`` of one seed, and the tests below are paired tests on those
differences.

* :func:`paired_difference` -- mean difference, t-interval, paired t-test, Cohen's d_z, the
  number of seeds where the treatment wins, and a Wilcoxon signed-rank p-value;
* :func:`holm` -- Holm-Bonferroni adjusted p-values for a family of tests;
* :func:`compare_rows` -- every (row, metric) comparison against the control for one family
  (e.g. one world), with Holm applied over that family;
* :func:`format_difference` -- a compact Markdown cell for one comparison.

Only SciPy APIs available in SciPy 1.9 are used (``scipy.stats.t``, ``scipy.stats.wilcoxon``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as _sps

__all__ = ["paired_difference", "holm", "compare_rows", "format_difference"]

_MIN_WILCOXON_N = 6


def _as_float_or_none(value: Any, what: str) -> Optional[float]:
    """``None``/NaN -> ``None``; anything else -> ``float`` (``ValueError`` if impossible)."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number or None, got {value!r}") from None
    return None if math.isnan(x) else x


def paired_difference(
    treatment: Sequence[Optional[float]],
    control: Sequence[Optional[float]],
    *,
    higher_is_better: bool = True,
    confidence: float = 0.95,
) -> Dict[str, Any]:
    """Paired comparison of ``treatment`` with ``control``.

    ``treatment`` and ``control`` are 1-D sequences of equal length ``N`` (one value per seed,
    paired by position). A pair where either member is ``None`` or NaN is dropped (both members);
    ``n`` is the number of pairs left and ``d_i = treatment_i - control_i`` (i < n).

    Returns a dict of plain Python numbers (``None`` where undefined):

    * ``n``; ``mean`` = mean(d); ``std`` = sample standard deviation of d (ddof=1);
    * ``ci_low``/``ci_high``: the two-sided ``confidence`` t-interval of the mean difference,
      ``mean -/+ t_{(1+confidence)/2, n-1} * std / sqrt(n)``;
    * ``t``, ``p``: the two-sided paired t-test of mean(d) = 0 (``t = mean / (std / sqrt(n))``,
      ``n - 1`` degrees of freedom). When all differences are equal (std = 0): ``t = 0.0`` and
      ``p = 1.0`` if they are all 0, else ``t = +/-inf`` and ``p = 0.0``;
    * ``dz``: Cohen's d_z = mean / std (``None`` when std = 0);
    * ``better``: number of pairs where the treatment is strictly better, i.e. d > 0 when
      ``higher_is_better`` else d < 0 (ties count for neither);
    * ``wilcoxon_p``: two-sided Wilcoxon signed-rank p-value (SciPy's default handling of zero
      differences); ``None`` when n < 6 or all differences are 0.

    Raises ``ValueError`` when the lengths differ, when fewer than 2 usable pairs remain, or when
    ``confidence`` is not in (0, 1).
    """
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    treatment = list(treatment)
    control = list(control)
    if len(treatment) != len(control):
        raise ValueError(
            f"treatment and control must have the same length (paired by seed), "
            f"got {len(treatment)} and {len(control)}"
        )
    diffs: List[float] = []
    for i, (a, b) in enumerate(zip(treatment, control)):
        x = _as_float_or_none(a, f"treatment[{i}]")
        y = _as_float_or_none(b, f"control[{i}]")
        if x is not None and y is not None:
            diffs.append(x - y)
    n = len(diffs)
    if n < 2:
        raise ValueError(
            f"need at least 2 usable (non-None, non-NaN) pairs for a paired comparison, got {n} "
            f"of {len(treatment)}"
        )

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    df = n - 1
    all_equal = bool(np.all(d == d[0]))
    if all_equal:
        # Exactly zero spread: avoid the 0/0 of the t statistic (and its warnings).
        mean = float(d[0])
        std = 0.0
        ci_low = ci_high = mean
        dz = None
        if mean == 0.0:
            t_stat, p = 0.0, 1.0
        else:
            t_stat, p = math.copysign(math.inf, mean), 0.0
    else:
        std = float(d.std(ddof=1))
        se = std / math.sqrt(n)
        t_stat = mean / se
        p = float(min(1.0, 2.0 * _sps.t.sf(abs(t_stat), df)))
        half = float(_sps.t.ppf(0.5 + float(confidence) / 2.0, df)) * se
        ci_low, ci_high = mean - half, mean + half
        dz = mean / std

    better = int(np.count_nonzero(d > 0) if higher_is_better else np.count_nonzero(d < 0))

    wilcoxon_p: Optional[float] = None
    if n >= _MIN_WILCOXON_N and np.any(d != 0):
        with warnings.catch_warnings():
            # small samples / zero differences make SciPy switch to the normal approximation
            # and say so; that is expected here.
            warnings.simplefilter("ignore")
            res = _sps.wilcoxon(d)
        wp = float(res.pvalue)
        wilcoxon_p = None if math.isnan(wp) else wp

    return {
        "n": int(n),
        "mean": float(mean),
        "std": float(std),
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "t": float(t_stat),
        "p": float(p),
        "dz": None if dz is None else float(dz),
        "better": better,
        "wilcoxon_p": wilcoxon_p,
    }


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm-Bonferroni adjusted p-values, in the order of ``pvalues``.

    With the ``m`` non-missing p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted
    value of ``p_(k)`` is ``min(1, max_{j <= k} (m - j + 1) * p_(j))`` (so the adjusted values are
    monotone in the raw ones). ``None`` (and NaN) entries are returned as ``None`` and do not count
    in the family size ``m``. Raises ``ValueError`` for a p-value outside [0, 1].
    """
    values: List[Optional[float]] = []
    for i, p in enumerate(pvalues):
        x = _as_float_or_none(p, f"pvalues[{i}]")
        if x is not None and not 0.0 <= x <= 1.0:
            raise ValueError(f"pvalues[{i}] = {x!r} is not a probability in [0, 1]")
        values.append(x)
    present = [i for i, x in enumerate(values) if x is not None]
    m = len(present)
    order = sorted(present, key=lambda i: values[i])  # stable for ties
    out: List[Optional[float]] = [None] * len(values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * values[i]))
        out[i] = float(running)
    return out


def _paired_entries(
    per_seed: Mapping[str, Sequence[Mapping[str, Any]]], row: str, control: str
) -> tuple:
    """The per-seed dicts of ``row`` and ``control`` aligned pair by pair."""
    rows_t = list(per_seed[row])
    rows_c = list(per_seed[control])
    has_t = [("seed" in r) for r in rows_t]
    has_c = [("seed" in r) for r in rows_c]
    if not any(has_t) and not any(has_c):
        if len(rows_t) != len(rows_c):
            raise ValueError(
                f"row {row!r} has {len(rows_t)} runs and control {control!r} has {len(rows_c)}; "
                "without 'seed' keys they are paired by position and must have the same count"
            )
        return rows_t, rows_c
    if not (all(has_t) and all(has_c)):
        raise ValueError(
            f"row {row!r} / control {control!r}: either every per-seed entry has a 'seed' key or "
            "none does"
        )

    def by_seed(entries: Sequence[Mapping[str, Any]], name: str) -> Dict[Any, Mapping[str, Any]]:
        table: Dict[Any, Mapping[str, Any]] = {}
        for e in entries:
            if e["seed"] in table:
                raise ValueError(f"row {name!r} has seed {e['seed']!r} more than once")
            table[e["seed"]] = e
        return table

    t_by, c_by = by_seed(rows_t, row), by_seed(rows_c, control)
    if set(t_by) != set(c_by):
        only_t = sorted(map(repr, set(t_by) - set(c_by)))
        only_c = sorted(map(repr, set(c_by) - set(t_by)))
        raise ValueError(
            f"seeds of row {row!r} and control {control!r} differ: only in the row {only_t}, "
            f"only in the control {only_c}"
        )
    seeds = [e["seed"] for e in rows_c]  # the control's order
    return [t_by[s] for s in seeds], [c_by[s] for s in seeds]


def compare_rows(
    per_seed: Mapping[str, Sequence[Mapping[str, float]]],
    control: str,
    rows: Sequence[str],
    metrics: Mapping[str, bool],
    *,
    confidence: float = 0.95,
) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Compare every row of ``rows`` with ``control`` on every metric of ``metrics``.

    ``per_seed[name]`` is the list of per-seed result dicts of a row (metric key -> value, plus
    optionally ``"seed"``). Runs are paired by their ``"seed"`` value when the entries carry one
    (then a row and the control must have exactly the same set of seeds, each once), else by
    position (then they must have the same number of runs). ``metrics`` maps a metric key to
    ``higher_is_better``. A missing metric value may be given as ``None``/NaN (that pair is
    dropped); a missing key is an error.

    Returns ``{row: {metric: paired_difference(row, control) + {"p_holm": ...}}}``, in the order
    of ``rows`` and ``metrics``. **The Holm family is this call**: all ``len(rows) * len(metrics)``
    comparisons made here (e.g. one world); call it once per family to be corrected together.
    Raises ``ValueError`` for an unknown row, ``control`` among ``rows``, a repeated row, or a
    comparison :func:`paired_difference` rejects (the message names the row and metric).
    """
    rows = list(rows)
    if control not in per_seed:
        raise ValueError(f"control row {control!r} is not in per_seed (rows: {sorted(per_seed)})")
    if len(set(rows)) != len(rows):
        raise ValueError(f"rows repeat an entry: {rows}")
    for row in rows:
        if row == control:
            raise ValueError(f"row {row!r} is the control; compare other rows with it")
        if row not in per_seed:
            raise ValueError(f"row {row!r} is not in per_seed (rows: {sorted(per_seed)})")

    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    family: List[tuple] = []
    for row in rows:
        entries_t, entries_c = _paired_entries(per_seed, row, control)
        out[row] = {}
        for metric, higher in metrics.items():
            try:
                treat = [e[metric] for e in entries_t]
                ctrl = [e[metric] for e in entries_c]
            except KeyError:
                raise ValueError(
                    f"metric {metric!r} is missing from a per-seed entry of row {row!r} or "
                    f"control {control!r}"
                ) from None
            try:
                res = paired_difference(
                    treat, ctrl, higher_is_better=bool(higher), confidence=confidence
                )
            except ValueError as exc:
                raise ValueError(f"row {row!r}, metric {metric!r}: {exc}") from None
            out[row][metric] = res
            family.append((row, metric))
    adjusted = holm([out[r][m]["p"] for r, m in family])
    for (r, m), p_holm in zip(family, adjusted):
        out[r][m]["p_holm"] = p_holm
    return out


def _format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"={p:.3f}"


def format_difference(d: Mapping[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    """One comparison as a Markdown cell.

    ``"+1.23 [0.45, 2.01] p=0.012 (p_holm=0.048), dz=0.91, 8/10"``: the mean difference and its
    CI multiplied by ``scale`` (100 turns fractions into percentage points) with ``digits``
    decimals, the t-test p (``p<0.001`` below 0.001), the Holm-adjusted p when ``d`` has
    ``"p_holm"``, Cohen's d_z (``n/a`` when undefined) and ``better/n``.
    """
    def num(x: float, signed: bool = False) -> str:
        v = float(x) * scale + 0.0  # + 0.0 turns -0.0 into 0.0
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"

    text = f"{num(d['mean'], signed=True)} [{num(d['ci_low'])}, {num(d['ci_high'])}]"
    text += f" p{_format_p(float(d['p']))}"
    if d.get("p_holm") is not None:
        text += f" (p_holm{_format_p(float(d['p_holm']))})"
    dz = d.get("dz")
    text += f", dz={'n/a' if dz is None else f'{float(dz):.{digits}f}'}"
    text += f", {int(d['better'])}/{int(d['n'])}"
    return text
