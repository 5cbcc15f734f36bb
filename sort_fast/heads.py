"""Classifier heads whose Grad-CAM has a closed form (SPEC §4)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BranchSum"]


class BranchSum(nn.Module):
    """``y = sum_b branch_b(h)``: the shape of Pythia's logit classifier (a text and an image
    branch, each ``Linear -> ReLU -> [Dropout] -> Linear``, summed).

    ``head_gradcam`` sums the closed-form Grad-CAM of each branch.
    """

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        if not branches:
            raise ValueError("BranchSum needs at least one branch")
        self.branches = nn.ModuleList(branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [T, D] -> scores [T, A]``."""
        out = self.branches[0](h)
        for branch in self.branches[1:]:
            out = out + branch(h)
        return out
