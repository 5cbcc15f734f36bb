"""The total SOrT loss (docs/math.md, paper Eq. 3) as a drop-in ``nn.Module``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layout import ROLE_IRRELEVANT, ROLE_REASONING, ROLE_SUB, group_ids, row_roles
from .ops.contrastive_loss import (
    BACKENDS,
    MODES,
    GradCAMSource,
    check_number,
    contrastive_gradient_loss,
    counted_groups,
    gradcam_inputs,
)

__all__ = ["SOrTLoss", "SOrTLossOutput", "role_bce", "masked_mean", "row_mask"]


@dataclass
class SOrTLossOutput:
    """The total loss and its parts (all scalars; ``total`` carries the graph)."""

    total: torch.Tensor
    contrastive: torch.Tensor
    bce_reasoning: torch.Tensor
    bce_sub: torch.Tensor
    bce_irrelevant: torch.Tensor


def row_mask(group_mask: torch.Tensor, offsets: torch.Tensor, num_rows: int,
             dtype: torch.dtype) -> torch.Tensor:
    """``[T]`` 1 for the rows of the groups ``group_mask [N]`` keeps, 0 for the others."""
    return group_mask[group_ids(offsets[1:] - offsets[:-1], num_rows)].to(dtype)


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the ``values [K]`` whose ``keep [K]`` (0/1, their dtype) is 1; 0 when none is
    (no host sync). The others get a zero gradient."""
    return (values * keep).sum() / keep.sum().clamp_min(1)


def role_bce(scores: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor,
             num_sub: torch.Tensor, group_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE-with-logits against soft targets per role, ``[3]`` (reasoning, sub, irrelevant).

    As in Pythia, each question's BCE is summed over answers; a role's value is the mean over
    its questions (0 for a role without questions). ``scores``/``targets``: ``[T, A]``.
    ``group_mask [N]`` bool: only the questions of the groups it keeps count (a batch padded
    to a static shape).
    """
    dtype = torch.promote_types(scores.dtype, torch.float32)  # at least float32 under autocast
    per_row = F.binary_cross_entropy_with_logits(
        scores.to(dtype), targets.to(dtype), reduction="none").sum(1)
    roles = row_roles(offsets, num_sub, offsets[1:] - offsets[:-1], num_rows=per_row.shape[0])
    if group_mask is None:
        weight = torch.ones_like(per_row)
    else:
        weight = row_mask(group_mask, offsets, per_row.shape[0], per_row.dtype)
        per_row = per_row * weight
    sums = per_row.new_zeros(3).index_add_(0, roles, per_row)
    counts = per_row.new_zeros(3).index_add_(0, roles, weight)  # no host sync
    return sums / counts.clamp_min(1)


class SOrTLoss(nn.Module):
    """``L = L_CG + λ1·BCE(reasoning) + λ2·BCE(sub) + λ3·BCE(irrelevant)`` (paper Eq. 3).

    Defaults are the paper's best ``λ1 = λ2 = 2.27, λ3 = 0.0003`` and margin 0. ``mode`` is
    ``"contrastive"`` (sub-questions and irrelevant questions) or ``"sq_only"`` (the paper's
    SOrT-with-only-SQ ablation). Works under ``torch.autocast``; inputs are never modified.
    """

    def __init__(self, lambda_reasoning: float = 2.27, lambda_sub: float = 2.27,
                 lambda_irrelevant: float = 3e-4, margin: float = 0.0,
                 mode: str = "contrastive", eps: float = 1e-8, backend: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, value in (("lambda_reasoning", lambda_reasoning), ("lambda_sub", lambda_sub),
                            ("lambda_irrelevant", lambda_irrelevant)):
            check_number(name, value, non_negative=True)
        check_number("margin", margin)
        check_number("eps", eps, positive=True)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.lambdas = (float(lambda_reasoning), float(lambda_sub), float(lambda_irrelevant))
        self.margin, self.mode, self.eps, self.backend = margin, mode, eps, backend

    def forward(self, scores: torch.Tensor, targets: torch.Tensor, grad: GradCAMSource,
                act: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None,
                num_sub: Optional[torch.Tensor] = None, *,
                group_mask: Optional[torch.Tensor] = None) -> SOrTLossOutput:
        """Args: ``scores``/``targets`` ``[T, A]`` (logits, soft VQA targets); ``grad``/``act``
        ``[T, D]`` or ``[T, ...]`` (``dy_c/dA`` with its graph, and ``A``), or instead of the
        two a :class:`~sort_fast.GradCAM` or ``(grad, act)`` pair
        (``loss(scores, targets, cam, offsets, num_sub)``); ``offsets [N+1]``,
        ``num_sub [N]``; ``group_mask [N]`` bool: only the groups it keeps count (the
        padding groups of a batch padded to a static shape get no loss and no gradient)."""
        grad, act, (offsets, num_sub) = gradcam_inputs(grad, act, offsets, num_sub)
        for name, t in (("scores", scores), ("targets", targets)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor [T, A]")
        if scores.shape != targets.shape:
            raise ValueError(
                f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
        if isinstance(grad, torch.Tensor) and scores.shape[0] != grad.shape[0]:
            raise ValueError(f"scores has {scores.shape[0]} rows but grad has {grad.shape[0]}")
        if group_mask is not None and (not isinstance(group_mask, torch.Tensor)
                                       or group_mask.dtype != torch.bool
                                       or group_mask.shape != num_sub.shape):
            raise ValueError(f"group_mask must be a bool tensor of shape "
                             f"{tuple(num_sub.shape)} (one entry per group)")
        options = dict(margin=self.margin, mode=self.mode, eps=self.eps, backend=self.backend)
        if group_mask is None:
            contrastive = contrastive_gradient_loss(grad, act, offsets, num_sub, **options)
        else:
            per_group = contrastive_gradient_loss(grad, act, offsets, num_sub,
                                                  reduction="none", **options)
            # the groups "mean" counts (docs/math.md), among those kept
            counted = group_mask & counted_groups(offsets, num_sub, self.mode)
            contrastive = masked_mean(per_group, counted.to(per_group.dtype))
        bce = role_bce(scores, targets, offsets, num_sub, group_mask)
        lr, ls, li = self.lambdas
        total = (contrastive + lr * bce[ROLE_REASONING] + ls * bce[ROLE_SUB]
                 + li * bce[ROLE_IRRELEVANT])
        return SOrTLossOutput(total, contrastive, bce[ROLE_REASONING], bce[ROLE_SUB],
                              bce[ROLE_IRRELEVANT])

    def extra_repr(self) -> str:
        lr, ls, li = self.lambdas
        return (f"lambda_reasoning={lr}, lambda_sub={ls}, lambda_irrelevant={li}, "
                f"margin={self.margin}, mode={self.mode!r}")
