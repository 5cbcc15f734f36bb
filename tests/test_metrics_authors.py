"""``ranking_metrics(convention="authors")``: the definitions of the authors' code behind the
paper's numbers (docs/metrics.md), against a re-implementation in plain Python loops that walks
each group's ranked list the way their evaluation does."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sort_fast.metrics import ranking_metrics, ranking_metrics_packed


def authors_metrics(scores, relevant, offsets):
    """Group by group: a stable sort by score descending (ties keep the input order), then
    precision@1, all relevant candidates first, 1 / rank of the first relevant one, the summed
    gaps to the parallel list (relevant first) of a mis-ranked group, and the mean over the
    relevant candidates of 1 / rank. WPR is averaged over the mis-ranked groups only."""
    p1 = ranked = rr = inverse_rank = 0.0
    group_wpr = []
    per_group = []
    num_groups = len(offsets) - 1
    for g in range(num_groups):
        a, b = offsets[g], offsets[g + 1]
        candidates = [(scores[j], bool(relevant[j])) for j in range(a, b)]
        ranking = sorted(candidates, key=lambda c: -c[0])  # sorted() is stable
        is_top_relevant = 1.0 if ranking[0][1] else 0.0
        p1 += is_top_relevant
        num_relevant = sum(1 for _, r in ranking if r)
        leading = 0
        for _, r in ranking[:num_relevant]:
            if not r:
                break
            leading += 1
        ranked += 1.0 if leading == num_relevant else 0.0
        for position, (_, r) in enumerate(ranking):
            if r:
                rr += 1.0 / (position + 1)
                break
        parallel = [c for c in ranking if c[1]] + [c for c in ranking if not c[1]]
        gaps = []
        for position, (score, r) in enumerate(ranking):
            if r != parallel[position][1]:
                gaps.append(abs(parallel[position][0] - score))
        if gaps:
            group_wpr.append(sum(gaps))
        inverse = [1.0 / (position + 1) for position, (_, r) in enumerate(ranking) if r]
        inverse_rank += sum(inverse) / len(inverse)
        per_group.append({"wpr": sum(gaps), "ap": sum(inverse) / len(inverse),
                          "misranked": bool(gaps)})
    return {
        "mp1": p1 / num_groups,
        "ranking_accuracy": ranked / num_groups,
        "mrr": rr / num_groups,
        "wpr": sum(group_wpr) / num_groups,
        "wpr_misranked": sum(group_wpr) / len(group_wpr) if group_wpr else 0.0,
        "map": inverse_rank / num_groups,
        "groups": num_groups,
        "misranked_groups": len(group_wpr),
    }, per_group


# hand-made groups and their values, worked out by hand (docs/metrics.md)
HAND_MADE = [
    # the paper's WPR example, [R, I, R] as ranked: two gaps of 0.1, summed
    ([0.9, 0.8, 0.7], [1, 0, 1], [0, 3],
     {"mp1": 1.0, "ranking_accuracy": 0.0, "mrr": 1.0, "wpr": 0.2, "wpr_misranked": 0.2,
      "map": (1 + 1 / 3) / 2, "misranked_groups": 1}),
    # a constant score: input order, so the sub-question listed first ranks first
    ([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 1], [0, 4],
     {"mp1": 1.0, "ranking_accuracy": 0.0, "mrr": 1.0, "wpr": 0.0, "wpr_misranked": 0.0,
      "map": (1 + 1 / 4) / 2, "misranked_groups": 1}),
    # ranked [I .9, R .5, R .2] (gaps .4 and .7) and a correct group [R .3, I .1]
    ([0.2, 0.9, 0.5, 0.3, 0.1], [1, 0, 1, 1, 0], [0, 3, 5],
     {"mp1": 0.5, "ranking_accuracy": 0.5, "mrr": 0.75, "wpr": 1.1 / 2, "wpr_misranked": 1.1,
      "map": ((1 / 2 + 1 / 3) / 2 + 1) / 2, "misranked_groups": 1}),
    # a tie between an irrelevant candidate listed first and a relevant one
    ([0.4, 0.4, 0.1], [0, 1, 0], [0, 3],
     {"mp1": 0.0, "ranking_accuracy": 0.0, "mrr": 0.5, "wpr": 0.0, "wpr_misranked": 0.0,
      "map": 0.5, "misranked_groups": 1}),
]


@pytest.mark.parametrize("scores, relevant, offsets, want", HAND_MADE)
def test_hand_made_cases(scores, relevant, offsets, want):
    got = ranking_metrics(np.array(scores), relevant, offsets, convention="authors")
    model, _ = authors_metrics(scores, relevant, offsets)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-15), key
        assert model[key] == pytest.approx(value, abs=1e-15), key


def test_defaults_are_the_papers_text():
    scores, relevant, offsets = np.array([0.2, 0.9, 0.5, 0.3, 0.1]), [1, 0, 1, 1, 0], [0, 3, 5]
    paper = ranking_metrics(scores, relevant, offsets)
    assert paper == ranking_metrics(scores, relevant, offsets, convention="paper")
    # per-group WPR is the mean gap, 0.55; AP uses precision: (1/2 + 2/3) / 2
    assert paper["wpr_misranked"] == pytest.approx(0.55)
    assert paper["map"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1) / 2)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_groups=st.integers(1, 30),
       max_size=st.integers(1, 24), tie_levels=st.sampled_from([None, 1, 2, 4]),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_matches_the_loops(seed, num_groups, max_size, tie_levels, dtype):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, num_groups)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    scores = (rng.uniform(-1, 1, total) if tie_levels is None
              else rng.integers(-tie_levels, tie_levels + 1, total) / tie_levels).astype(dtype)
    relevant = rng.random(total) < 0.35
    relevant[offsets[:-1] + rng.integers(0, sizes)] = True
    got = ranking_metrics(scores, relevant, offsets, per_group=True, convention="authors")
    want, per = authors_metrics([float(s) for s in scores], relevant, offsets.tolist())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    np.testing.assert_array_equal(got["per_group"]["misranked"], [p["misranked"] for p in per])
    np.testing.assert_allclose(got["per_group"]["wpr"], [p["wpr"] for p in per], rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(got["per_group"]["average_precision"], [p["ap"] for p in per],
                               rtol=1e-12)
    threads = ranking_metrics(scores, relevant, offsets, num_threads=3, convention="authors")
    assert threads == {k: v for k, v in got.items() if k != "per_group"}


def test_packed_layout_lists_sub_questions_first():
    # [R, S, I] with equal cosines: the authors' ties favour the sub-question, the paper's not
    sim = np.array([1.0, 0.3, 0.3])
    offsets, num_sub = np.array([0, 3]), np.array([1])
    assert ranking_metrics_packed(sim, offsets, num_sub, convention="authors")["mp1"] == 1.0
    assert ranking_metrics_packed(sim, offsets, num_sub)["mp1"] == 0.0


@pytest.mark.parametrize("convention", ["Authors", "notebook", "", None, 1])
def test_unknown_convention_is_refused(convention):
    with pytest.raises(ValueError, match="convention must be one of 'paper', 'authors'"):
        ranking_metrics([0.1, 0.2], [True, False], [0, 2], convention=convention)
