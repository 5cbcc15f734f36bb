"""float64 scores in the ranking extension: compared exactly (csrc/ranking.cpp ranks small groups
of doubles through an order-preserving integer key in 32-bit lanes).

The per-group values are checked bit for bit against a plain-Python model that ranks with
Python's float comparisons and adds up in the kernel's order (docs/metrics.md, "How it is
computed"): any rank that the key got wrong changes them.
"""
from fractions import Fraction
from math import lcm

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sort_fast.metrics import ranking_metrics

SMALL_GROUP = 16  # groups up to this size are rank-counted, larger ones sorted
LCM = lcm(*range(1, SMALL_GROUP + 1))


def kernel_order_group(scores, relevant):
    """One group's ``(p1, ranked_correctly, misranked, rr, wpr, ap)`` from the order of
    docs/metrics.md (score descending, irrelevant first on ties, then input order), summed as
    the extension sums: small groups over candidates in input order with AP as one integer
    ratio, large groups over ranked positions."""
    n = len(scores)
    order = sorted(range(n), key=lambda j: (-scores[j], relevant[j], j))  # -(-0.0) == 0.0
    rank = {j: p for p, j in enumerate(order)}
    ranked_rel = [relevant[j] for j in order]
    num_rel = sum(ranked_rel)
    parallel = [scores[j] for j in order if relevant[j]] + \
        [scores[j] for j in order if not relevant[j]]
    mismatch = [ranked_rel[p] != (p < num_rel) for p in range(n)]
    mismatches = sum(mismatch)
    first_hit = ranked_rel.index(True)
    gaps = 0.0
    if n <= SMALL_GROUP:
        for j in range(n):  # input order
            if mismatch[rank[j]]:
                gaps += abs(scores[j] - parallel[rank[j]])
        hits, numerator = 0, 0
        for p in range(n):
            hits += ranked_rel[p]
            numerator += hits * (LCM // (p + 1)) if ranked_rel[p] else 0
        ap = float(numerator) / (float(num_rel) * LCM)
    else:
        precision, hits = 0.0, 0
        for p in range(n):
            hits += ranked_rel[p]
            precision += (hits if ranked_rel[p] else 0) / (p + 1)
            gaps += mismatch[p] * abs(scores[order[p]] - parallel[p])
        ap = precision / num_rel
    wpr = gaps / mismatches if mismatches else 0.0
    exact_ap = sum(Fraction(i + 1, p + 1) for i, p in
                   enumerate(p for p in range(n) if ranked_rel[p])) / num_rel
    assert abs(ap - float(exact_ap)) < 1e-12  # the model's own check of its AP
    return ranked_rel[0], mismatches == 0, mismatches > 0, 1.0 / (first_hit + 1), wpr, ap


def assert_per_group_exact(scores, relevant, offsets):
    got = ranking_metrics(scores, relevant, offsets, per_group=True)["per_group"]
    wide = [float(x) for x in np.asarray(scores, np.float64)]
    for g, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        want = kernel_order_group(wide[a:b], [bool(r) for r in relevant[a:b]])
        have = (got["precision_at_1"][g], got["ranked_correctly"][g], got["misranked"][g],
                got["reciprocal_rank"][g], got["wpr"][g], got["average_precision"][g])
        for name, h, w in zip(("p1", "ranked", "misranked", "rr", "wpr", "ap"), have, want):
            assert np.float64(h).tobytes() == np.float64(w).tobytes(), (g, name, h, w)


def test_values_that_round_to_the_same_float32_are_ranked_apart():
    # 1 and 1 + 2**-40 are one float32: a float32 key would tie them and rank the irrelevant
    # one first
    r = ranking_metrics(np.array([1.0, 1.0 + 2.0**-40]), [False, True], [0, 2])
    assert r["mp1"] == 1.0 and r["ranking_accuracy"] == 1.0
    r = ranking_metrics(np.array([-1.0 - 2.0**-40, -1.0]), [True, False], [0, 2])
    assert r["mp1"] == 0.0 and r["wpr"] == 2.0**-40


def test_signed_zeros_tie():
    for scores in ([0.0, -0.0], [-0.0, 0.0]):
        r = ranking_metrics(np.array(scores), [True, False], [0, 2])
        assert r["mp1"] == 0.0  # a tie: the irrelevant candidate first
        r = ranking_metrics(np.array(scores), [False, True], [0, 2])
        assert r["mp1"] == 0.0


def test_extreme_magnitudes_keep_their_order():
    big, tiny = np.finfo(np.float64).max, 5e-324
    ladder = np.array([-big, -1e300, -1.0, -tiny, 0.0, tiny, 2.2250738585072014e-308, 1.0,
                       1.0 + 2.0**-52, 1e300, big])
    for relevant_at in range(ladder.size):  # the top candidate is relevant exactly once
        relevant = np.arange(ladder.size) == relevant_at
        r = ranking_metrics(ladder, relevant, [0, ladder.size])
        assert r["mrr"] == 1.0 / (ladder.size - relevant_at)
        assert_per_group_exact(ladder, relevant, [0, ladder.size])


@pytest.mark.parametrize("bad, kind", [(np.inf, "an infinite"), (-np.inf, "an infinite"),
                                       (np.nan, "a NaN")])
def test_non_finite_float64_is_named(bad, kind):
    scores = np.array([0.1, 0.2, 0.3, bad, 0.5])
    with pytest.raises(ValueError, match=f"group 1 has {kind} similarity"):
        ranking_metrics(scores, [1, 0, 1, 0, 1], [0, 2, 5])


def _scores(rng, total, kind):
    if kind == "uniform":
        return rng.uniform(-1, 1, total)
    if kind == "ties":
        return rng.integers(-3, 4, total) / 3.0
    if kind == "float32_collisions":  # neighbours a few ulps apart: one float32 each
        base = rng.uniform(-1, 1, max(1, total // 4))
        at = rng.integers(0, base.size, total)
        return base[at] + rng.integers(-3, 4, total) * np.spacing(base[at])
    specials = np.array([0.0, -0.0, 1.0, -1.0, 5e-324, -5e-324, 1e300, -1e300,
                         1.0 + 2.0**-52, 1.0 - 2.0**-53, 1.0 + 2.0**-30, -(1.0 + 2.0**-30)])
    return rng.choice(specials, total)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_groups=st.integers(1, 30),
       max_size=st.integers(1, 24),
       kind=st.sampled_from(["uniform", "ties", "float32_collisions", "specials"]))
def test_float64_groups_match_the_exact_model(seed, num_groups, max_size, kind):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, num_groups)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scores = _scores(rng, int(offsets[-1]), kind)
    relevant = rng.random(scores.size) < 0.4
    relevant[offsets[:-1] + rng.integers(0, sizes)] = True
    assert_per_group_exact(scores, relevant, offsets)
    # float32 scores go through the same model (widened exactly)
    single = scores[np.abs(scores) < 1e38].astype(np.float32)
    if single.size == scores.size:
        assert_per_group_exact(single, relevant, offsets)


def test_float64_equals_float32_on_float32_values():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 20, 5000)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scores = rng.integers(-20, 21, int(offsets[-1])).astype(np.float32) / np.float32(7)
    relevant = rng.random(scores.size) < 0.3
    relevant[offsets[:-1]] = True
    single = ranking_metrics(scores, relevant, offsets, per_group=True)
    double = ranking_metrics(scores.astype(np.float64), relevant, offsets, per_group=True)
    for key in single["per_group"]:
        np.testing.assert_array_equal(single["per_group"][key], double["per_group"][key])
    assert {k: v for k, v in single.items() if k != "per_group"} == \
        {k: v for k, v in double.items() if k != "per_group"}
