"""Ranking metrics (C++ extension) and consistency against plain-Python references of
docs/metrics.md."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sort_fast.metrics import ConsistencyMeter, consistency, ranking_metrics, ranking_metrics_packed


# ----------------------------------------------------------------------------- references
def reference_group(scores, relevant):
    """One group, written from the words of docs/metrics.md with pairwise rank counting (no
    shared code)."""
    n = len(scores)

    def rank(j):  # 1-based; ties: irrelevant first, then input order
        before = 0
        for i in range(n):
            if i == j:
                continue
            if scores[i] > scores[j]:
                before += 1
            elif scores[i] == scores[j]:
                if relevant[i] < relevant[j] or (relevant[i] == relevant[j] and i < j):
                    before += 1
        return before + 1

    ranks = [rank(j) for j in range(n)]
    rel_ranks = sorted(ranks[j] for j in range(n) if relevant[j])
    irr_scores = [scores[j] for j in range(n) if not relevant[j]]
    rel_scores = [scores[j] for j in range(n) if relevant[j]]
    top = [j for j in range(n) if ranks[j] == 1][0]
    ranked_list = sorted(range(n), key=lambda j: ranks[j])
    parallel = [j for j in ranked_list if relevant[j]] + [j for j in ranked_list if not relevant[j]]
    diffs = [abs(scores[a] - scores[b]) for a, b in zip(ranked_list, parallel)
             if relevant[a] != relevant[b]]
    return {
        "p1": float(relevant[top]),
        "ranked": float(not irr_scores or min(rel_scores) > max(irr_scores)),
        "rr": 1.0 / rel_ranks[0],
        "wpr": sum(diffs) / len(diffs) if diffs else 0.0,
        "misranked": bool(diffs),
        "ap": sum((i + 1) / r for i, r in enumerate(rel_ranks)) / len(rel_ranks),
    }


def reference_metrics(scores, relevant, offsets):
    per = [reference_group(list(scores[a:b]), list(relevant[a:b]))
           for a, b in zip(offsets[:-1], offsets[1:])]
    n = len(per)
    mis = [p["wpr"] for p in per if p["misranked"]]
    return {
        "mp1": sum(p["p1"] for p in per) / n,
        "ranking_accuracy": sum(p["ranked"] for p in per) / n,
        "mrr": sum(p["rr"] for p in per) / n,
        "wpr": sum(p["wpr"] for p in per) / n,
        "wpr_misranked": sum(mis) / len(mis) if mis else 0.0,
        "map": sum(p["ap"] for p in per) / n,
        "groups": n,
        "misranked_groups": len(mis),
    }, per


def random_groups(rng, num_groups, max_size=12, tie_levels=None, dtype=np.float64):
    sizes = rng.integers(1, max_size + 1, num_groups)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    if tie_levels:
        scores = rng.integers(-tie_levels, tie_levels + 1, total) / tie_levels
    else:
        scores = rng.uniform(-1, 1, total)
    relevant = rng.random(total) < 0.35
    for a, b in zip(offsets[:-1], offsets[1:]):  # every group needs a relevant candidate
        if not relevant[a:b].any():
            relevant[rng.integers(a, b)] = True
    return scores.astype(dtype), relevant, offsets


def assert_metrics_close(got, want, rel=1e-12):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), key


# ----------------------------------------------------------------------------- paper examples
def test_paper_appendix_examples():
    # MP@1 and MRR: rankings [0,1,0] and [1,0,0] (scores descending as predicted).
    r = ranking_metrics([3.0, 2.0, 1.0, 3.0, 2.0, 1.0], [0, 1, 0, 1, 0, 0], [0, 3, 6])
    assert r["mp1"] == 0.5
    assert r["mrr"] == 0.75
    # Ranking accuracy: [0,1,1] and [1,1,0].
    r = ranking_metrics([3.0, 2.0, 1.0, 3.0, 2.0, 1.0], [0, 1, 1, 1, 1, 0], [0, 3, 6])
    assert r["ranking_accuracy"] == 0.5
    # WPR: scores [0.9, 0.8, 0.7], relevant [1, 0, 1].
    r = ranking_metrics([0.9, 0.8, 0.7], [1, 0, 1], [0, 3])
    assert r["wpr"] == pytest.approx(0.1, abs=1e-15)
    assert r["wpr_misranked"] == pytest.approx(0.1, abs=1e-15)


def test_ties_are_pessimistic_and_constant_scores_earn_nothing():
    r = ranking_metrics([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 1], [0, 4], per_group=True)
    assert r["mp1"] == 0.0
    assert r["ranking_accuracy"] == 0.0
    assert r["mrr"] == pytest.approx(1 / 3)
    assert r["map"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert r["wpr"] == 0.0  # equal scores: mis-ranked positions, but no score difference
    assert r["misranked_groups"] == 1


def test_negative_scores_are_not_special():
    r = ranking_metrics([-0.2, -0.9, -0.5], [1, 0, 0], [0, 3])
    assert r["mp1"] == 1.0 and r["mrr"] == 1.0 and r["map"] == 1.0 and r["ranking_accuracy"] == 1.0
    r = ranking_metrics([-0.9, -0.2], [1, 0], [0, 2])
    assert r["mp1"] == 0.0 and r["wpr"] == pytest.approx(0.7)


def test_group_without_irrelevant_candidates_is_perfect():
    r = ranking_metrics([0.1, 0.3], [1, 1], [0, 2])
    assert (r["mp1"], r["ranking_accuracy"], r["mrr"], r["map"], r["wpr"]) == (1, 1, 1, 1, 0)
    assert r["wpr_misranked"] == 0.0 and r["misranked_groups"] == 0


# ----------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 40),
    max_size=st.integers(1, 24),  # both paths, mixed in one call, across the 16 boundary
    tie_levels=st.sampled_from([None, 1, 2, 4]),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_matches_reference(seed, num_groups, max_size, tie_levels, dtype):
    rng = np.random.default_rng(seed)
    scores, relevant, offsets = random_groups(rng, num_groups, max_size, tie_levels, dtype)
    got = ranking_metrics(scores, relevant, offsets, per_group=True)
    # the reference sees exactly the stored values (float32 widened to float64)
    want, per = reference_metrics(scores.astype(np.float64), relevant, offsets)
    assert_metrics_close(got, want)
    pg = got["per_group"]
    np.testing.assert_array_equal(pg["precision_at_1"], [p["p1"] == 1 for p in per])
    np.testing.assert_array_equal(pg["ranked_correctly"], [p["ranked"] == 1 for p in per])
    np.testing.assert_array_equal(pg["misranked"], [p["misranked"] for p in per])
    np.testing.assert_allclose(pg["reciprocal_rank"], [p["rr"] for p in per], rtol=1e-12)
    np.testing.assert_allclose(pg["wpr"], [p["wpr"] for p in per], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(pg["average_precision"], [p["ap"] for p in per], rtol=1e-12)


@pytest.mark.parametrize("num_groups", [1, 2047, 2048, 2049, 9000])
def test_thread_count_invariance(num_groups):
    scores, relevant, offsets = random_groups(np.random.default_rng(num_groups), num_groups,
                                              tie_levels=3)
    results = [ranking_metrics(scores, relevant, offsets, num_threads=t) for t in (1, 2, 3, 8)]
    for r in results[1:]:
        assert r == results[0]  # exact: block sums are added in a fixed order


def test_input_kinds_agree():
    scores, relevant, offsets = random_groups(np.random.default_rng(1), 50, dtype=np.float32)
    want = ranking_metrics(scores, relevant, offsets)
    assert ranking_metrics(torch.from_numpy(scores), torch.from_numpy(relevant),
                           torch.from_numpy(offsets)) == want
    assert ranking_metrics(scores.tolist(), relevant.astype(int).tolist(),
                           offsets.tolist())["mp1"] == want["mp1"]
    t = torch.from_numpy(scores).requires_grad_()
    assert ranking_metrics(t, relevant, offsets) == want
    half = ranking_metrics(torch.from_numpy(scores).bfloat16(), relevant, offsets)
    assert half["groups"] == 50


def test_packed_layout_helper():
    # two groups: [R, S, S, I], [R, S, I, I, I]; reasoning rows must be ignored
    sim = torch.tensor([1.0, 0.2, 0.9, 0.5, 1.0, 0.1, 0.3, -0.2, 0.0], dtype=torch.float64)
    offsets = torch.tensor([0, 4, 9])
    num_sub = torch.tensor([2, 1])
    got = ranking_metrics_packed(sim, offsets, num_sub)
    want = ranking_metrics([0.2, 0.9, 0.5, 0.1, 0.3, -0.2, 0.0],
                           [True, True, False, True, False, False, False], [0, 3, 7])
    assert got == want
    with pytest.raises(ValueError, match="group 1 has num_sub=5"):
        ranking_metrics_packed(sim, offsets, torch.tensor([2, 5]))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "scores, relevant, offsets, match",
    [
        ([0.1, float("nan"), 0.3, 0.2], [1, 0, 1, 0], [0, 2, 4], "group 0 has a NaN"),
        ([0.1, 0.2, 0.3, float("nan")], [1, 0, 1, 0], [0, 2, 4], "group 1 has a NaN"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0], [0, 2, 4], "group 1 has no relevant"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], [0, 2, 2, 4], "group 1 has no candidates"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], [0, 3, 2, 4], "group 1 has no candidates"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], [0, 2, 6], "group 1 ends at offsets\\[2\\]=6"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], [0, 2, 3], "offsets\\[-1\\]=3 does not match"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], [1, 2, 4], "offsets\\[0\\] must be 0"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1], [0, 2, 4], "relevant has 3 entries"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 1, 0], [0], "at least two entries"),
        ([0.1, 0.2, 0.3, 0.4], [1, 0, 2, 0], [0, 2, 4], "relevant must be 0 or 1"),
        ([[0.1, 0.2], [0.3, 0.4]], [1, 0, 1, 0], [0, 2, 4], "similarity must be 1-D"),
    ],
)
def test_bad_input_raises_value_error(scores, relevant, offsets, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(np.asarray(scores, dtype=np.float64), relevant, offsets)


def test_first_bad_group_is_named_across_blocks():
    scores, relevant, offsets = random_groups(np.random.default_rng(3), 10000)
    scores[offsets[7000]] = np.nan
    scores[offsets[9000]] = np.nan
    for t in (1, 2, 4):
        with pytest.raises(ValueError, match="group 7000 has a NaN"):
            ranking_metrics(scores, relevant, offsets, num_threads=t)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_first_bad_group_is_named_whatever_the_group_sizes(bad):
    # Small groups are evaluated bucketed by size and large ones first: the report must still
    # name the first bad group in input order.
    sizes = [12, 3, 20, 9, 3, 30, 12, 5]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scores = np.linspace(-1, 1, offsets[-1])
    relevant = np.zeros(offsets[-1], bool)
    relevant[offsets[:-1]] = True
    kind = "a NaN" if np.isnan(bad) else "an infinite"
    for first, later in [(0, 1), (1, 2), (2, 4), (3, 5), (4, 7)]:
        s = scores.copy()
        s[offsets[first] + 1] = bad
        s[offsets[later]] = bad
        with pytest.raises(ValueError, match=f"group {first} has {kind} similarity"):
            ranking_metrics(s, relevant, offsets)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"similarity": ["a", "b"]}, TypeError, "real numbers"),
        ({"similarity": "ab"}, TypeError, "similarity must be an array"),
        ({"offsets": [0.0, 2.0]}, TypeError, "offsets must be integers"),
        ({"relevant": [0.5, 1.0]}, TypeError, "relevant must be bool"),
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"num_threads": 1.5}, ValueError, "num_threads"),
    ],
)
def test_bad_types(kwargs, exc, match):
    args = {"similarity": [0.1, 0.2], "relevant": [True, False], "offsets": [0, 2]}
    args.update(kwargs)
    num_threads = args.pop("num_threads", None)
    with pytest.raises(exc, match=match):
        ranking_metrics(args["similarity"], args["relevant"], args["offsets"],
                        num_threads=num_threads)


# ----------------------------------------------------------------------------- consistency
def test_consistency_quadrants():
    # group 0: R right, subs right/wrong; group 1: R wrong, sub right; group 2: R right, sub right
    out = consistency([True, False, True], [True, False, True, True], [2, 1, 1],
                      irrelevant_correct=[False, True])
    assert out["pairs"] == 4
    assert out["r_right_s_right"] == 0.5 and out["r_right_s_wrong"] == 0.25
    assert out["r_wrong_s_right"] == 0.25 and out["r_wrong_s_wrong"] == 0.0
    assert out["consistency"] == pytest.approx(2 / 3) and out["consistency_defined"]
    assert out["reasoning_accuracy"] == pytest.approx(2 / 3)
    assert out["sub_accuracy"] == 0.75 and out["irrelevant_accuracy"] == 0.5
    assert out["accuracy"] == pytest.approx(6 / 9)


def test_consistency_undefined_is_flagged():
    out = consistency([False], [True, True], [2])
    assert out["consistency"] == 0.0 and not out["consistency_defined"]
    assert out["irrelevant_accuracy"] is None


def test_consistency_pools_pairs_over_batches():
    rng = np.random.default_rng(0)
    k = rng.integers(1, 4, 30)
    r, s = rng.random(30) < 0.7, rng.random(int(k.sum())) < 0.6
    whole = consistency(r, s, k)
    meter = ConsistencyMeter()
    cut_g = 11
    cut_s = int(k[:cut_g].sum())
    meter.update(r[:cut_g], s[:cut_s], k[:cut_g])
    meter.update(r[cut_g:], s[cut_s:], k[cut_g:])
    assert meter.compute() == whole
    # reference: pooled counts, not a mean of batch ratios
    pair_r = np.repeat(r, k)
    assert whole["consistency"] == pytest.approx((pair_r & s).sum() / pair_r.sum())


def test_consistency_packed_update_with_vqa_scores():
    correct = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    vqa = torch.tensor([1.0, 0.6, 0.0, 1.0, 0.3, 1.0, 0.9])
    meter = ConsistencyMeter()
    meter.update_packed(correct, torch.tensor([0, 4, 7]), torch.tensor([2, 1]), vqa_score=vqa)
    out = meter.compute()
    assert out == {**consistency([True, False], [True, False, True], [2, 1],
                                 irrelevant_correct=[True, True]),
                   "reasoning_vqa_accuracy": pytest.approx(0.65),
                   "sub_vqa_accuracy": pytest.approx(1.6 / 3),
                   "irrelevant_vqa_accuracy": pytest.approx(0.95),
                   "vqa_accuracy": pytest.approx(4.8 / 7)}


@pytest.mark.parametrize(
    "args, match",
    [
        (([True], [True], [2]), "sub_correct has 1 entries but num_sub sums to 2"),
        (([True, True], [True], [1]), "num_sub has shape"),
        (([True], [], [0]), "group 0 has num_sub=0"),
    ],
)
def test_consistency_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        consistency(*args)


@pytest.mark.parametrize("vqa, match", [
    (torch.ones(6), r"vqa_score has shape \(6,\)"),
    (torch.tensor([1.0, 0.6, float("nan"), 1.0, 0.3, 1.0, 0.9]), r"\[0, 1\], got nan at row 2"),
    (torch.tensor([1.0, 0.6, 0.0, 1.5, 0.3, 1.0, 0.9]), r"\[0, 1\], got 1.5 at row 3"),
    (torch.tensor([1.0, 0.6, 0.0, 1.0, -0.1, 1.0, 0.9]), r"\[0, 1\], got -0.1 at row 4"),
])
def test_consistency_packed_update_is_all_or_nothing(vqa, match):
    correct = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    meter = ConsistencyMeter()
    with pytest.raises(ValueError, match=match):
        meter.update_packed(correct, torch.tensor([0, 4, 7]), torch.tensor([2, 1]), vqa_score=vqa)
    with pytest.raises(TypeError, match="irrelevant_correct"):
        meter.update([True], [True], [1], irrelevant_correct=[0.5])
    assert meter.compute() == ConsistencyMeter().compute()


# ----------------------------------------------------------------------------- reliability
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infinite_scores_are_rejected_naming_the_group(bad, dtype):
    scores = np.array([0.1, 0.2, 0.3, bad, 0.5, 0.6], dtype=dtype)
    with pytest.raises(ValueError, match="group 1 has an infinite similarity"):
        ranking_metrics(scores, [1, 0, 1, 0, 1, 0], [0, 2, 4, 6])
    scores[0] = np.nan  # the first bad group is named, whatever is wrong with it
    with pytest.raises(ValueError, match="group 0 has a NaN"):
        ranking_metrics(scores, [1, 0, 1, 0, 1, 0], [0, 2, 4, 6])


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">i8"])
def test_big_endian_input_is_converted(dtype):
    scores, relevant, offsets = random_groups(np.random.default_rng(5), 30, tie_levels=4)
    native = scores.astype(np.dtype(dtype).newbyteorder("="))
    want = ranking_metrics(native, relevant, offsets)
    assert ranking_metrics(native.astype(dtype), relevant, offsets.astype(">i8")) == want


def test_caller_writing_offsets_during_the_call_cannot_crash_it():
    """Another thread rewrites offsets while the extension runs without the GIL: it works on a
    validated copy, so every call returns or raises ValueError (no out-of-bounds read)."""
    scores, relevant, offsets = random_groups(np.random.default_rng(6), 200_000, max_size=16)
    garbage = np.full_like(offsets, 2**40)
    stop = threading.Event()

    def scribble():
        while not stop.is_set():
            np.copyto(offsets[1:], garbage[1:])
            np.copyto(offsets[1:], np.sort(offsets[1:]) // 2**20)

    writer = threading.Thread(target=scribble)
    writer.start()
    try:
        for _ in range(20):
            try:
                ranking_metrics(scores, relevant, offsets, num_threads=2)
            except ValueError:
                pass
    finally:
        stop.set()
        writer.join()


def _draw_group(draw, dtype):
    # ties, signed zeros, subnormals and large magnitudes; up to 40 candidates, so both the
    # rank-counting path (<= 16) and the sorting path run
    values = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 5e-324, -5e-324, 1e300, -1e300])
    if dtype == np.float32:
        values = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 1e-45, -1e-45, 3e38, -3e38])
    score = st.one_of(values, st.floats(-1.0, 1.0, width=32 if dtype == np.float32 else 64))
    size = draw(st.integers(1, 40))
    scores = draw(st.lists(score, min_size=size, max_size=size))
    relevant = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    relevant[draw(st.integers(0, size - 1))] = True
    return scores, relevant


@settings(max_examples=100, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_drawn_groups_match_reference(data, dtype):
    groups = [_draw_group(data.draw, dtype) for _ in range(data.draw(st.integers(1, 4)))]
    scores = np.array([s for g in groups for s in g[0]], dtype=dtype)
    relevant = np.array([r for g in groups for r in g[1]])
    offsets = np.cumsum([0] + [len(g[0]) for g in groups])
    got = ranking_metrics(scores, relevant, offsets, per_group=True)
    want, per = reference_metrics(scores.astype(np.float64), relevant, offsets)
    assert_metrics_close(got, want)
    np.testing.assert_allclose(got["per_group"]["wpr"], [p["wpr"] for p in per], rtol=1e-12)
    np.testing.assert_allclose(got["per_group"]["average_precision"], [p["ap"] for p in per],
                               rtol=1e-12)


def sorted_reference_group(scores: np.ndarray, relevant: np.ndarray):
    """One (large) group from a stable sort on (score descending, irrelevant first)."""
    order = np.lexsort((relevant, -scores))  # last key first; lexsort is stable (input order)
    s, r = scores[order], relevant[order]
    rank = np.arange(1, s.size + 1)
    hits = np.cumsum(r)
    parallel = np.concatenate([s[r], s[~r]])
    mismatch = r != (np.arange(s.size) < r.sum())
    return {
        "mp1": float(r[0]),
        "mrr": 1.0 / rank[r][0],
        "map": float(np.mean(hits[r] / rank[r])),
        "wpr": float(np.abs(s - parallel)[mismatch].mean()) if mismatch.any() else 0.0,
        "ranking_accuracy": float(not mismatch.any()),
    }


@pytest.mark.parametrize("tie_levels", [None, 50])
def test_large_group_matches_sorted_reference(tie_levels):
    rng = np.random.default_rng(7)
    n = 100_000
    scores = rng.uniform(-1, 1, n) if tie_levels is None else \
        rng.integers(-tie_levels, tie_levels + 1, n) / tie_levels
    relevant = rng.random(n) < 0.2
    got = ranking_metrics(scores, relevant, [0, n])
    for key, value in sorted_reference_group(scores, relevant).items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_packed_similarity_must_be_one_dimensional():
    offsets, num_sub = torch.tensor([0, 3, 6]), torch.tensor([1, 1])
    with pytest.raises(ValueError, match=r"similarity must be 1-D \[T\]"):
        ranking_metrics_packed(torch.rand(1, 6), offsets, num_sub)
