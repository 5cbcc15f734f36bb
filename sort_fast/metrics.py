"""Ranking and consistency metrics (docs/metrics.md).

The ranking metrics run in the C++ extension ``sort_fast._ranking`` (parallel over groups, GIL
released); this module converts and checks inputs and offers the packed-layout helpers.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch

from . import _ranking
from .layout import (
    ROLE_IRRELEVANT,
    ROLE_REASONING,
    ROLE_SUB,
    candidate_layout,
    check_layout,
    row_roles,
)

__all__ = [
    "ranking_metrics",
    "ranking_metrics_packed",
    "consistency",
    "ConsistencyMeter",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
# the definitions of docs/metrics.md: the paper's text, or the authors' code behind its numbers
CONVENTIONS = ("paper", "authors")


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array, a tensor or a sequence, got {type(x).__name__}")
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged nested sequences and the like
        raise TypeError(f"{name} could not be read as a 1-D array: {e}") from None


def _as_scores(x: ArrayLike) -> np.ndarray:
    a = _to_numpy(x, "similarity")
    if a.dtype.kind in "fiu" and not a.dtype.isnative:  # big-endian: to the native type
        a = a.astype(a.dtype.type)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype.kind in "iu":
        a = a.astype(np.float64)
    elif a.dtype not in (np.float32, np.float64):
        raise TypeError(f"similarity must hold real numbers, got dtype {a.dtype}")
    return np.ascontiguousarray(a)


def _as_relevant(x: ArrayLike) -> np.ndarray:
    a = _to_numpy(x, "relevant")
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"relevant must be bool or 0/1 integers, got dtype {a.dtype}")
    bad = (a != 0) & (a != 1)
    if bad.any():
        i = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(f"relevant must be 0 or 1, got {a.ravel()[i]} at candidate {i}")
    return np.ascontiguousarray(a.astype(np.bool_))


def _as_int64(x: ArrayLike, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    return np.ascontiguousarray(a.astype(np.int64, copy=False))


def ranking_metrics(
    similarity: ArrayLike,
    relevant: ArrayLike,
    offsets: ArrayLike,
    *,
    per_group: bool = False,
    num_threads: Optional[int] = None,
    convention: str = "paper",
) -> Dict[str, Any]:
    """Ranking metrics over ragged groups of candidates.

    Args:
        similarity: ``[C]`` scores (cosines), float32 or float64 are read without a copy
            (big-endian ones are converted). Scores must be finite.
        relevant: ``[C]`` bool, True for a sub-question.
        offsets: ``[N+1]`` int64, group ``g`` owns candidates ``offsets[g]:offsets[g+1]``.
        per_group: also return ``"per_group"``, a dict of ``[N]`` arrays
            (``precision_at_1``, ``ranked_correctly``, ``misranked``, ``reciprocal_rank``,
            ``wpr``, ``average_precision``).
        num_threads: worker threads at most (default: all cores); fewer run where the system
            cannot start more.
        convention: ``"paper"`` (default): the definitions of the paper's text, ties broken
            pessimistically (irrelevant first). ``"authors"``: those of the authors' code behind
            the paper's numbers: ties in input order, a group's WPR is the sum of its gaps (so
            ``wpr_misranked`` is the WPR they report) and ``map`` is the mean over a group's
            relevant candidates of 1 / rank. docs/metrics.md has both.

    Returns:
        dict with ``mp1``, ``ranking_accuracy``, ``mrr``, ``wpr``, ``wpr_misranked``, ``map``,
        ``groups`` and ``misranked_groups``.

    Raises:
        ValueError naming the first bad group (NaN or infinite score, no candidate, no relevant
        candidate, offsets out of order or range), a length mismatch or an unknown convention;
        TypeError for unusable inputs; MemoryError when the scratch space to sort the largest
        group cannot be allocated.

    The extension works on a copy of ``offsets`` and reads each score and relevance flag once, so
    another thread writing into the arrays during the call can change the values it sees but
    cannot make it read out of bounds.
    """
    if num_threads is None:
        num_threads = 0
    elif isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(map(repr, CONVENTIONS))}, "
                         f"got {convention!r}")
    scores, rel, off = _as_scores(similarity), _as_relevant(relevant), _as_int64(offsets, "offsets")
    for name, a in (("similarity", scores), ("relevant", rel), ("offsets", off)):
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return _ranking.evaluate(scores, rel, off, per_group, num_threads,
                             authors_convention=convention == "authors")


def ranking_metrics_packed(
    similarity: ArrayLike,
    offsets: torch.Tensor,
    num_sub: torch.Tensor,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Ranking metrics from the packed layout of the rest of the library (docs/ops.md).

    ``similarity`` is ``[T]`` over all packed rows (as returned by
    :func:`sort_fast.gradcam_similarity`); the reasoning rows are dropped and sub-questions are
    the relevant candidates. Keyword arguments go to :func:`ranking_metrics`.
    """
    scores = torch.as_tensor(_as_scores(similarity))
    if scores.dim() != 1:
        raise ValueError(f"similarity must be 1-D [T] (one score per packed row), got shape "
                         f"{tuple(scores.shape)}")
    offsets, num_sub = torch.as_tensor(offsets).cpu(), torch.as_tensor(num_sub).cpu()
    rows, relevant, candidate_offsets = candidate_layout(offsets, num_sub, scores.numel())
    return ranking_metrics(scores[rows], relevant, candidate_offsets, **kwargs)


def _as_bool(x: ArrayLike, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype != np.bool_:
        if a.size and (a.dtype.kind not in "iu" or ((a != 0) & (a != 1)).any()):
            raise TypeError(f"{name} must be bool (or 0/1 integers), got dtype {a.dtype}")
        a = a.astype(np.bool_)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _as_vqa_score(x: ArrayLike, shape: tuple) -> np.ndarray:
    v = _to_numpy(x, "vqa_score")
    if v.dtype.kind not in "biuf":
        raise TypeError(f"vqa_score must be numeric, got dtype {v.dtype}")
    v = v.astype(np.float64)
    if v.shape != shape:
        raise ValueError(f"vqa_score has shape {v.shape} but correct has {shape}")
    bad = np.flatnonzero(~((v >= 0) & (v <= 1)))  # NaN fails both comparisons
    if bad.size:
        raise ValueError(f"vqa_score must be in [0, 1], got {v[bad[0]]:g} at row {bad[0]}")
    return v


class ConsistencyMeter:
    """Pools consistency quadrants and per-role accuracy over batches (docs/metrics.md).

    Counts are pooled over all ``<reasoning, sub-question>`` pairs seen, not averaged per batch.
    An update that raises (every input is validated first) adds nothing.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.quadrants = np.zeros((2, 2), dtype=np.int64)  # [reasoning right?, sub right?]
        self.correct = np.zeros(3, dtype=np.int64)  # per role: reasoning, sub, irrelevant
        self.total = np.zeros(3, dtype=np.int64)
        self.vqa_score = np.zeros(3, dtype=np.float64)
        self.vqa_total = np.zeros(3, dtype=np.int64)

    def update(
        self,
        reasoning_correct: ArrayLike,
        sub_correct: ArrayLike,
        num_sub: ArrayLike,
        irrelevant_correct: Optional[ArrayLike] = None,
    ) -> None:
        """Adds groups: ``reasoning_correct [N]``, ``sub_correct [sum(num_sub)]`` (grouped in
        order), ``num_sub [N]`` and optionally ``irrelevant_correct [M]``."""
        r = _as_bool(reasoning_correct, "reasoning_correct")
        s = _as_bool(sub_correct, "sub_correct")
        irr = None if irrelevant_correct is None else _as_bool(irrelevant_correct,
                                                               "irrelevant_correct")
        k = _as_int64(num_sub, "num_sub")
        if k.shape != r.shape:
            raise ValueError(f"num_sub has shape {k.shape} but reasoning_correct has {r.shape}")
        if (k < 1).any():
            g = int(np.flatnonzero(k < 1)[0])
            raise ValueError(f"group {g} has num_sub={int(k[g])}; every group needs >= 1")
        if int(k.sum()) != s.size:
            raise ValueError(
                f"sub_correct has {s.size} entries but num_sub sums to {int(k.sum())}"
            )
        pair_r = np.repeat(r, k)
        np.add.at(self.quadrants, (1 - pair_r.astype(np.int64), 1 - s.astype(np.int64)), 1)
        self._add_role(ROLE_REASONING, r)
        self._add_role(ROLE_SUB, s)
        if irr is not None:
            self._add_role(ROLE_IRRELEVANT, irr)

    def update_packed(
        self,
        correct: ArrayLike,
        offsets: torch.Tensor,
        num_sub: torch.Tensor,
        vqa_score: Optional[ArrayLike] = None,
    ) -> None:
        """Adds a packed batch: ``correct [T]`` bool over all rows, the layout of docs/ops.md and
        optionally the soft VQA score ``[T]`` of each row's predicted answer."""
        c = _as_bool(correct, "correct")
        offsets, num_sub = torch.as_tensor(offsets).cpu(), torch.as_tensor(num_sub).cpu()
        sizes = check_layout(offsets, num_sub, c.size).sizes
        v = None if vqa_score is None else _as_vqa_score(vqa_score, c.shape)
        roles = row_roles(offsets, num_sub, sizes).numpy()
        self.update(c[roles == ROLE_REASONING], c[roles == ROLE_SUB], num_sub,
                    c[roles == ROLE_IRRELEVANT])
        if v is not None:
            for role in (ROLE_REASONING, ROLE_SUB, ROLE_IRRELEVANT):
                self.vqa_score[role] += v[roles == role].sum()
                self.vqa_total[role] += int((roles == role).sum())

    def _add_role(self, role: int, correct: np.ndarray) -> None:
        self.correct[role] += int(correct.sum())
        self.total[role] += correct.size

    def compute(self) -> Dict[str, Any]:
        """Quadrant fractions, consistency (0 and ``consistency_defined=False`` when no pair has
        a correct reasoning answer) and per-role accuracy (None for a role never seen)."""
        pairs = int(self.quadrants.sum())
        frac = self.quadrants / pairs if pairs else np.zeros((2, 2))
        r_right = int(self.quadrants[0].sum())
        out: Dict[str, Any] = {
            "r_right_s_right": float(frac[0, 0]),
            "r_right_s_wrong": float(frac[0, 1]),
            "r_wrong_s_right": float(frac[1, 0]),
            "r_wrong_s_wrong": float(frac[1, 1]),
            "consistency": float(self.quadrants[0, 0] / r_right) if r_right else 0.0,
            "consistency_defined": r_right > 0,
            "pairs": pairs,
        }
        for role, name in ((ROLE_REASONING, "reasoning"), (ROLE_SUB, "sub"),
                           (ROLE_IRRELEVANT, "irrelevant")):
            n = int(self.total[role])
            out[f"{name}_accuracy"] = float(self.correct[role] / n) if n else None
            nv = int(self.vqa_total[role])
            if nv:
                out[f"{name}_vqa_accuracy"] = float(self.vqa_score[role] / nv)
        n_all = int(self.total.sum())
        out["accuracy"] = float(self.correct.sum() / n_all) if n_all else None
        if self.vqa_total.sum():
            out["vqa_accuracy"] = float(self.vqa_score.sum() / self.vqa_total.sum())
        return out


def consistency(
    reasoning_correct: ArrayLike,
    sub_correct: ArrayLike,
    num_sub: ArrayLike,
    *,
    irrelevant_correct: Optional[ArrayLike] = None,
) -> Dict[str, Any]:
    """Consistency quadrants over ``<reasoning, sub-question>`` pairs (docs/metrics.md).

    ``reasoning_correct [N]``, ``sub_correct [sum(num_sub)]`` grouped in order, ``num_sub [N]``.
    Returns the fractions ``r_right_s_right``, ``r_right_s_wrong``, ``r_wrong_s_right``,
    ``r_wrong_s_wrong``, ``consistency = R✓S✓ / (R✓S✓ + R✓S✗)``, ``consistency_defined``,
    ``pairs`` and per-role accuracy. Use :class:`ConsistencyMeter` to pool over batches.
    """
    meter = ConsistencyMeter()
    meter.update(reasoning_correct, sub_correct, num_sub, irrelevant_correct)
    return meter.compute()
