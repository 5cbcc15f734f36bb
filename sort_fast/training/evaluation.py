"""The evaluation used by both ``sort_fast.train`` and ``sort_fast.evaluate`` (docs/metrics.md).

On the validation groups: consistency quadrants and per-role accuracy (pooled
:class:`~sort_fast.metrics.ConsistencyMeter`), ranking metrics of the Grad-CAM similarities at
the joint embedding for the ground-truth classes, and visual grounding (Spearman rho between
the reasoning question's region Grad-CAM and the grounding truth, or VQA-HAT maps).
Breakdowns: accuracy per kind of perception question, the spread of the Grad-CAM cosines and,
given each group's reasoning template, per-template consistency and its coupling (how much more
consistent the model is than its sub-question accuracy alone predicts).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import spearmanr

from ..data import Group, Vocab, collate_groups, load_hat_maps, regions_to_map
from ..data.synthetic import COLOURS, SIZES, STATES
from ..errors import CLIError
from ..layout import ROLE_IRRELEVANT, ROLE_REASONING, ROLE_SUB, candidate_layout, row_roles
from ..metrics import ConsistencyMeter, ranking_metrics_packed
from ..models import VQAModel
from ..ops.contrastive_loss import gradcam_similarity
from .eval_result import EvalResult, Example
from .objective import gradcam_gradient
from .prior_metrics import prior_agreement, prior_breakdown

__all__ = ["evaluate", "question_kind", "QUESTION_KINDS", "load_hat"]

HAT_SIZE = 14


def _any_of(words: Sequence[str]) -> str:
    return "(?:" + "|".join(map(re.escape, words)) + ")"


# Kinds of perception question, recognised by the phrasings of the synthetic benchmark
# ("what colour is the dog?", "is the dog red?", "what size is the dog?", "is the dog big?",
# "is the dog clean?", "is there a dog?", "can you see a dog?"); anything else is "other".
_KIND_PATTERNS: Tuple[Tuple[str, "re.Pattern[str]"], ...] = (
    ("colour", re.compile(rf"^what colou?r is\b|^is the .+ {_any_of(COLOURS)}\?$")),
    ("size", re.compile(rf"^what size is\b|^is the .+ {_any_of(SIZES)}\?$")),
    ("state", re.compile(rf"^is the .+ {_any_of(STATES)}\?$")),
    ("present", re.compile(r"^(?:is there|can you see) an? \S")),
)
QUESTION_KINDS: Tuple[str, ...] = (*(kind for kind, _ in _KIND_PATTERNS), "other")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; 0 when either side is constant (rho is undefined there)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def question_kind(question: str) -> str:
    """The kind of a perception question: ``"colour"``, ``"size"``, ``"state"`` (clean or
    dirty), ``"present"`` (is there / can you see) or ``"other"`` (case and spacing ignored)."""
    text = " ".join(question.lower().split())
    return next((kind for kind, pattern in _KIND_PATTERNS if pattern.search(text)), "other")


def _question_kind_accuracy(questions: Sequence[str], correct: np.ndarray
                            ) -> Dict[str, Dict[str, Any]]:
    """``{kind: {"accuracy", "questions"}}`` over ``questions`` (texts) and whether each was
    answered correctly, for the kinds present; each distinct text is parsed once."""
    texts, inverse = np.unique(np.asarray(questions, dtype=str), return_inverse=True)
    kind_of_text = np.array([QUESTION_KINDS.index(question_kind(t)) for t in texts],
                            dtype=np.int64)
    kinds = kind_of_text[inverse.reshape(-1)]
    total = np.bincount(kinds, minlength=len(QUESTION_KINDS))
    right = np.bincount(kinds, weights=correct, minlength=len(QUESTION_KINDS))
    return {kind: {"accuracy": float(right[k] / total[k]), "questions": int(total[k])}
            for k, kind in enumerate(QUESTION_KINDS) if total[k]}


def _similarity_spread(similarity: torch.Tensor, roles: np.ndarray, offsets: torch.Tensor,
                       num_sub: torch.Tensor, group_wpr: np.ndarray) -> Dict[str, Any]:
    """Spread of the Grad-CAM cosines ``similarity [T]``: their standard deviation over the
    sub-questions and over the irrelevant questions (None without any), the mean over groups of
    the range (max - min) of the group's candidate cosines (sub-questions and irrelevant
    questions, as ranked), and the mean over groups of ``group_wpr [N]`` divided by that range
    (0 for a group whose range is 0): a WPR that does not shrink with the cosines' scale."""
    sim = similarity.numpy().astype(np.float64)
    rows, _, candidate_offsets = candidate_layout(offsets, num_sub, sim.size)
    candidates, starts = sim[rows.numpy()], candidate_offsets[:-1].numpy()
    spread = np.maximum.reduceat(candidates, starts) - np.minimum.reduceat(candidates, starts)
    scaled = np.divide(group_wpr, spread, out=np.zeros_like(spread), where=spread > 0)
    sub, irrelevant = sim[roles == ROLE_SUB], sim[roles == ROLE_IRRELEVANT]
    return {
        "similarity_sub_std": float(sub.std()) if sub.size else None,
        "similarity_irrelevant_std": float(irrelevant.std()) if irrelevant.size else None,
        "similarity_group_range_mean": float(spread.mean()),
        "wpr_over_range": float(scaled.mean()),
    }


def _template_breakdown(templates: Sequence[str], roles: np.ndarray, correct: np.ndarray,
                        predicted: np.ndarray, truth: np.ndarray, offsets: torch.Tensor,
                        yes: Optional[int]) -> Dict[str, Any]:
    """``per_template``, ``independent_consistency``, ``coupling``, ``mode_consistency`` and
    ``coupling_over_mode`` (see :func:`evaluate`) from the template name of every group, the row
    ``roles [T]``, ``correct [T]``, ``predicted [T]`` and ground-truth ``truth [T]`` classes (-1
    where no answer can be right), the packed ``offsets [N+1]`` and the class of "yes" (or
    None)."""
    names, template = np.unique(np.asarray(templates, dtype=str), return_inverse=True)
    template = template.reshape(-1)

    def per_template(index: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
        return np.bincount(index, weights=weights, minlength=names.size)

    first = offsets[:-1].numpy()
    group = np.repeat(np.arange(first.size), np.diff(offsets.numpy()))
    sub = roles == ROLE_SUB
    reasoning_right, answer = correct[first], predicted[first]
    # every sub-question makes one <reasoning, sub-question> pair with its group's reasoning row
    pair_template, pair_r, pair_s = template[group[sub]], reasoning_right[group[sub]], correct[sub]
    groups = per_template(template)
    r_pairs = per_template(pair_template, pair_r)
    rs_pairs = per_template(pair_template, pair_r & pair_s)
    # were reasoning and sub-question correctness independent within a template, its consistency
    # P(S right | R right) would be P(S right) over its pairs: its sub-question accuracy
    sub_accuracy = per_template(pair_template, pair_s) / per_template(pair_template)
    reasoning_accuracy = per_template(template, reasoning_right) / groups
    yes_rate = None if yes is None else per_template(template, answer == yes) / groups
    width = int(answer.max()) + 1
    answers = np.bincount(template * width + answer, minlength=names.size * width).reshape(
        names.size, width)
    mode_share = answers.max(1) / groups
    # the answer-bias baseline: every reasoning question of a template answered with the model's
    # most frequent answer for it, the sub-question answers kept
    mode_right = answers.argmax(1)[template] == truth[first]
    pair_mode_r = mode_right[group[sub]]
    mode_r_pairs = per_template(pair_template, pair_mode_r)
    mode_rs_pairs = per_template(pair_template, pair_mode_r & pair_s)
    breakdown: Dict[str, Dict[str, Any]] = {}
    for t, name in enumerate(names.tolist()):
        consistency = float(rs_pairs[t] / r_pairs[t]) if r_pairs[t] else None
        mode = float(mode_rs_pairs[t] / mode_r_pairs[t]) if mode_r_pairs[t] else None
        breakdown[name] = {
            "groups": int(groups[t]),
            "reasoning_accuracy": float(reasoning_accuracy[t]),
            "sub_accuracy": float(sub_accuracy[t]),
            "consistency": consistency,
            "independent_consistency": float(sub_accuracy[t]),
            "coupling": None if consistency is None else consistency - float(sub_accuracy[t]),
            "yes_rate": None if yes_rate is None else float(yes_rate[t]),
            "mode_share": float(mode_share[t]),
            "mode_consistency": mode,
            "coupling_over_mode": None if consistency is None or mode is None
            else consistency - mode,
        }
    # globally: the per-template expectations under independence, weighted by each template's
    # share of the pairs with a right reasoning answer (the pairs consistency is taken over)
    r_total, mode_total = r_pairs.sum(), mode_r_pairs.sum()
    consistency = float(rs_pairs.sum() / r_total) if r_total else None
    expected = float((r_pairs / r_total) @ sub_accuracy) if r_total else None
    mode = float(mode_rs_pairs.sum() / mode_total) if mode_total else None
    return {
        "per_template": breakdown,
        "independent_consistency": expected,
        "coupling": None if expected is None else consistency - expected,
        "mode_consistency": mode,
        "coupling_over_mode": None if consistency is None or mode is None
        else consistency - mode,
    }


@torch.no_grad()
def evaluate(model: VQAModel, groups: Sequence[Group], *, batch_groups: int,
             device: torch.device, naive: bool = False, answer_vocab: Optional[Vocab] = None,
             hat_maps: Optional[Mapping[int, np.ndarray]] = None,
             num_examples: int = 4, templates: Optional[Sequence[str]] = None) -> EvalResult:
    """Evaluates ``model`` (in eval mode; its mode is restored) on ``groups``.

    Grad-CAM gradients come from :func:`~sort_fast.training.objective.gradcam_gradient`
    (``naive`` as in training) without ``create_graph``. Grounding: with ``hat_maps``
    (``{question id: [14, 14]}``) the reasoning question's region Grad-CAM is painted onto a
    14x14 grid (``regions_to_map``) and compared with its VQA-HAT map; otherwise with the
    group's region ``grounding`` where known. Constant maps count as rho = 0. The region
    Grad-CAM is signed (no ReLU), so regions that lower the answer's score rank last.

    Besides the metrics of docs/metrics.md:

    - ``question_kind_accuracy``: ``{kind: {"accuracy", "questions"}}`` over the sub-questions
      and irrelevant questions together, by :func:`question_kind` of their text.
    - ``similarity_sub_std``, ``similarity_irrelevant_std``: standard deviation of the Grad-CAM
      cosines of all sub-questions / irrelevant questions (None without any);
      ``similarity_group_range_mean``: mean over groups of the range (max - min) of the cosines
      of the group's candidates (its sub-questions and irrelevant questions);
      ``wpr_over_range``: mean over groups of the group's WPR divided by that range (0 where the
      range is 0), a WPR that does not shrink when the cosines crowd together.
    - With ``templates`` (the reasoning template of each group, in the order of ``groups``):
      ``per_template``, ``{name: {...}}`` in name order, with the template's ``groups``,
      ``reasoning_accuracy``, ``sub_accuracy``, ``consistency`` (pooled over its pairs; None if
      no reasoning answer of the template is right), ``independent_consistency`` (the
      consistency expected were reasoning and sub-question correctness independent within the
      template: the fraction of its pairs whose sub-question is right, i.e. its
      ``sub_accuracy``), ``coupling = consistency - independent_consistency`` (None with
      consistency), ``yes_rate`` (fraction of its reasoning questions predicted "yes"; None
      without ``answer_vocab`` or a "yes" in it) and ``mode_share`` (fraction of its reasoning
      questions predicted as its most frequent predicted answer). Globally
      ``independent_consistency = sum_t (R-right pairs of t / all R-right pairs) *
      independent_consistency_t`` and ``coupling = consistency - independent_consistency``:
      consistency beyond what per-template sub-question accuracy predicts under independence
      (both None when no pair has a right reasoning answer). Answer bias alone can make this
      positive (a constant "yes" is right on a reasoning question exactly when the facts its
      yes/no sub-questions ask about hold), so also ``mode_consistency``: the consistency of the
      model's sub-question answers paired with every reasoning question of a template answered
      with the model's most frequent answer for that template, and ``coupling_over_mode =
      consistency - mode_consistency`` (globally and per template): 0 for a model whose
      reasoning answers are its template's mode, positive where reasoning answers follow what
      the model perceives beyond its answer bias.
    - With ``templates`` and ``groups`` carrying ``train_prior`` (``{template: P(yes)}`` of the
      training split, as the synthetic benchmark's do) where some group's template has a prior:
      ``prior_agreement``, reasoning accuracy and consistency on the prior-agreeing and
      prior-conflicting groups and their ``shortcut_gap``
      (:func:`~sort_fast.training.prior_metrics.prior_breakdown`).
    """
    if templates is not None and len(templates) != len(groups):
        raise ValueError(f"templates has {len(templates)} names for {len(groups)} groups")
    was_training = model.training
    model.eval()
    meter = ConsistencyMeter()
    sims: List[torch.Tensor] = []
    roles: List[torch.Tensor] = []
    sizes: List[torch.Tensor] = []
    num_subs: List[torch.Tensor] = []
    corrects: List[torch.Tensor] = []
    preds: List[torch.Tensor] = []
    truths: List[torch.Tensor] = []
    rhos: List[float] = []
    examples: List[Example] = []
    try:
        for start in range(0, len(groups), batch_groups):
            chunk = [groups[i] for i in range(start, min(start + batch_groups, len(groups)))]
            batch = collate_groups(chunk).to(device)
            with torch.enable_grad():
                out = model(batch, scores=naive)  # head_gradcam computes the scores
                scores, grad = gradcam_gradient(model, out, batch.classes, naive,
                                                create_graph=False)
            sim = gradcam_similarity(grad.detach(), out.joint.detach(), batch.offsets)
            pred = scores.argmax(1)
            # a question none of whose answers is in the answer vocabulary (all-zero targets,
            # class 0 by convention) cannot be answered correctly
            correct = (pred == batch.classes) & (batch.targets.amax(1) > 0)
            meter.update_packed(correct, batch.offsets, batch.num_sub,
                                batch.targets.gather(1, pred[:, None]).squeeze(1))
            size = batch.offsets[1:] - batch.offsets[:-1]
            role = row_roles(batch.offsets, batch.num_sub, size)
            sims.append(sim.float().cpu())
            roles.append(role.cpu())
            sizes.append(size.cpu())
            num_subs.append(batch.num_sub.cpu())
            corrects.append(correct.cpu())
            preds.append(pred.cpu())
            truths.append(torch.where(batch.targets.amax(1) > 0, batch.classes, -1).cpu())

            cam = model.region_gradcam(batch, batch.classes).float().cpu().numpy()
            first = batch.offsets[:-1].cpu().numpy()
            image = batch.image_index.cpu().numpy()
            mask = batch.image_mask.cpu().numpy()
            boxes = batch.image_boxes.cpu().numpy()
            truth = batch.grounding.cpu().numpy()
            known = batch.has_grounding.cpu().numpy()
            for g, row in enumerate(first):
                valid = mask[image[row]]
                if hat_maps is not None:
                    qid = batch.question_ids[row]
                    human = hat_maps.get(int(qid)) if qid.isdigit() else None
                    if human is not None:
                        model_map = regions_to_map(cam[row, valid], boxes[image[row], valid],
                                                   size=HAT_SIZE)
                        rhos.append(_spearman(model_map.ravel(), human.ravel()))
                elif known[g]:
                    rhos.append(_spearman(cam[row, valid], truth[g, valid]))
                if len(examples) < num_examples:
                    rows = slice(int(row), int(row + size[g]))
                    answers = pred[rows].tolist()
                    examples.append(Example(
                        questions=list(chunk[g].questions), roles=role[rows].cpu().numpy(),
                        similarity=sim[rows].float().cpu().numpy(),
                        predicted=[answer_vocab.tokens[a] if answer_vocab else str(a)
                                   for a in answers],
                        correct=correct[rows].cpu().numpy(), cam=cam[row, valid],
                        boxes=boxes[image[row], valid],
                        grounding=truth[g, valid] if known[g] else None))
    finally:
        model.train(was_training)

    similarity, role_all, num_sub = torch.cat(sims), torch.cat(roles), torch.cat(num_subs)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(sizes).cumsum(0)])
    metrics: Dict[str, Any] = dict(meter.compute())
    ranking = ranking_metrics_packed(similarity, offsets, num_sub, per_group=True)
    group_wpr = ranking.pop("per_group")["wpr"]
    metrics.update({k: float(v) if k not in ("groups", "misranked_groups") else int(v)
                    for k, v in ranking.items()})
    metrics["similarity_sub_mean"] = float(similarity[role_all == ROLE_SUB].mean())
    metrics["similarity_irrelevant_mean"] = (
        float(similarity[role_all == ROLE_IRRELEVANT].mean())
        if bool((role_all == ROLE_IRRELEVANT).any()) else None)
    metrics["grounding_spearman"] = float(np.mean(rhos)) if rhos else None
    metrics["grounding_questions"] = len(rhos)
    metrics["grounding_source"] = "vqa-hat" if hat_maps is not None else "regions"

    role_np, correct_np = role_all.numpy(), torch.cat(corrects).numpy()
    metrics["question_kind_accuracy"] = _question_kind_accuracy(
        [q for g in groups for q in g.questions[1:]], correct_np[role_np != ROLE_REASONING])
    metrics.update(_similarity_spread(similarity, role_np, offsets, num_sub, group_wpr))
    if templates is not None:
        metrics.update(_template_breakdown(
            templates, role_np, correct_np, torch.cat(preds).numpy(),
            torch.cat(truths).numpy(), offsets,
            answer_vocab.get("yes") if answer_vocab is not None else None))
        agreement = prior_agreement(templates, [g.answers[0] for g in groups],
                                    getattr(groups, "train_prior", {}))
        if agreement.any():
            metrics["prior_agreement"] = prior_breakdown(
                agreement, correct_np[role_np == ROLE_REASONING], correct_np[role_np == ROLE_SUB],
                num_sub.numpy())
    return EvalResult(metrics, similarity.numpy(), role_all.numpy(), examples)


def load_hat(directory: Optional[str], groups: Sequence[Group]
             ) -> Optional[Dict[int, np.ndarray]]:
    """VQA-HAT maps of the reasoning questions of ``groups`` (``None`` without a directory)."""
    if directory is None:
        return None
    wanted = {int(g.question_ids[0]) for g in groups if g.question_ids[0].isdigit()}
    try:
        maps = load_hat_maps(directory, size=HAT_SIZE, question_ids=wanted)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not maps:
        raise CLIError(f"{directory}: no VQA-HAT map matches a validation reasoning question")
    return maps
