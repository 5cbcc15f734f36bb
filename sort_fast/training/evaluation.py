"""The evaluation used by both ``sort_fast.train`` and ``sort_fast.evaluate`` (docs/metrics.md).

On the validation groups: consistency quadrants and per-role accuracy (pooled
:class:`~sort_fast.metrics.ConsistencyMeter`), ranking metrics of the Grad-CAM similarities at
the joint embedding for the ground-truth classes, and visual grounding (Spearman rho between
the reasoning question's region Grad-CAM and the grounding truth, or VQA-HAT maps).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from ..data import Group, Vocab, collate_groups, load_hat_maps, regions_to_map
from ..layout import ROLE_IRRELEVANT, ROLE_SUB, row_roles
from ..metrics import ConsistencyMeter, ranking_metrics_packed
from ..models import PythiaVQA
from ..ops.contrastive_loss import gradcam_similarity
from .checkpoint import atomic_write
from .config import CLIError
from .objective import gradcam_gradient

__all__ = ["Example", "EvalResult", "evaluate", "load_hat", "format_metric", "format_table",
           "write_report"]

HAT_SIZE = 14


@dataclass
class Example:
    """One validation group for the plots: its questions (reasoning first), roles, Grad-CAM
    similarities, predicted answers and whether they are right, the reasoning question's region
    Grad-CAM ``cam [R]``, region ``boxes [R, 4]`` and grounding truth (``None`` if unknown)."""

    questions: List[str]
    roles: np.ndarray
    similarity: np.ndarray
    predicted: List[str]
    correct: np.ndarray
    cam: np.ndarray
    boxes: np.ndarray
    grounding: Optional[np.ndarray]


@dataclass
class EvalResult:
    """``metrics`` (JSON-ready), Grad-CAM ``similarity [T]`` and ``roles [T]`` of every
    validation question, and a few :class:`Example` groups."""

    metrics: Dict[str, Any]
    similarity: np.ndarray
    roles: np.ndarray
    examples: List[Example] = field(default_factory=list)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; 0 when either side is constant (rho is undefined there)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


@torch.no_grad()
def evaluate(model: PythiaVQA, groups: Sequence[Group], *, batch_groups: int,
             device: torch.device, naive: bool = False, answer_vocab: Optional[Vocab] = None,
             hat_maps: Optional[Mapping[int, np.ndarray]] = None,
             num_examples: int = 4) -> EvalResult:
    """Evaluates ``model`` (in eval mode; its mode is restored) on ``groups``.

    Grad-CAM gradients come from :func:`~sort_fast.training.objective.gradcam_gradient`
    (``naive`` as in training) without ``create_graph``. Grounding: with ``hat_maps``
    (``{question id: [14, 14]}``) the reasoning question's region Grad-CAM is painted onto a
    14x14 grid (``regions_to_map``) and compared with its VQA-HAT map; otherwise with the
    group's region ``grounding`` where known. Constant maps count as rho = 0. The region
    Grad-CAM is signed (no ReLU), so regions that lower the answer's score rank last.
    """
    was_training = model.training
    model.eval()
    meter = ConsistencyMeter()
    sims: List[torch.Tensor] = []
    roles: List[torch.Tensor] = []
    sizes: List[torch.Tensor] = []
    num_subs: List[torch.Tensor] = []
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

    similarity, role_all = torch.cat(sims), torch.cat(roles)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(sizes).cumsum(0)])
    metrics: Dict[str, Any] = dict(meter.compute())
    ranking = ranking_metrics_packed(similarity, offsets, torch.cat(num_subs))
    metrics.update({k: float(v) if k not in ("groups", "misranked_groups") else int(v)
                    for k, v in ranking.items()})
    metrics["similarity_sub_mean"] = float(similarity[role_all == ROLE_SUB].mean())
    metrics["similarity_irrelevant_mean"] = (
        float(similarity[role_all == ROLE_IRRELEVANT].mean())
        if bool((role_all == ROLE_IRRELEVANT).any()) else None)
    metrics["grounding_spearman"] = float(np.mean(rhos)) if rhos else None
    metrics["grounding_questions"] = len(rhos)
    metrics["grounding_source"] = "vqa-hat" if hat_maps is not None else "regions"
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


# (header, metrics key, scale, arrow) in the column order of the paper's Table 1
COLUMNS = (
    ("R✓S✓", "r_right_s_right", 100, "↑"), ("R✓S✗", "r_right_s_wrong", 100, "↓"),
    ("R✗S✓", "r_wrong_s_right", 100, "↓"), ("R✗S✗", "r_wrong_s_wrong", 100, "↓"),
    ("Consistency%", "consistency", 100, "↑"), ("Reas. Accuracy%", "reasoning_accuracy", 100, "↑"),
    ("VQA Accuracy%", "vqa_accuracy", 100, "↑"), ("MP@1", "mp1", 100, "↑"),
    ("Ranking Accuracy", "ranking_accuracy", 100, "↑"), ("MRR", "mrr", 100, "↑"),
    ("WPR", "wpr", 100, "↓"), ("Grounding ρ", "grounding_spearman", 1, "↑"),
)


def format_metric(value: float, scale: float, sign: str = "") -> str:
    """One cell of Table 1: a fraction as a percentage (``scale`` 100) with 2 decimals, an
    unscaled value (grounding's rho) with 3; ``sign="+"`` prints the sign of a difference."""
    return f"{value * scale:{sign}.2f}" if scale != 1 else f"{value:{sign}.3f}"


def format_table(metrics: Mapping[str, Any], method: str) -> str:
    """A Markdown table in the layout of the paper's Table 1 (fractions as percentages, WPR
    ×100 as in the paper; grounding as Spearman's rho)."""
    header = "| Method | " + " | ".join(f"{h} {a}" for h, _, _, a in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    cells = []
    for _, key, scale, _ in COLUMNS:
        value = metrics.get(key)
        cells.append("–" if value is None else format_metric(value, scale))
    return "\n".join([header, rule, f"| {method} | " + " | ".join(cells) + " |"])


def write_report(result: EvalResult, out_dir: Path, *, method: str,
                 extra: Optional[Dict[str, Any]] = None) -> str:
    """Writes ``metrics.json``, ``table1.md`` and the plots into ``out_dir``; returns the
    table. ``extra`` (e.g. the step) is stored in ``metrics.json`` beside the metrics."""
    from .plots import plot_all  # matplotlib is imported only when a report is written

    out_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(result.metrics, method)
    payload = {"method": method, **(extra or {}), "metrics": result.metrics}
    atomic_write(out_dir / "metrics.json",
                 lambda f: f.write(json.dumps(payload, indent=2).encode() + b"\n"))
    atomic_write(out_dir / "table1.md", lambda f: f.write(
        (f"Validation metrics ({result.metrics['groups']} groups, "
         f"{result.metrics['pairs']} <reasoning, sub-question> pairs)\n\n{table}\n").encode()))
    plot_all(result, out_dir, method)
    return table
