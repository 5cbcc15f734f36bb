"""Classifier heads whose Grad-CAM has a closed form (docs/math.md)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BranchSum", "AnswerTokenHead", "mlp_head", "pythia_classifier"]


class BranchSum(nn.Module):
    """``y = sum_b branch_b(h)``: the shape of Pythia's logit classifier (a text and an image
    branch, each ``Linear -> ReLU -> [Dropout] -> Linear``, summed).

    ``head_gradcam`` sums the closed-form Grad-CAM of each branch. Branches whose output size
    is known (the ``out_features`` of their last such submodule) must agree on it.
    """

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        if not branches:
            raise ValueError("BranchSum needs at least one branch")
        sizes = {i: n for i, n in enumerate(map(_out_features, branches)) if n is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"BranchSum branches must have the same output size, got "
                             f"{', '.join(f'branch {i}: {n}' for i, n in sizes.items())}")
        self.branches = nn.ModuleList(branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [T, D] -> scores [T, A]``."""
        out = self.branches[0](h)
        for branch in self.branches[1:]:
            out = out + branch(h)
        return out


class AnswerTokenHead(nn.Module):
    """A decoder's answer scores: ``h [T, D] -> scores [T, A] = lm_head(norm(h))[:, answer_tokens]``
    with only the ``A`` answer rows of the LM head computed (never the full vocabulary).

    ``norm`` is the decoder's final norm (``nn.RMSNorm`` or ``nn.LayerNorm``, which
    ``head_gradcam`` has a closed form for; docs/vlm.md), ``lm_head`` its ``nn.Linear(D, V)``
    (shared with the decoder, not copied) and ``answer_tokens [A]`` int64 the token id of every
    answer.
    """

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, answer_tokens: torch.Tensor) -> None:
        super().__init__()
        if answer_tokens.dim() != 1 or answer_tokens.dtype != torch.int64:
            raise ValueError("answer_tokens must be a 1-D int64 tensor of token ids")
        if answer_tokens.numel() and (int(answer_tokens.min()) < 0
                                      or int(answer_tokens.max()) >= lm_head.out_features):
            raise ValueError(f"answer_tokens must be token ids in [0, {lm_head.out_features})")
        self.norm, self.lm_head = norm, lm_head
        self.register_buffer("answer_tokens", answer_tokens, persistent=False)

    @property
    def out_features(self) -> int:
        """``A``, the number of answers."""
        return self.answer_tokens.numel()

    def answer_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """``normed [T, D]`` (already through ``norm``) -> ``[T, A]``: the answer rows of the LM
        head."""
        weight = self.lm_head.weight.index_select(0, self.answer_tokens)
        bias = self.lm_head.bias
        return F.linear(normed, weight,
                        None if bias is None else bias.index_select(0, self.answer_tokens))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [T, D] -> scores [T, A]``."""
        return self.answer_logits(self.norm(h))


def _out_features(module: nn.Module) -> Optional[int]:
    """``out_features`` of ``module``, else of its last submodule that has one (``None`` if
    none)."""
    for m in [module, *reversed(list(module.modules())[1:])]:
        n = getattr(m, "out_features", None)
        if isinstance(n, int):
            return n
    return None


def mlp_head(
    in_dim: int, hidden: int, num_answers: int, *, dropout: float = 0.0, weight_norm: bool = False
) -> nn.Sequential:
    """``Linear(in_dim, hidden) -> ReLU -> Dropout -> Linear(hidden, num_answers)``; with
    ``weight_norm`` the first Linear is weight-normalised (``dim=None``, as in Pythia)."""
    first = nn.Linear(in_dim, hidden)
    if weight_norm:
        first = nn.utils.parametrizations.weight_norm(first, dim=None)
    return nn.Sequential(first, nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_answers))


def pythia_classifier(
    in_dim: int, text_hidden: int, image_hidden: int, num_answers: int, *, dropout: float = 0.5
) -> BranchSum:
    """Pythia's logit classifier ``[T, in_dim] -> [T, num_answers]``: a text and an image
    branch, each a weight-normalised ReLU layer, dropout and a linear layer, summed."""
    return BranchSum(
        mlp_head(in_dim, text_hidden, num_answers, dropout=dropout, weight_norm=True),
        mlp_head(in_dim, image_hidden, num_answers, dropout=dropout, weight_norm=True),
    )
