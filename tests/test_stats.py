"""Paired statistics of the reproduction study (``sort_fast.experiments.stats``)."""
import json
import math
import random
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from sort_fast.experiments.stats import compare_rows, format_difference, holm, paired_difference

TREAT = [0.71, 0.74, 0.69, 0.77, 0.73, 0.75, 0.70, 0.78]
CTRL = [0.70, 0.71, 0.70, 0.72, 0.70, 0.73, 0.69, 0.74]


def test_t_test_and_ci_match_independent_computation():
    res = paired_difference(TREAT, CTRL, confidence=0.9)
    d = np.array(TREAT) - np.array(CTRL)
    n = len(d)
    ref = sps.ttest_1samp(d, 0.0)
    assert res["n"] == n
    assert res["mean"] == pytest.approx(sum(d) / n, abs=1e-12)
    sd = math.sqrt(sum((x - d.mean()) ** 2 for x in d) / (n - 1))
    assert res["std"] == pytest.approx(sd, rel=1e-10)
    assert res["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    # same p from the paired test itself
    assert res["p"] == pytest.approx(sps.ttest_rel(TREAT, CTRL).pvalue, rel=1e-10)
    # hand-computed 90 % t-interval: mean -/+ t_{0.95, n-1} * sd / sqrt(n)
    half = sps.t.ppf(0.95, n - 1) * sd / math.sqrt(n)
    assert res["ci_low"] == pytest.approx(d.mean() - half, rel=1e-10)
    assert res["ci_high"] == pytest.approx(d.mean() + half, rel=1e-10)
    assert res["dz"] == pytest.approx(d.mean() / sd, rel=1e-10)
    assert res["wilcoxon_p"] == pytest.approx(sps.wilcoxon(d).pvalue, rel=1e-10)
    assert res["better"] == int((d > 0).sum()) == 7
    # a wider confidence gives a wider interval
    wide = paired_difference(TREAT, CTRL, confidence=0.99)
    assert wide["ci_low"] < res["ci_low"] and wide["ci_high"] > res["ci_high"]
    # JSON-ready plain numbers
    json.dumps(res)
    assert all(type(res[k]) is float for k in ("mean", "std", "ci_low", "ci_high", "t", "p"))
    assert type(res["n"]) is int and type(res["better"]) is int


def test_better_counts_follow_direction():
    treat = [1.0, 2.0, 3.0, 4.0, 5.0]
    ctrl = [2.0, 2.0, 1.0, 5.0, 6.0]  # d = -1, 0, +2, -1, -1
    assert paired_difference(treat, ctrl)["better"] == 1
    assert paired_difference(treat, ctrl, higher_is_better=False)["better"] == 3
    # the direction changes only the count, not the signed statistics
    a = paired_difference(treat, ctrl)
    b = paired_difference(treat, ctrl, higher_is_better=False)
    assert a["mean"] == b["mean"] and a["p"] == b["p"]


def test_none_and_nan_pairs_are_dropped_together():
    treat = [0.5, None, 0.7, 0.6, float("nan"), 0.9]
    ctrl = [0.4, 0.3, None, 0.5, 0.2, 0.6]
    res = paired_difference(treat, ctrl)
    ref = paired_difference([0.5, 0.6, 0.9], [0.4, 0.5, 0.6])
    assert res == ref
    assert res["n"] == 3
    assert res["wilcoxon_p"] is None  # n < 6


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_all_equal_nonzero_differences(sign):
    ctrl = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    treat = [c + sign * 2.0 for c in ctrl]  # exactly representable differences
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = paired_difference(treat, ctrl)
    assert res["std"] == 0.0 and res["dz"] is None
    assert res["mean"] == pytest.approx(sign * 2.0)
    assert res["t"] == sign * math.inf and res["p"] == 0.0
    assert res["ci_low"] == res["ci_high"] == res["mean"]
    assert res["better"] == (6 if sign > 0 else 0)
    assert res["wilcoxon_p"] is not None and res["wilcoxon_p"] < 0.05


def test_all_zero_differences():
    x = [0.3, 0.5, 0.7, 0.2, 0.9, 0.4, 0.6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = paired_difference(x, list(x))
    assert res["p"] == 1.0 and res["t"] == 0.0
    assert res["mean"] == 0.0 and res["std"] == 0.0
    assert res["dz"] is None and res["wilcoxon_p"] is None
    assert res["better"] == 0
    json.dumps(res)


def test_paired_difference_errors():
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([1.0, None, 3.0], [1.0, 2.0, None])
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0, 2.0], [0.0, 0.5], confidence=95)


def test_holm_textbook_example():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1 and monotone in the raw p-values
    adj = holm([0.5, 0.2, 0.9])
    assert adj == pytest.approx([1.0, 0.6, 1.0])
    assert holm([]) == []


def test_holm_none_not_counted():
    adj = holm([0.01, None, 0.04, float("nan"), 0.03, 0.005])
    assert adj[1] is None and adj[3] is None
    assert [adj[i] for i in (0, 2, 4, 5)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    with pytest.raises(ValueError):
        holm([0.5, 1.5])


def _runs(values, seeds=None, key="acc"):
    out = [{key: v, "cons": None if v is None else 1.0 - v} for v in values]
    if seeds is not None:
        for r, s in zip(out, seeds):
            r["seed"] = s
    return out


def test_compare_rows_pairs_by_seed_and_applies_holm():
    seeds = [0, 1, 2, 3, 4, 5, 6, 7]
    per_seed = {
        "base": _runs(CTRL, seeds),
        "sort": _runs(TREAT, seeds),
        "squint": _runs([c + 0.001 * (i % 3 - 1) for i, c in enumerate(CTRL)], seeds),
    }
    metrics = {"acc": True, "cons": False}
    res = compare_rows(per_seed, "base", ["sort", "squint"], metrics)
    assert list(res) == ["sort", "squint"] and list(res["sort"]) == ["acc", "cons"]
    direct = paired_difference(TREAT, CTRL)
    for k, v in direct.items():
        assert res["sort"]["acc"][k] == (pytest.approx(v) if isinstance(v, float) else v)
    # cons = 1 - acc, lower is better: the same seeds win
    assert res["sort"]["cons"]["better"] == direct["better"]
    assert res["sort"]["cons"]["mean"] == pytest.approx(-direct["mean"])
    family = [res[r][m]["p"] for r in ("sort", "squint") for m in ("acc", "cons")]
    assert [res[r][m]["p_holm"] for r in ("sort", "squint") for m in ("acc", "cons")] == (
        pytest.approx(holm(family))
    )
    json.dumps(res)

    # shuffling the per-seed order of a row (and of the control) changes nothing
    rng = random.Random(3)
    shuffled = {name: rng.sample(list(v), len(v)) for name, v in per_seed.items()}
    assert shuffled["sort"] != per_seed["sort"]
    res2 = compare_rows(shuffled, "base", ["sort", "squint"], metrics)
    for r in res:
        for m in res[r]:
            for k, v in res[r][m].items():
                assert res2[r][m][k] == (pytest.approx(v) if isinstance(v, float) else v)


def test_compare_rows_pairs_by_position_without_seeds():
    per_seed = {"base": _runs(CTRL), "sort": _runs(TREAT)}
    res = compare_rows(per_seed, "base", ["sort"], {"acc": True})
    assert res["sort"]["acc"]["t"] == pytest.approx(paired_difference(TREAT, CTRL)["t"])
    # a family of one: Holm leaves p unchanged
    assert res["sort"]["acc"]["p_holm"] == pytest.approx(res["sort"]["acc"]["p"])


def test_compare_rows_errors():
    base = _runs(CTRL, range(8))
    with pytest.raises(ValueError, match="seeds .* differ"):
        compare_rows({"base": base, "sort": _runs(TREAT, range(1, 9))}, "base", ["sort"],
                     {"acc": True})
    with pytest.raises(ValueError, match="more than once"):
        compare_rows({"base": base, "sort": _runs(TREAT, [0] * 8)}, "base", ["sort"],
                     {"acc": True})
    with pytest.raises(ValueError, match="same count"):
        compare_rows({"base": _runs(CTRL), "sort": _runs(TREAT[:5])}, "base", ["sort"],
                     {"acc": True})
    with pytest.raises(ValueError, match="'seed' key"):
        compare_rows({"base": base, "sort": _runs(TREAT)}, "base", ["sort"], {"acc": True})
    with pytest.raises(ValueError, match="missing"):
        compare_rows({"base": base, "sort": _runs(TREAT, range(8))}, "base", ["sort"],
                     {"f1": True})
    with pytest.raises(ValueError, match="not in per_seed"):
        compare_rows({"base": base}, "base", ["sort"], {"acc": True})
    with pytest.raises(ValueError, match="is the control"):
        compare_rows({"base": base}, "base", ["base"], {"acc": True})
    few = _runs([0.5, None, None], range(3))
    with pytest.raises(ValueError, match="'sort', metric 'acc'"):
        compare_rows({"base": _runs([0.4, 0.4, 0.4], range(3)), "sort": few}, "base", ["sort"],
                     {"acc": True})


def test_format_difference():
    d = {"n": 10, "mean": 0.0123, "ci_low": 0.0045, "ci_high": 0.0201, "p": 0.0123,
         "p_holm": 0.0481, "dz": 0.912, "better": 8}
    assert format_difference(d) == "+1.23 [0.45, 2.01] p=0.012 (p_holm=0.048), dz=0.91, 8/10"
    d2 = dict(d, mean=-0.5, ci_low=-0.76, ci_high=-0.24, p=0.0, dz=None, better=0)
    del d2["p_holm"]
    assert format_difference(d2, scale=1.0, digits=1) == "-0.5 [-0.8, -0.2] p<0.001, dz=n/a, 0/10"
    # a real result formats without error
    text = format_difference(paired_difference(TREAT, CTRL))
    assert text.startswith("+2.25 [") and text.endswith(", 7/8")
