"""Classifier heads whose Grad-CAM has a closed form (docs/math.md)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["BranchSum", "mlp_head", "pythia_classifier"]


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


def _out_features(module: nn.Module) -> Optional[int]:
    """``out_features`` of the last submodule of ``module`` that has one (``None`` if none)."""
    for m in reversed(list(module.modules())):
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
