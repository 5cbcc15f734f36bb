"""Metrics of the shifted-prior world: accuracy and consistency on prior-agreeing and
prior-conflicting reasoning questions, and the shortcut gap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sort_fast.data import SyntheticIntrospect
from sort_fast.models import PythiaConfig, PythiaVQA
from sort_fast.training.evaluation import evaluate
from sort_fast.training.prior_metrics import (
    AGREES,
    CONFLICTS,
    NO_PRIOR,
    prior_agreement,
    prior_breakdown,
)
from test_evaluation_breakdown import _plan_answers

SUBSET_KEYS = {"groups", "reasoning_accuracy", "pairs", "consistency", "r_right_s_wrong"}


def test_prior_agreement_on_hand_made_questions():
    prior = {"wash": 0.85, "big_colour": 0.2, "pair": 0.5}
    templates = ["wash", "wash", "big_colour", "big_colour", "pair", "other", "wash"]
    answers = ["yes", "no", "no", "yes", "yes", "yes", "red"]
    assert prior_agreement(templates, answers, prior).tolist() == [
        AGREES, CONFLICTS, AGREES, CONFLICTS, NO_PRIOR, NO_PRIOR, NO_PRIOR]
    with pytest.raises(ValueError, match="2 names for 1 answers"):
        prior_agreement(["wash", "wash"], ["yes"], prior)


def test_prior_breakdown_on_hand_made_groups():
    # group 0 agrees (R right; subs right, wrong), group 1 agrees (R right; sub wrong),
    # group 2 conflicts (R wrong; subs right, right), group 3 has no prior (R right; sub wrong)
    out = prior_breakdown(agreement=np.array([AGREES, AGREES, CONFLICTS, NO_PRIOR]),
                          reasoning_right=np.array([True, True, False, True]),
                          sub_right=np.array([True, False, False, True, True, False]),
                          num_sub=np.array([2, 1, 2, 1]))
    assert out["agreeing"] == {"groups": 2, "reasoning_accuracy": 1.0, "pairs": 3,
                               "consistency": pytest.approx(1 / 3),
                               "r_right_s_wrong": pytest.approx(2 / 3)}
    assert out["conflicting"] == {"groups": 1, "reasoning_accuracy": 0.0, "pairs": 2,
                                  "consistency": None, "r_right_s_wrong": 0.0}
    assert out["shortcut_gap"] == 1.0


def test_prior_breakdown_without_a_prior_is_undefined():
    out = prior_breakdown(np.zeros(2, dtype=np.int64), np.array([True, False]),
                          np.array([True, True, False]), np.array([1, 2]))
    for name in ("agreeing", "conflicting"):
        assert out[name] == {"groups": 0, "reasoning_accuracy": None, "pairs": 0,
                             "consistency": None, "r_right_s_wrong": None}
    assert out["shortcut_gap"] is None


def test_prior_breakdown_matches_a_group_by_group_count():
    rng = np.random.default_rng(7)
    n = 200
    num_sub = rng.integers(0, 5, size=n)
    agreement = rng.integers(-1, 2, size=n)
    reasoning_right = rng.random(n) < 0.6
    sub_right = rng.random(int(num_sub.sum())) < 0.7
    out = prior_breakdown(agreement, reasoning_right, sub_right, num_sub)
    starts = np.concatenate([[0], np.cumsum(num_sub)])
    for name, value in (("agreeing", AGREES), ("conflicting", CONFLICTS)):
        r, pairs = [], []
        for g in range(n):
            if agreement[g] == value:
                r.append(reasoning_right[g])
                pairs += [(reasoning_right[g], s) for s in sub_right[starts[g]: starts[g + 1]]]
        right_pairs = [s for rr, s in pairs if rr]
        assert out[name]["groups"] == len(r)
        assert out[name]["reasoning_accuracy"] == pytest.approx(np.mean(r))
        assert out[name]["pairs"] == len(pairs)
        assert out[name]["consistency"] == pytest.approx(np.mean(right_pairs))
        assert out[name]["r_right_s_wrong"] == pytest.approx(
            sum(rr and not s for rr, s in pairs) / len(pairs))
    assert out["shortcut_gap"] == pytest.approx(
        out["agreeing"]["reasoning_accuracy"] - out["conflicting"]["reasoning_accuracy"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(agreement=[1, 1], reasoning_right=[True], sub_right=[True], num_sub=[1, 0]),
     "one entry per group"),
    (dict(agreement=[1], reasoning_right=[True], sub_right=[True, False], num_sub=[1]),
     "num_sub sums to 1"),
    (dict(agreement=[1, 1], reasoning_right=[True, True], sub_right=[], num_sub=[1, -1]),
     "negative entry"),
])
def test_prior_breakdown_rejects_misshaped_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prior_breakdown(**{k: np.asarray(v) for k, v in kwargs.items()})


def _model(data: SyntheticIntrospect) -> PythiaVQA:
    return PythiaVQA(PythiaConfig(len(data.vocab), data.num_answers, embed_dim=16, text_hidden=24,
                                  attention_hidden=20, joint_dim=32, classifier_text_hidden=12,
                                  classifier_image_hidden=20))


def test_evaluate_reports_the_prior_breakdown_of_the_shift_design(monkeypatch):
    """On the shifted-prior test split every template has a train prior, so agreeing and
    conflicting groups make up all groups and pairs, and together give the global numbers."""
    data = SyntheticIntrospect(seed=0, split="test", num_groups=40, design="shift")
    right = np.random.default_rng(3).random(sum(len(g.questions) for g in data)) < 0.6
    _plan_answers(monkeypatch, right)
    metrics = evaluate(_model(data), data, batch_groups=7, device=torch.device("cpu"),
                       answer_vocab=data.answer_vocab, templates=data.templates).metrics
    prior = metrics["prior_agreement"]
    agreement = prior_agreement(data.templates, [g.answers[0] for g in data], data.train_prior)
    assert (agreement != NO_PRIOR).all()
    agreeing, conflicting = prior["agreeing"], prior["conflicting"]
    assert set(agreeing) == set(conflicting) == SUBSET_KEYS
    assert agreeing["groups"] == int((agreement == AGREES).sum())
    assert agreeing["groups"] + conflicting["groups"] == len(data)
    assert agreeing["pairs"] + conflicting["pairs"] == metrics["pairs"]
    pooled = (agreeing["reasoning_accuracy"] * agreeing["groups"]
              + conflicting["reasoning_accuracy"] * conflicting["groups"]) / len(data)
    assert pooled == pytest.approx(metrics["reasoning_accuracy"])
    pooled = (agreeing["r_right_s_wrong"] * agreeing["pairs"]
              + conflicting["r_right_s_wrong"] * conflicting["pairs"]) / metrics["pairs"]
    assert pooled == pytest.approx(metrics["r_right_s_wrong"])
    # the reasoning row of group g is right iff right[first row of g]
    first = np.cumsum([0] + [len(g.questions) for g in data])[:-1]
    expected = right[first][agreement == CONFLICTS].mean()
    assert conflicting["reasoning_accuracy"] == pytest.approx(expected)
    assert prior["shortcut_gap"] == pytest.approx(
        agreeing["reasoning_accuracy"] - conflicting["reasoning_accuracy"])


def test_evaluate_has_no_prior_breakdown_without_a_prior(monkeypatch):
    data = SyntheticIntrospect(seed=0, split="val", num_groups=20, design="balanced")
    metrics = evaluate(_model(data), data, batch_groups=8, device=torch.device("cpu"),
                       answer_vocab=data.answer_vocab, templates=data.templates).metrics
    assert "prior_agreement" not in metrics
    shift = SyntheticIntrospect(seed=0, split="val", num_groups=20, design="shift")
    no_templates = evaluate(_model(shift), shift, batch_groups=8, device=torch.device("cpu"),
                            answer_vocab=shift.answer_vocab).metrics
    assert "prior_agreement" not in no_templates
