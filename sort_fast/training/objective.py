"""Training objectives: the Grad-CAM gradient, SQuINT's attention alignment and the losses of
``--loss bce|squint|sort-sq|sort|role-bce``."""
from __future__ import annotations

from dataclasses import fields
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..data import PackedBatch
from ..layout import ROLE_IRRELEVANT, ROLE_REASONING, ROLE_SUB, check_layout, group_ids, row_roles
from ..losses import SOrTLoss, masked_mean, role_bce, row_mask
from ..models import VQAModel, VQAOutput
from ..ops.head_gradcam import head_gradcam

__all__ = ["gradcam_gradient", "attention_alignment", "Objective"]


def gradcam_gradient(model: VQAModel, out: VQAOutput, classes: torch.Tensor, naive: bool,
                     *, create_graph: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[T, A]`` and the Grad-CAM gradient ``d scores[t, classes[t]] / d joint[t]``
    ``[T, D]`` of ``model``'s forward output ``out``: the one place the trainer and the
    evaluator get Grad-CAM gradients from.

    ``naive=False`` (the default path): the closed form
    :func:`sort_fast.ops.head_gradcam.head_gradcam` of the model's classifier head (its scores
    are the classifier's on ``out.joint``; in training they carry the very dropout mask the
    gradient does), so ``out`` need not carry scores (``model(batch, scores=False)``).
    ``naive=True`` (``--autograd-reference``), and a model whose ``classifier`` is ``None``
    (its scores depend on more than ``joint``): ``torch.autograd.grad`` of ``out.scores``.
    ``create_graph=False`` (evaluation) returns tensors without a graph; the
    autograd path then needs ``out`` built with grad enabled.
    """
    if naive or model.classifier is None:
        y = out.scores.gather(1, classes[:, None]).sum()
        (grad,) = torch.autograd.grad(y, out.joint, create_graph=create_graph)
        return (out.scores, grad) if create_graph else (out.scores.detach(), grad)
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        return head_gradcam(model.classifier, out.joint, classes)


def attention_alignment(attention: torch.Tensor, offsets: torch.Tensor,
                        num_sub: torch.Tensor,
                        group_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SQuINT's attention alignment (Selvaraju et al. 2020): the squared difference between
    the region attention of each sub-question and of its reasoning question, summed over
    regions and averaged over ``<reasoning, sub-question>`` pairs (mean squared error up to the
    constant number of regions). ``attention [T, R]`` (or ``[T, G, R]`` with several glimpses,
    summed over both) is 0 on padded regions. ``group_mask [N]`` bool: only the pairs of the
    groups it keeps count."""
    sizes = offsets[1:] - offsets[:-1]
    is_sub = row_roles(offsets, num_sub, sizes, num_rows=attention.shape[0]) == ROLE_SUB
    if torch.compiler.is_compiling():
        sub = is_sub.nonzero().squeeze(1)
    else:  # the number of sub-question rows is known on the host: no device read
        count = check_layout(offsets, num_sub, attention.shape[0]).num_sub_rows
        sub = torch.nonzero_static(is_sub, size=count).squeeze(1)
    sub_group = group_ids(sizes, attention.shape[0])[sub]
    per_pair = (attention[sub] - attention[offsets[:-1][sub_group]]).square().flatten(1).sum(1)
    if group_mask is None:
        return per_pair.mean()
    return masked_mean(per_pair, group_mask[sub_group].to(per_pair.dtype))


class Objective:
    """The training loss of one ``--loss`` choice.

    - ``bce``: BCE-with-logits against the soft targets, summed over answers, averaged over all
      questions (the plain Pythia objective);
    - ``squint``: that BCE ``+ lambda_attention *`` :func:`attention_alignment`;
    - ``sort-sq`` / ``sort``: :class:`~sort_fast.SOrTLoss` in mode ``sq_only`` / ``contrastive``
      on the Grad-CAM vectors at the joint embedding (:func:`gradcam_gradient`);
    - ``role-bce``: SOrT's BCE terms alone, ``λ1·BCE(reasoning) + λ2·BCE(sub) +
      λ3·BCE(irrelevant)`` with a mean per role (:func:`~sort_fast.losses.role_bce`) and no
      Grad-CAM term: the control that separates SOrT's contrastive term from its re-weighting
      of the questions.

    ``naive`` (the trainer's ``--autograd-reference``) selects the autograd Grad-CAM path and
    the loss's PyTorch backend. ``model`` is any :class:`~sort_fast.models.VQAModel`; SQuINT
    needs one with region attention.
    """

    def __init__(self, kind: str, *, lambda_reasoning: float, lambda_sub: float,
                 lambda_irrelevant: float, margin: float, lambda_attention: float,
                 naive: bool) -> None:
        self.kind, self.naive, self.lambda_attention = kind, naive, lambda_attention
        self.role_weights = (lambda_reasoning, lambda_sub, lambda_irrelevant)
        self.sort_loss = None
        if kind in ("sort", "sort-sq"):
            self.sort_loss = SOrTLoss(lambda_reasoning, lambda_sub, lambda_irrelevant, margin,
                                      mode="contrastive" if kind == "sort" else "sq_only",
                                      backend="torch" if naive else "auto")

    def __call__(self, model: VQAModel, batch: PackedBatch
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of ``batch`` (with its graph) and its parts, detached 0-d tensors on the
        loss's device (read them in batches: each read is a host sync on a GPU)."""
        # the closed-form Grad-CAM computes the classifier's scores itself
        out = model(batch, scores=self.sort_loss is None or self.naive)
        if self.sort_loss is not None:
            # under DistributedDataParallel the classifier is the wrapped module's
            inner = model.module if isinstance(model, DistributedDataParallel) else model
            scores, grad = gradcam_gradient(inner, out, batch.classes, self.naive)
            parts = self.sort_loss(scores, batch.targets, grad, out.joint, batch.offsets,
                                   batch.num_sub, group_mask=batch.group_valid)
            return parts.total, {"loss": parts.total.detach(),
                                 **{f.name: getattr(parts, f.name).detach()
                                    for f in fields(parts) if f.name != "total"}}
        if self.kind == "role-bce":
            per_role = role_bce(out.scores, batch.targets, batch.offsets, batch.num_sub,
                                batch.group_valid)
            weighted = per_role * per_role.new_tensor(self.role_weights)
            total = weighted.sum()
            return total, {"loss": total.detach(),
                           "bce_reasoning": per_role[ROLE_REASONING].detach(),
                           "bce_sub": per_role[ROLE_SUB].detach(),
                           "bce_irrelevant": per_role[ROLE_IRRELEVANT].detach()}
        per_row = F.binary_cross_entropy_with_logits(out.scores.float(), batch.targets,
                                                     reduction="none").sum(1)
        bce = per_row.mean() if batch.group_valid is None else masked_mean(
            per_row, row_mask(batch.group_valid, batch.offsets, per_row.shape[0], per_row.dtype))
        if self.kind == "bce":
            return bce, {"loss": bce.detach(), "bce": bce.detach()}
        if out.attention is None:
            raise ValueError(f"--loss squint aligns region attention, which "
                             f"{type(model).__name__} does not give")
        align = attention_alignment(out.attention.float(), batch.offsets, batch.num_sub,
                                    batch.group_valid)
        total = bce + self.lambda_attention * align
        return total, {"loss": total.detach(), "bce": bce.detach(), "attention": align.detach()}
