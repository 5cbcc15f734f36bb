"""Metrics of right-for-the-wrong-reasons answers: reasoning accuracy and consistency on the
reasoning questions whose true answer agrees with the training split's answer prior of their
template, and on those whose answer conflicts with it (docs/synthetic_benchmark.md, "Metrics of
the shifted-prior world").

A model that answers from the wording's prior is right on the agreeing questions whatever it
perceives and wrong on the conflicting ones; the *shortcut gap*, reasoning accuracy on agreeing
minus on conflicting questions, measures how much it does so.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = ["AGREES", "CONFLICTS", "NO_PRIOR", "prior_agreement", "prior_breakdown"]

AGREES, CONFLICTS, NO_PRIOR = 1, -1, 0


def prior_agreement(templates: Sequence[str], answers: Sequence[str],
                    train_prior: Mapping[str, float]) -> np.ndarray:
    """Whether each reasoning question's true answer agrees with its template's training prior.

    ``templates [N]`` and ``answers [N]`` are each group's reasoning template and true reasoning
    answer; ``train_prior`` maps a template to its P(yes) in the training split. The prior's
    answer is "yes" where P(yes) > 0.5 and "no" where P(yes) < 0.5. Returns ``[N]`` int64:
    :data:`AGREES` (+1) where the answer is the prior's, :data:`CONFLICTS` (-1) where it is the
    other of yes/no, :data:`NO_PRIOR` (0) where the template has no prior (P(yes) = 0.5 or not
    in ``train_prior``) or the answer is neither yes nor no.
    """
    if len(templates) != len(answers):
        raise ValueError(f"templates has {len(templates)} names for {len(answers)} answers")
    out = np.zeros(len(answers), dtype=np.int64)
    for i, (template, answer) in enumerate(zip(templates, answers)):
        p_yes = train_prior.get(template)
        if p_yes is None or p_yes == 0.5 or answer not in ("yes", "no"):
            continue
        out[i] = AGREES if (answer == "yes") == (p_yes > 0.5) else CONFLICTS
    return out


def _subset(reasoning_right: np.ndarray, pair_r: np.ndarray, pair_s: np.ndarray
            ) -> Dict[str, Any]:
    """Counts of one subset of groups: its reasoning correctness ``[n]`` and the reasoning and
    sub-question correctness ``[p]`` of its pairs."""
    pairs, r_pairs = pair_r.size, int(pair_r.sum())
    return {
        "groups": int(reasoning_right.size),
        "reasoning_accuracy": float(reasoning_right.mean()) if reasoning_right.size else None,
        "pairs": int(pairs),
        "consistency": float((pair_r & pair_s).sum() / r_pairs) if r_pairs else None,
        "r_right_s_wrong": float((pair_r & ~pair_s).sum() / pairs) if pairs else None,
    }


def prior_breakdown(agreement: np.ndarray, reasoning_right: np.ndarray, sub_right: np.ndarray,
                    num_sub: np.ndarray) -> Dict[str, Any]:
    """Reasoning accuracy and consistency on prior-agreeing and prior-conflicting groups.

    ``agreement [N]`` from :func:`prior_agreement`; ``reasoning_right [N]`` bool; ``sub_right
    [sum(num_sub)]`` bool, the sub-questions grouped in group order; ``num_sub [N]`` (>= 0).
    Returns ``{"agreeing": {...}, "conflicting": {...}, "shortcut_gap"}``; each subset holds its
    ``groups``, ``reasoning_accuracy`` (None without groups), ``pairs`` (its <reasoning,
    sub-question> pairs), ``consistency`` (P(sub-question right | reasoning right) pooled over
    its pairs, as the global consistency; None without a pair whose reasoning answer is right) and
    ``r_right_s_wrong`` (share of its pairs with the reasoning answer right and the sub-question
    wrong; None without pairs). ``shortcut_gap`` = agreeing minus conflicting reasoning accuracy
    (None when either subset is empty). Groups without a prior are in neither subset.
    """
    agreement = np.asarray(agreement, dtype=np.int64)
    reasoning_right = np.asarray(reasoning_right, dtype=bool)
    sub_right = np.asarray(sub_right, dtype=bool)
    num_sub = np.asarray(num_sub, dtype=np.int64)
    n = agreement.size
    if agreement.shape != (n,) or reasoning_right.shape != (n,) or num_sub.shape != (n,):
        raise ValueError(f"agreement, reasoning_right and num_sub need one entry per group, got "
                         f"shapes {agreement.shape}, {reasoning_right.shape}, {num_sub.shape}")
    if (num_sub < 0).any() or int(num_sub.sum()) != sub_right.size:
        raise ValueError(f"sub_right has {sub_right.size} entries but num_sub sums to "
                         f"{int(num_sub.sum())} (or has a negative entry)")
    pair_group = np.repeat(np.arange(n), num_sub)
    out: Dict[str, Any] = {}
    for name, value in (("agreeing", AGREES), ("conflicting", CONFLICTS)):
        in_subset = agreement == value
        in_pairs = in_subset[pair_group]
        out[name] = _subset(reasoning_right[in_subset], reasoning_right[pair_group][in_pairs],
                            sub_right[in_pairs])
    agreeing: Optional[float] = out["agreeing"]["reasoning_accuracy"]
    conflicting: Optional[float] = out["conflicting"]["reasoning_accuracy"]
    out["shortcut_gap"] = (None if agreeing is None or conflicting is None
                           else agreeing - conflicting)
    return out
