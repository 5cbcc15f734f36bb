"""The evaluation's breakdowns: per template (coupling), per kind of question, cosine spread."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch

from sort_fast.data import Group, SyntheticIntrospect, collate_groups
from sort_fast.models import PythiaConfig, PythiaVQA
from sort_fast.training import evaluation
from sort_fast.training.evaluation import evaluate, question_kind

CPU = torch.device("cpu")
# the metrics evaluate reported before the breakdowns; they must keep their values
LEGACY_KEYS = (
    "r_right_s_right", "r_right_s_wrong", "r_wrong_s_right", "r_wrong_s_wrong", "consistency",
    "consistency_defined", "pairs", "reasoning_accuracy", "sub_accuracy", "irrelevant_accuracy",
    "reasoning_vqa_accuracy", "sub_vqa_accuracy", "irrelevant_vqa_accuracy", "accuracy",
    "vqa_accuracy", "mp1", "ranking_accuracy", "mrr", "wpr", "wpr_misranked", "map", "groups",
    "misranked_groups", "similarity_sub_mean", "similarity_irrelevant_mean",
    "grounding_spearman", "grounding_questions", "grounding_source",
)
TEMPLATE_KEYS = {"groups", "reasoning_accuracy", "sub_accuracy", "consistency",
                 "independent_consistency", "coupling", "yes_rate", "mode_share",
                 "mode_consistency", "coupling_over_mode"}


@pytest.fixture(scope="module")
def data() -> SyntheticIntrospect:
    return SyntheticIntrospect(seed=0, split="val", num_groups=24)


@pytest.fixture
def model(data) -> PythiaVQA:
    return PythiaVQA(PythiaConfig(len(data.vocab), data.num_answers, embed_dim=16, text_hidden=24,
                                  attention_hidden=20, joint_dim=32, classifier_text_hidden=12,
                                  classifier_image_hidden=20))


def _plan(monkeypatch, predict) -> None:
    """Makes ``evaluate`` predict ``predict(classes, rows, num_classes)`` for each batch, where
    ``rows`` is the slice of the batch's packed rows among all batches' rows in order."""
    real = evaluation.gradcam_gradient
    position = [0]

    def planned(model, out, classes, naive, create_graph):
        scores, grad = real(model, out, classes, naive, create_graph=create_graph)
        n, num_classes = classes.numel(), scores.shape[1]
        pred = predict(classes, slice(position[0], position[0] + n), num_classes)
        position[0] += n
        return torch.nn.functional.one_hot(pred, num_classes).to(scores.dtype), grad

    monkeypatch.setattr(evaluation, "gradcam_gradient", planned)


def _plan_predictions(monkeypatch, predicted: np.ndarray) -> None:
    """Makes ``evaluate`` predict class ``predicted[i]`` for packed row ``i``."""
    _plan(monkeypatch, lambda classes, rows, num_classes: torch.as_tensor(predicted[rows]))


def _plan_answers(monkeypatch, right: np.ndarray) -> None:
    """Makes ``evaluate`` predict the ground-truth class of packed row ``i`` iff ``right[i]``,
    otherwise the next class."""
    _plan(monkeypatch, lambda classes, rows, num_classes: torch.where(
        torch.as_tensor(right[rows]), classes, (classes + 1) % num_classes))


def _planned_predictions(groups: Sequence[Group], right: np.ndarray) -> np.ndarray:
    classes = collate_groups(list(groups)).classes.numpy()
    return np.where(right, classes, (classes + 1) % groups[0].num_answers)


def _recount(groups: Sequence[Group], templates: Sequence[str], right: np.ndarray,
             predicted: np.ndarray, yes: int) -> Dict[str, Dict[str, object]]:
    """The per-template numbers, counted group by group."""
    seen: Dict[str, Dict[str, List]] = defaultdict(lambda: defaultdict(list))
    row = 0
    for group, name in zip(groups, templates):
        r, subs = right[row], right[row + 1: row + 1 + group.num_sub]
        t = seen[name]
        t["reasoning"].append(r)
        t["answers"].append(predicted[row])
        t["subs"].extend(subs)
        t["pairs"].extend((r, s) for s in subs)
        row += len(group.questions)
    out = {}
    truth = collate_groups(list(groups)).classes.numpy()
    row = 0
    for group, name in zip(groups, templates):  # the mode answer's pairs, once modes are known
        t = seen[name]
        counts = Counter(t["answers"])
        mode = max(counts, key=lambda a: (counts[a], -a))  # ties: the smaller class
        subs = right[row + 1: row + 1 + group.num_sub]
        t["mode_pairs"].extend((mode == truth[row], s) for s in subs)
        row += len(group.questions)
    for name, t in seen.items():
        consistent = [s for r, s in t["pairs"] if r]
        consistency = sum(consistent) / len(consistent) if consistent else None
        independent = sum(t["subs"]) / len(t["subs"])
        out[name] = {
            "groups": len(t["reasoning"]),
            "reasoning_accuracy": sum(t["reasoning"]) / len(t["reasoning"]),
            "sub_accuracy": independent,
            "consistency": consistency,
            "independent_consistency": independent,
            "coupling": None if consistency is None else consistency - independent,
            "yes_rate": sum(a == yes for a in t["answers"]) / len(t["answers"]),
            "mode_share": Counter(t["answers"]).most_common(1)[0][1] / len(t["answers"]),
            "right_pairs": len(consistent),
        }
        mode_consistent = [s for r, s in t["mode_pairs"] if r]
        mode = sum(mode_consistent) / len(mode_consistent) if mode_consistent else None
        out[name]["mode_consistency"] = mode
        out[name]["coupling_over_mode"] = (None if consistency is None or mode is None
                                           else consistency - mode)
    return out


def _assert_close(actual, expected, name):
    if expected is None:
        assert actual is None, name
    else:
        assert actual == pytest.approx(expected, abs=1e-12), name


def test_per_template_breakdown_matches_a_recount(data, model, monkeypatch):
    rows = sum(len(g.questions) for g in data)
    right = np.random.default_rng(1).random(rows) < 0.6
    _plan_answers(monkeypatch, right)
    metrics = evaluate(model, data, batch_groups=5, device=CPU, answer_vocab=data.answer_vocab,
                       templates=data.templates).metrics
    expected = _recount(data, data.templates, right, _planned_predictions(data, right),
                        yes=data.answer_vocab.get("yes"))
    assert list(metrics["per_template"]) == sorted(expected)
    for name, numbers in expected.items():
        got = metrics["per_template"][name]
        assert set(got) == TEMPLATE_KEYS
        for key in TEMPLATE_KEYS:
            _assert_close(got[key], numbers[key], f"{name}.{key}")
    # globally: independence expectations weighted by the pairs with a right reasoning answer
    all_right = sum(t["right_pairs"] for t in expected.values())
    independent = sum(t["right_pairs"] / all_right * t["independent_consistency"]
                      for t in expected.values())
    assert metrics["independent_consistency"] == pytest.approx(independent, abs=1e-12)
    assert metrics["coupling"] == pytest.approx(metrics["consistency"] - independent, abs=1e-12)
    assert sum(t["groups"] for t in metrics["per_template"].values()) == len(data)
    json.dumps(metrics)  # JSON-ready


def test_yes_rate_needs_a_yes_in_the_answer_vocabulary(data, model):
    metrics = evaluate(model, data, batch_groups=8, device=CPU,
                       templates=data.templates).metrics
    assert all(t["yes_rate"] is None for t in metrics["per_template"].values())


def test_coupling_is_zero_when_reasoning_is_independent_of_sub_questions(data, model,
                                                                          monkeypatch):
    # every group twice, with the same sub-question answers: right reasoning answer in the first
    # copy, wrong in the second, so within a template reasoning says nothing about sub-questions
    groups, templates = [*data, *data], [*data.templates, *data.templates]
    rows = sum(len(g.questions) for g in data)
    sub_right = np.random.default_rng(2).random(rows) < 0.5
    first_rows = np.cumsum([0] + [len(g.questions) for g in data])[:-1]
    right = np.concatenate([sub_right, sub_right])
    right[first_rows], right[rows + first_rows] = True, False
    _plan_answers(monkeypatch, right)
    metrics = evaluate(model, groups, batch_groups=7, device=CPU, templates=templates).metrics
    for name, t in metrics["per_template"].items():
        assert t["reasoning_accuracy"] == 0.5, name
        assert t["coupling"] == pytest.approx(0.0, abs=1e-12), name
    assert metrics["coupling"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < metrics["independent_consistency"] < 1.0


def test_coupling_is_positive_when_reasoning_and_sub_answers_agree(data, model, monkeypatch):
    # within each template alternately a group answered all right and one answered all wrong
    turn: Dict[str, int] = Counter()
    right = []
    for group, name in zip(data, data.templates):
        right += [turn[name] % 2 == 0] * len(group.questions)
        turn[name] += 1
    right = np.array(right)
    _plan_answers(monkeypatch, right)
    metrics = evaluate(model, data, batch_groups=6, device=CPU, templates=data.templates).metrics
    assert any(n >= 2 for n in turn.values())
    for name, t in metrics["per_template"].items():
        assert t["consistency"] == 1.0, name
        assert t["coupling"] == pytest.approx(1.0 - t["sub_accuracy"], abs=1e-12), name
        assert (t["coupling"] > 0) == (turn[name] >= 2), name
    assert metrics["consistency"] == 1.0
    assert metrics["coupling"] == pytest.approx(1.0 - metrics["independent_consistency"])
    assert metrics["coupling"] > 0.1
    assert metrics["coupling_over_mode"] > 0.1  # the answers track the sub-questions, not a mode


def test_answer_bias_alone_has_no_coupling_over_the_mode(data, model, monkeypatch):
    # every reasoning question answered "yes", sub-questions right at random: the independence
    # coupling can still be positive (a "yes" is right exactly when the facts hold), the
    # coupling over the model's mode answer is 0
    classes = collate_groups(list(data)).classes.numpy()
    first_rows = np.cumsum([0] + [len(g.questions) for g in data])[:-1]
    right = np.random.default_rng(3).random(classes.size) < 0.7
    predicted = np.where(right, classes, (classes + 1) % data.num_answers)
    predicted[first_rows] = data.answer_vocab.get("yes")
    _plan_predictions(monkeypatch, predicted)
    metrics = evaluate(model, data, batch_groups=5, device=CPU, answer_vocab=data.answer_vocab,
                       templates=data.templates).metrics
    assert metrics["coupling_over_mode"] == 0.0
    assert metrics["mode_consistency"] == metrics["consistency"]
    for name, t in metrics["per_template"].items():
        assert t["yes_rate"] == t["mode_share"] == 1.0, name
        assert t["coupling_over_mode"] in (0.0, None), name


def test_coupling_is_undefined_without_a_right_reasoning_answer(data, model, monkeypatch):
    first_rows = np.cumsum([0] + [len(g.questions) for g in data])[:-1]
    right = np.ones(sum(len(g.questions) for g in data), dtype=bool)
    right[first_rows] = False
    _plan_answers(monkeypatch, right)
    metrics = evaluate(model, data, batch_groups=8, device=CPU, templates=data.templates).metrics
    assert metrics["coupling"] is None and metrics["independent_consistency"] is None
    for t in metrics["per_template"].values():
        assert t["consistency"] is None and t["coupling"] is None
        assert t["independent_consistency"] == t["sub_accuracy"] == 1.0


def test_templates_must_name_every_group(data, model):
    with pytest.raises(ValueError, match="templates has 23 names for 24 groups"):
        evaluate(model, data, batch_groups=8, device=CPU, templates=data.templates[:-1])


@pytest.mark.parametrize("question, kind", [
    ("what colour is the dog?", "colour"), ("is the dog red?", "colour"),
    ("is the cup black?", "colour"), ("What color is the bus?", "colour"),
    ("what size is the dog?", "size"), ("is the dog big?", "size"),
    ("is the  horse small?", "size"), ("is the dog clean?", "state"),
    ("Is the lamp dirty?", "state"), ("is there a dog?", "present"),
    ("can you see a dog?", "present"), ("is there an owl?", "present"),
    ("does the dog need a wash?", "other"), ("is the dog a big red thing?", "other"),
    ("are there both a cat and a dog?", "other"), ("how many dogs are there?", "other"),
    ("is the dog running?", "other"), ("what is the dog?", "other"),
])
def test_question_kind(question, kind):
    assert question_kind(question) == kind


def test_question_kind_accuracy_counts_sub_and_irrelevant_questions(data, model, monkeypatch):
    first_rows = np.cumsum([0] + [len(g.questions) for g in data])[:-1]
    right = np.random.default_rng(3).random(sum(len(g.questions) for g in data)) < 0.5
    right[first_rows] = False  # reasoning rows must not count
    _plan_answers(monkeypatch, right)
    metrics = evaluate(model, data, batch_groups=5, device=CPU).metrics
    totals, hits = Counter(), Counter()
    row = 0
    for group in data:
        for text, ok in zip(group.questions[1:], right[row + 1: row + len(group.questions)]):
            totals[question_kind(text)] += 1
            hits[question_kind(text)] += int(ok)
        row += len(group.questions)
    by_kind = metrics["question_kind_accuracy"]
    # every perception phrasing of the synthetic benchmark is recognised
    assert set(by_kind) == {"colour", "size", "state", "present"}
    assert sum(k["questions"] for k in by_kind.values()) == len(right) - len(data)
    for kind, numbers in by_kind.items():
        assert numbers["questions"] == totals[kind], kind
        assert numbers["accuracy"] == pytest.approx(hits[kind] / totals[kind], abs=1e-12), kind


def _subset(group: Group, rows: Sequence[int], num_sub: int) -> Group:
    """``group`` reduced to its questions ``rows`` (reasoning first, then sub-questions)."""
    pick = lambda values: [values[i] for i in rows]  # noqa: E731
    return dataclasses.replace(
        group, question_ids=pick(group.question_ids), questions=pick(group.questions),
        question_tokens=pick(group.question_tokens), answers=pick(group.answers),
        targets=pick(group.targets), num_sub=num_sub)


def test_wpr_over_range_on_hand_made_groups(data, model, monkeypatch):
    one = [g for g in data if g.num_irrelevant >= 2]
    two = next(g for g in data if g.num_sub >= 2)
    groups = [_subset(g, [0, 1, len(g.questions) - 2, len(g.questions) - 1], 1) for g in one[:3]]
    groups.append(_subset(two, [0, 1, 2, len(two.questions) - 1], 2))
    # reasoning row, then candidates; WPR by hand (docs/metrics.md), range = max - min
    similarity = np.array([
        0.0, 0.7, 0.9, 0.8,   # S below both I: gaps |0.9-0.7|, |0.7-0.8| -> WPR 0.15, range 0.2
        0.3, 0.5, 0.5, 0.5,   # all equal: WPR 0, range 0 -> counts 0
        -0.2, 0.9, 0.1, 0.3,  # ranked right: WPR 0, range 0.8
        0.1, 0.6, 0.2, 0.4,   # S, S, I: I between the subs -> WPR 0.2, range 0.4
    ], dtype=np.float32)
    position = [0]

    def planned(grad, joint, offsets):
        n = int(offsets[-1])
        position[0] += n
        return torch.from_numpy(similarity[position[0] - n:position[0]])

    monkeypatch.setattr(evaluation, "gradcam_similarity", planned)
    metrics = evaluate(model, groups, batch_groups=3, device=CPU).metrics
    assert metrics["wpr"] == pytest.approx((0.15 + 0.2) / 4, abs=1e-6)
    assert metrics["wpr_over_range"] == pytest.approx((0.15 / 0.2 + 0.2 / 0.4) / 4, abs=1e-6)
    assert metrics["similarity_group_range_mean"] == pytest.approx((0.2 + 0.8 + 0.4) / 4,
                                                                   abs=1e-6)
    subs, irrelevant = similarity[[1, 5, 9, 13, 14]], similarity[[2, 3, 6, 7, 10, 11, 15]]
    assert metrics["similarity_sub_std"] == pytest.approx(float(subs.std()), abs=1e-6)
    assert metrics["similarity_irrelevant_std"] == pytest.approx(float(irrelevant.std()),
                                                                 abs=1e-6)


def test_legacy_metrics_are_unchanged_by_templates(data, model):
    kw = dict(batch_groups=8, device=CPU, answer_vocab=data.answer_vocab)
    plain = evaluate(model, data, **kw).metrics
    broken_down = evaluate(model, data, templates=data.templates, **kw).metrics
    assert set(LEGACY_KEYS) <= set(plain)
    assert set(plain) - set(LEGACY_KEYS) == {
        "question_kind_accuracy", "similarity_sub_std", "similarity_irrelevant_std",
        "similarity_group_range_mean", "wpr_over_range"}
    assert set(broken_down) - set(plain) == {"per_template", "independent_consistency",
                                             "coupling", "mode_consistency",
                                             "coupling_over_mode", "prior_agreement"}
    for key, value in plain.items():
        assert broken_down[key] == value, key
    assert all(isinstance(plain[k], int) for k in ("groups", "misranked_groups", "pairs"))
    assert all(isinstance(plain[k], float) for k in ("mp1", "mrr", "wpr", "wpr_over_range"))
