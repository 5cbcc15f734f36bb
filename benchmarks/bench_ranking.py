"""Ranking metrics (docs/metrics.md): the C++ extension against numpy, pandas and ranx.

Run (benchmark-only; nothing here is a plain test)::

    python -m pytest benchmarks/bench_ranking.py --benchmark-only \
        --benchmark-columns=min,median,mean,rounds -q

``pytest --benchmark-only`` at the repository root runs 10k and 1M groups; 100k, and the
sort-free pairwise numpy at 1M, need ``--benchmark-full`` (see ``common.FULL_ONLY``). pandas and
ranx are optional: their benchmarks are skipped where they are not installed.

Data: N groups (10k, 100k, 1M) of 5..13 candidates (mean 9, layout ``ragged``), and at 1M also
groups of exactly 9 (layout ``fixed9``); about 1/3 relevant, every group with at least one
relevant candidate, float32 scores uniform in [-1, 1], fixed seed. The extension is also timed
on the same scores as float64 (numpy's default dtype; ``dtype`` parameter), where it must return
exactly the float32 values. Data and each competitor's input conversion are built once per module
(cached) and are not timed.

Competitors, one pytest-benchmark group per size and layout (``ranking-<N>-<layout>``):

* ``extension`` / ``extension_1thread``: ``sort_fast.metrics.ranking_metrics`` with all cores
  and with ``num_threads=1``, float32 and float64 scores.
* ``numpy``: :func:`numpy_ranking_metrics` below, fully vectorised (one sort of a packed
  uint64 key, cumsum / reduceat for every metric, no Python loop over groups). The fastest numpy
  for all six metrics that we found.
* ``numpy_pairwise``: :func:`numpy_pairwise_ranking_metrics`, sort-free: groups padded to a
  ``[N, width]`` matrix, every candidate's rank counted over all pairs in ``[B, width, width]``
  blocks, the extension's method in numpy. About 3x slower than ``numpy``: a pairwise count does
  ``width`` times the work of a sort per candidate, and numpy cannot keep it in registers.
* ``numpy_mp1_mrr``: MP@1 and MRR only, sort-free (per-group maxima with ``reduceat``): the
  fastest numpy we found for those two metrics. It computes two of the six metrics, so it is a
  reference point, not a like-for-like competitor.
* ``pandas``: :func:`pandas_groupby_ranking_metrics`, sort_fast's definitions (docs/metrics.md,
  the default ``convention="paper"``) the way a pandas notebook computes them: one DataFrame row
  per candidate, ``sort_values``, ``groupby`` and a Python loop over groups; 10k groups only.
* ``ranx`` / ``ranx_nosave``: ``ranx.evaluate(qrels, run, ["precision@1", "mrr", "map"])``
  (default: also stores per-query scores in the Run, a Python loop) and the same with
  ``save_results_in_run=False``. Building ``Qrels``/``Run`` is done in setup and NOT timed (it
  also sorts every query's candidates, work that the other competitors do inside the timing).
  1M groups is skipped: the conversion alone takes over 2 minutes there (see ``RANX_SIZES``).
  ranx breaks ties differently (and zeroes relevance <= 0), so it is only a speed reference.

Before timing, each competitor's values are checked once against the extension: numpy and pandas
on all the metrics they compute (1e-9); ranx on precision@1 / mrr / map over the groups without
tied scores (1e-6; float32 scores do tie now and then at 1M candidates, so ties are counted).
At 1M groups the extension and numpy benchmarks also record peak memory (tracemalloc, and the
process's peak-RSS increase measured by resetting VmHWM through /proc/self/clear_refs), stored in
the benchmark's ``extra_info`` (see ``--benchmark-json``; printed on stderr when run with ``-s``).
"""
from __future__ import annotations

import functools
import gc
import os
import sys
import time
import tracemalloc

import numpy as np
import pytest

from sort_fast.metrics import ranking_metrics

SIZES = [10_000, 100_000, 1_000_000]
# (num_groups, layout) of the extension and numpy benchmarks
CASES = [(n, "ragged") for n in SIZES] + [(1_000_000, "fixed9")]
CASE_IDS = [f"{n}-{layout}" for n, layout in CASES]
PANDAS_SIZES = [10_000]
RANX_SIZES = [10_000, 100_000]  # 1M skipped: see _ranx_bench
SEED = 1234
METRICS = ("mp1", "ranking_accuracy", "mrr", "wpr", "wpr_misranked", "map")

pytestmark = pytest.mark.benchmark(min_rounds=5, warmup=False)


def _report(msg: str) -> None:
    print(f"\n[bench_ranking] {msg}", file=sys.__stderr__, flush=True)


# ----------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def make_groups(num_groups: int, layout: str = "ragged", seed: int = SEED,
                dtype: str = "float32"):
    """``(scores [C], relevant bool [C], offsets int64 [N+1])``, deterministic; groups of 5..13
    candidates (``ragged``) or of exactly 9 (``fixed9``); float32 scores, or the same values as
    ``dtype``."""
    rng = np.random.default_rng(seed + num_groups)
    sizes = rng.integers(5, 14, num_groups) if layout == "ragged" else np.full(num_groups, 9)
    offsets = np.zeros(num_groups + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    scores = rng.uniform(-1.0, 1.0, total).astype(np.float32)
    relevant = rng.random(total) < 1.0 / 3.0
    empty = np.flatnonzero(~np.logical_or.reduceat(relevant, offsets[:-1]))
    relevant[offsets[empty] + rng.integers(0, sizes[empty])] = True
    return scores.astype(dtype, copy=False), relevant, offsets


@functools.lru_cache(maxsize=None)
def extension_reference(num_groups: int, layout: str = "ragged"):
    return ranking_metrics(*make_groups(num_groups, layout), per_group=True)


# ----------------------------------------------------------------------------- numpy
_SIGN = np.uint32(0x80000000)
_ONE = np.uint64(1)


def _sorted_candidates(scores, relevant, sizes):
    """Candidates of every group in the order of docs/metrics.md: score descending, irrelevant
    first on ties.

    float32 scores: one ``np.sort`` of a uint64 key ``group << 33 | desc(score) << 1 | relevant``
    (``desc`` maps float32 order-reversingly onto uint32); the sorted key is decoded back into
    scores and relevance, so no argsort and no gather. Candidates with equal score and
    relevance are interchangeable for every metric, so the order among them does not matter.
    Other dtypes fall back to ``np.lexsort`` (slower).
    """
    n = sizes.size
    if scores.dtype == np.float32:
        u = (scores + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into +0.0: they tie
        desc = np.where(u >= _SIGN, u, ~(u | _SIGN))  # bigger score -> smaller key
        key = np.repeat(np.arange(n, dtype=np.uint64), sizes)
        key <<= np.uint64(32)
        key |= desc
        key <<= _ONE
        key |= relevant
        del u, desc
        key.sort()
        rel_s = (key & _ONE).astype(bool)
        d = (key >> _ONE).astype(np.uint32)
        del key
        u = np.where(d >= _SIGN, d, ~(d | _SIGN))
        return u.view(np.float32).astype(np.float64), rel_s
    group = np.repeat(np.arange(n), sizes)
    order = np.lexsort((relevant, -scores, group))
    return scores[order].astype(np.float64), relevant[order]


def numpy_ranking_metrics(similarity, relevant, offsets):
    """The six ranking metrics (docs/metrics.md) over ragged groups, vectorised numpy (no group
    loop).

    Same contract and values as :func:`sort_fast.metrics.ranking_metrics` (without
    ``per_group``); raises ValueError on NaN scores, empty groups or groups without a
    relevant candidate (not naming the group).
    """
    scores = np.asarray(similarity)
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    rel = np.asarray(relevant, dtype=bool)
    off = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(off)
    n = sizes.size
    if n == 0 or off[0] != 0 or off[-1] != scores.size or (sizes <= 0).any():
        raise ValueError("offsets must start at 0, increase strictly and end at len(similarity)")
    if np.isnan(scores).any():
        raise ValueError("NaN similarity")
    starts = off[:-1]

    s, r = _sorted_candidates(scores, rel, sizes)
    count = s.size
    group_start = np.repeat(starts, sizes)
    pos = np.arange(count, dtype=np.int64)
    pos -= group_start  # 0-based rank within the group
    cum = np.cumsum(r, dtype=np.int64)
    before = cum[starts] - r[starts]  # relevant candidates in earlier groups
    num_rel = cum[off[1:] - 1] - before
    if (num_rel == 0).any():
        raise ValueError(f"group {int(np.flatnonzero(num_rel == 0)[0])} has no relevant candidate")
    hits = cum
    hits -= np.repeat(before, sizes)  # relevant candidates at or above each position
    num_rel_c = np.repeat(num_rel, sizes)
    inv_rank = 1.0 / (pos + 1.0)

    top = r[starts]
    rr = np.maximum.reduceat(np.where(r, inv_rank, 0.0), starts)
    ap = np.add.reduceat(np.where(r, hits * inv_rank, 0.0), starts) / num_rel

    # WPR: the parallel list puts the relevant candidates first, each part in ranked order.
    parallel_pos = np.where(r, hits - 1, num_rel_c + pos - hits)
    parallel_pos += group_start
    parallel = np.empty_like(s)
    parallel[parallel_pos] = s
    mismatch = r != (pos < num_rel_c)
    num_mis = np.add.reduceat(mismatch, starts, dtype=np.int64)
    diff = np.abs(s - parallel)
    diff[~mismatch] = 0.0
    wpr_g = np.add.reduceat(diff, starts) / np.maximum(num_mis, 1)

    misranked = int(np.count_nonzero(num_mis))
    wpr_sum = float(wpr_g.sum())
    return {
        "mp1": float(np.count_nonzero(top)) / n,
        "ranking_accuracy": float(n - misranked) / n,
        "mrr": float(rr.sum()) / n,
        "wpr": wpr_sum / n,
        "wpr_misranked": wpr_sum / misranked if misranked else 0.0,
        "map": float(ap.sum()) / n,
        "groups": n,
        "misranked_groups": misranked,
    }


def numpy_pairwise_ranking_metrics(similarity, relevant, offsets, block_groups: int = 1 << 14):
    """The six ranking metrics, sort-free: every candidate's rank counted over all pairs of its
    group, as the extension does, in ``[B, width, width]`` numpy blocks of ``block_groups``.

    Same values as :func:`numpy_ranking_metrics` (valid input assumed: no checks).
    """
    scores = np.asarray(similarity)
    rel = np.asarray(relevant, dtype=bool)
    off = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(off)
    n = sizes.size
    width = int(sizes.max())
    # padded [N, width]: padding scores -inf (ranked last), irrelevant
    slot = (np.repeat(np.arange(n, dtype=np.int64) * width - off[:-1], sizes)
            + np.arange(scores.size, dtype=np.int64))
    padded_s = np.full(n * width, -np.inf, np.float64)
    padded_s[slot] = scores
    padded_r = np.zeros(n * width, bool)
    padded_r[slot] = rel
    padded_s = padded_s.reshape(n, width)
    padded_r = padded_r.reshape(n, width)
    valid = np.arange(width) < sizes[:, None]
    column = np.arange(width)
    top = ranked_correctly = 0
    rr_sum = wpr_sum = ap_sum = 0.0
    for a in range(0, n, block_groups):
        s, r, v = (x[a:a + block_groups] for x in (padded_s, padded_r, valid))
        key = r * width + column  # equal scores: irrelevant first, then input order
        first = (s[:, :, None] > s[:, None, :]) | (
            (s[:, :, None] == s[:, None, :]) & (key[:, :, None] < key[:, None, :]))
        first &= v[:, :, None]  # [B, i, j]: i ranks before j
        before = first.sum(1, dtype=np.int64)
        relevant_before = (first & r[:, :, None]).sum(1, dtype=np.int64)
        num_rel = r.sum(1)
        first_hit = np.where(r, before, width).min(1)
        top += int(np.count_nonzero(first_hit == 0))
        rr_sum += float((1.0 / (first_hit + 1.0)).sum())
        ap_sum += float((np.where(r, (relevant_before + 1.0) / (before + 1.0), 0.0).sum(1)
                         / num_rel).sum())
        mismatch = v & (r != (before < num_rel[:, None]))
        num_mis = mismatch.sum(1)
        ranked_correctly += int(np.count_nonzero(num_mis == 0))
        # the parallel list's entry at each candidate's rank, by matching positions
        parallel_pos = np.where(r, relevant_before, num_rel[:, None] + before - relevant_before)
        parallel_pos[~v] = -1
        match = parallel_pos[:, :, None] == before[:, None, :]  # [B, k, j]
        at_rank = np.where(match, s[:, :, None], 0.0).sum(1)
        gaps = np.where(mismatch, np.abs(s - at_rank), 0.0).sum(1)
        wpr_sum += float((gaps / np.maximum(num_mis, 1)).sum())
    misranked = n - ranked_correctly
    return {
        "mp1": top / n,
        "ranking_accuracy": ranked_correctly / n,
        "mrr": rr_sum / n,
        "wpr": wpr_sum / n,
        "wpr_misranked": wpr_sum / misranked if misranked else 0.0,
        "map": ap_sum / n,
        "groups": n,
        "misranked_groups": misranked,
    }


def numpy_mp1_mrr(similarity, relevant, offsets):
    """MP@1 and MRR only, sort-free: the first relevant candidate in the ranking is the relevant
    one with the highest score, and it ranks below exactly the irrelevant candidates scoring at
    least as high (ties: irrelevant first), so one per-group maximum and one count suffice."""
    scores = np.asarray(similarity)
    rel = np.asarray(relevant, dtype=bool)
    off = np.asarray(offsets, dtype=np.int64)
    starts = off[:-1]
    best_relevant = np.maximum.reduceat(np.where(rel, scores, -np.inf), starts)
    above = ~rel & (scores >= np.repeat(best_relevant, np.diff(off)))
    first_hit = np.add.reduceat(above, starts, dtype=np.int64)
    n = starts.size
    return {"mp1": float(np.count_nonzero(first_hit == 0)) / n,
            "mrr": float((1.0 / (first_hit + 1.0)).sum()) / n}


# ----------------------------------------------------------------------------- pandas
@functools.lru_cache(maxsize=None)
def make_dataframe(num_groups: int):
    pd = pytest.importorskip("pandas")

    scores, relevant, offsets = make_groups(num_groups)
    group = np.repeat(np.arange(num_groups), np.diff(offsets))
    return pd.DataFrame({"group": group, "score": scores.astype(np.float64), "relevant": relevant})


def pandas_groupby_ranking_metrics(df):
    """sort_fast's six ranking metrics (docs/metrics.md, ``convention="paper"``: ties
    pessimistic, mean gap per group, AP) from a sorted candidate table and a Python loop over
    its groups."""
    ranked = df.sort_values(["group", "score", "relevant"], ascending=[True, False, True],
                            kind="stable")
    p1, correct, rrs, wprs, aps, misranked = [], [], [], [], [], []
    for _, g in ranked.groupby("group", sort=False):
        s = g["score"].tolist()
        r = g["relevant"].tolist()
        rel_pos = [i for i, x in enumerate(r) if x]
        nr = len(rel_pos)
        p1.append(1.0 if r[0] else 0.0)
        rrs.append(1.0 / (rel_pos[0] + 1))
        aps.append(sum((k + 1) / (i + 1) for k, i in enumerate(rel_pos)) / nr)
        parallel = [x for x, y in zip(s, r) if y] + [x for x, y in zip(s, r) if not y]
        diffs = [abs(s[i] - parallel[i]) for i in range(len(s)) if r[i] != (i < nr)]
        correct.append(0.0 if diffs else 1.0)
        misranked.append(bool(diffs))
        wprs.append(sum(diffs) / len(diffs) if diffs else 0.0)
    n = len(p1)
    mis = [w for w, m in zip(wprs, misranked) if m]
    return {
        "mp1": sum(p1) / n,
        "ranking_accuracy": sum(correct) / n,
        "mrr": sum(rrs) / n,
        "wpr": sum(wprs) / n,
        "wpr_misranked": sum(mis) / len(mis) if mis else 0.0,
        "map": sum(aps) / n,
        "groups": n,
        "misranked_groups": len(mis),
    }


# ----------------------------------------------------------------------------- ranx
RANX_METRICS = ["precision@1", "mrr", "map"]


@functools.lru_cache(maxsize=None)
def make_ranx(num_groups: int):
    """``(Qrels, Run, seconds to build them)``: query ids ``str(group)``, doc ids
    ``str(position in the group)``, qrels hold the relevant candidates (relevance 1)."""
    from ranx import Qrels, Run

    scores, relevant, offsets = make_groups(num_groups)
    t0 = time.perf_counter()
    docs = [str(j) for j in range(int(np.diff(offsets).max()))]
    s, r, o = scores.astype(np.float64).tolist(), relevant.tolist(), offsets.tolist()
    qrels, run = {}, {}
    for g in range(num_groups):
        a, b = o[g], o[g + 1]
        q = str(g)
        run[q] = dict(zip(docs, s[a:b]))
        qrels[q] = {docs[j - a]: 1 for j in range(a, b) if r[j]}
    qrels, run = Qrels.from_dict(qrels), Run.from_dict(run)
    return qrels, run, time.perf_counter() - t0


def _tied_groups(num_groups: int) -> np.ndarray:
    """bool [N]: the group holds two equal scores (where ranx and docs/metrics.md may disagree)."""
    scores, _, offsets = make_groups(num_groups)
    sizes = np.diff(offsets)
    group = np.repeat(np.arange(num_groups), sizes)
    order = np.lexsort((scores, group))
    ss, gg = scores[order], group[order]
    same = (ss[1:] == ss[:-1]) & (gg[1:] == gg[:-1])
    tied = np.zeros(num_groups, bool)
    tied[gg[1:][same]] = True
    return tied


def check_ranx(num_groups: int, qrels, run) -> int:
    """Per-query ranx values vs the extension on tie-free groups; returns the tied-group count.
    Also warms up (JIT-compiles) ranx."""
    from ranx import evaluate

    ref = extension_reference(num_groups)["per_group"]
    got = evaluate(qrels, run, RANX_METRICS, return_mean=False, save_results_in_run=False)
    ids = np.array([int(q) for q in run.get_query_ids()])
    tied = _tied_groups(num_groups)
    keep = ~tied[ids]
    pairs = {"precision@1": "precision_at_1", "mrr": "reciprocal_rank", "map": "average_precision"}
    for ranx_name, ours in pairs.items():
        mine = ref[ours][ids][keep].astype(np.float64)
        theirs = np.asarray(got[ranx_name], np.float64)[keep]
        np.testing.assert_allclose(theirs, mine, rtol=0, atol=1e-6, err_msg=ranx_name)
        assert abs(theirs.mean() - mine.mean()) <= 1e-6, ranx_name
    return int(tied.sum())


# ----------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def measure_peak_memory(fn, *args, **kwargs):
    """``(tracemalloc peak MiB, peak-RSS increase MiB or None)`` of one call.

    tracemalloc sees numpy's buffers and Python objects but not C++ ``new``/``std::vector``;
    the RSS figure resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and
    reports ``VmHWM - VmRSS`` before the call, which does see them (page granularity)."""
    gc.collect()
    rss = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn(*args, **kwargs)
        rss = (_rss_kib("VmHWM") - base) / 1024
    except OSError:
        pass
    gc.collect()
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20, rss


def _record_memory(benchmark, name, num_groups, fn, *args, **kwargs):
    if num_groups != max(SIZES):
        return
    traced, rss = measure_peak_memory(fn, *args, **kwargs)
    benchmark.extra_info["peak_tracemalloc_MiB"] = round(traced, 3)
    benchmark.extra_info["peak_rss_increase_MiB"] = None if rss is None else round(rss, 3)
    _report(f"{name} @ {num_groups} groups: peak tracemalloc {traced:.3f} MiB, "
            f"peak RSS increase {rss if rss is None else round(rss, 1)} MiB")


# ----------------------------------------------------------------------------- benchmarks
def _pedantic_rounds(num_groups: int) -> int:
    return 5 if num_groups >= 1_000_000 else 10


def _case(benchmark, num_groups, layout, dtype="float32"):
    benchmark.group = f"ranking-{num_groups}-{layout}"
    return make_groups(num_groups, layout, dtype=dtype), extension_reference(num_groups, layout)


DTYPES = ["float32", "float64"]


# float64 scores hold the float32 values: the results must be the float32 ones, exactly
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_groups,layout", CASES, ids=CASE_IDS)
def test_extension(benchmark, num_groups, layout, dtype):
    data, want = _case(benchmark, num_groups, layout, dtype)
    got = benchmark(ranking_metrics, *data)
    assert got == {k: v for k, v in want.items() if k != "per_group"}
    benchmark.extra_info["threads"] = os.cpu_count()
    _record_memory(benchmark, f"extension {dtype}", num_groups, ranking_metrics, *data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_groups,layout", CASES, ids=CASE_IDS)
def test_extension_1thread(benchmark, num_groups, layout, dtype):
    data, want = _case(benchmark, num_groups, layout, dtype)
    got = benchmark(ranking_metrics, *data, num_threads=1)
    assert got == {k: v for k, v in want.items() if k != "per_group"}  # thread-count invariant
    benchmark.extra_info["threads"] = 1


def _numpy_bench(benchmark, name, fn, num_groups, layout, metrics=METRICS):
    data, want = _case(benchmark, num_groups, layout)
    got = fn(*data)
    for key in metrics:
        assert got[key] == pytest.approx(want[key], rel=0, abs=1e-9), key
    if "misranked_groups" in got:
        assert got["misranked_groups"] == want["misranked_groups"]
    benchmark.pedantic(fn, args=data, rounds=_pedantic_rounds(num_groups), iterations=1,
                       warmup_rounds=1)
    _record_memory(benchmark, name, num_groups, fn, *data)


@pytest.mark.parametrize("num_groups,layout", CASES, ids=CASE_IDS)
def test_numpy(benchmark, num_groups, layout):
    _numpy_bench(benchmark, "numpy", numpy_ranking_metrics, num_groups, layout)


# its own parameter name, so that common.FULL_ONLY keeps its 1M runs (about 50 s) out of the
# quick sizes
@pytest.mark.parametrize("pairwise_groups,layout", CASES, ids=CASE_IDS)
def test_numpy_pairwise(benchmark, pairwise_groups, layout):
    _numpy_bench(benchmark, "numpy_pairwise", numpy_pairwise_ranking_metrics, pairwise_groups,
                 layout)


@pytest.mark.parametrize("num_groups,layout", CASES, ids=CASE_IDS)
def test_numpy_mp1_mrr(benchmark, num_groups, layout):
    _numpy_bench(benchmark, "numpy_mp1_mrr", numpy_mp1_mrr, num_groups, layout,
                 metrics=("mp1", "mrr"))


@pytest.mark.parametrize("num_groups", PANDAS_SIZES)
def test_pandas(benchmark, num_groups):
    benchmark.group = f"ranking-{num_groups}-ragged"
    df = make_dataframe(num_groups)
    want = extension_reference(num_groups)
    got = pandas_groupby_ranking_metrics(df)
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=0, abs=1e-9), key
    assert got["misranked_groups"] == want["misranked_groups"]
    benchmark.pedantic(pandas_groupby_ranking_metrics, args=(df,), rounds=3, iterations=1)


def _ranx_bench(benchmark, num_groups, save):
    if num_groups not in RANX_SIZES:
        # measured: 16.8 s at 10k (incl. numba cache load), 29.3 s at 100k, ~1 GB RSS at 100k
        pytest.skip("ranx Qrels/Run construction would take >2 min (~14 s per 100k groups "
                    "measured, ~2.5 min and ~10 GB extrapolated at 1M groups)")
    evaluate = pytest.importorskip("ranx").evaluate

    benchmark.group = f"ranking-{num_groups}-ragged"
    qrels, run, build_s = make_ranx(num_groups)
    tied = check_ranx(num_groups, qrels, run)
    benchmark.extra_info["conversion_s"] = round(build_s, 2)
    benchmark.extra_info["tied_groups"] = tied
    _report(f"ranx @ {num_groups} groups: Qrels/Run construction {build_s:.1f} s (untimed), "
            f"{tied} groups with tied scores excluded from the value check")
    benchmark.pedantic(evaluate, args=(qrels, run, RANX_METRICS),
                       kwargs={"save_results_in_run": save}, rounds=3, iterations=1,
                       warmup_rounds=1)


@pytest.mark.parametrize("num_groups", SIZES)
def test_ranx(benchmark, num_groups):
    _ranx_bench(benchmark, num_groups, save=True)


@pytest.mark.parametrize("num_groups", SIZES)
def test_ranx_nosave(benchmark, num_groups):
    _ranx_bench(benchmark, num_groups, save=False)
