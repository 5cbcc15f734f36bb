"""The test reference: the contrastive gradient loss and the Grad-CAM similarity written out
one group and one (sub-question, irrelevant question) pair at a time in plain autograd,
float64 by default (docs/math.md, paper Eq. 2).

Nothing here is fast and nothing is shared with the fused ops
(:mod:`sort_fast.ops.contrastive_loss`): the tests compare the ops' values and gradients with
these functions, and the loss benchmark times :func:`reference_loss` as its Python-loop path.
Inputs use the packed layout of docs/ops.md. :func:`reference_head_gradcam` is the autograd
Grad-CAM of a classifier head that the closed forms of
:func:`~sort_fast.ops.head_gradcam.head_gradcam` are tested against.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["cosine", "reference_loss", "reference_similarity", "reference_head_gradcam",
           "gradients_or_zeros"]

EPS = 1e-8


def cosine(x: torch.Tensor, r: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``x . r / (max(|x|, eps) max(|r|, eps))`` of ``x [..., D]`` with ``r [D]`` (``[...]``):
    the cosine of docs/math.md, each norm clamped on its own."""
    return (x @ r) / (x.norm(dim=-1).clamp_min(eps) * r.norm().clamp_min(eps))


def _gradcam(grad: torch.Tensor, act: torch.Tensor,
             dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``G = grad * act [T, D]`` (rows flattened) in ``dtype`` (None: the promoted dtype)."""
    G = grad.to(dtype) * act.to(dtype) if dtype is not None else grad * act
    return G.reshape(G.shape[0], -1)


def reference_loss(
    grad: torch.Tensor,
    act: torch.Tensor,
    offsets: torch.Tensor,
    num_sub: torch.Tensor,
    margin: float = 0.0,
    mode: str = "contrastive",
    reduction: str = "mean",
    eps: float = EPS,
    dtype: Optional[torch.dtype] = torch.float64,
) -> torch.Tensor:
    """:func:`sort_fast.contrastive_gradient_loss` from a Python loop.

    ``grad``/``act [T, ...]`` (``G = grad * act``, flattened per row), ``offsets [N+1]``,
    ``num_sub [N]``. ``"contrastive"``: per group, the mean over its (sub ``s``, irrelevant
    ``i``) pairs of ``max(0, margin + cos(G_i, G_r) - cos(G_s, G_r))``, each pair's cosines
    computed afresh; a group without irrelevant questions gives 0 and is not counted by
    ``"mean"``. ``"sq_only"``: per group, the mean over its sub-questions of
    ``1 - cos(G_s, G_r)``. ``reduction``: ``"mean"`` over counted groups (0 if none),
    ``"sum"`` or ``"none"`` (``[N]``). Computed in ``dtype`` (None: the inputs' dtype).
    """
    G = _gradcam(grad, act, dtype)
    losses: List[torch.Tensor] = []
    counted = 0
    for g in range(num_sub.numel()):
        a, b, k = int(offsets[g]), int(offsets[g + 1]), int(num_sub[g])
        r, subs, irrelevant = G[a], range(a + 1, a + 1 + k), range(a + 1 + k, b)
        if mode == "sq_only":
            terms = [1 - cosine(G[s], r, eps) for s in subs]
        else:
            # relu: no gradient at a hinge exactly at its kink, as in the fused op
            terms = [torch.relu(margin + cosine(G[i], r, eps) - cosine(G[s], r, eps))
                     for s in subs for i in irrelevant]
        if terms:
            losses.append(torch.stack(terms).mean())
            counted += 1
        else:  # no pair: uses no vector, never NaN
            losses.append(torch.zeros((), dtype=G.dtype, device=G.device))
    per_group = torch.stack(losses)
    if reduction == "none":
        return per_group
    if reduction == "sum":
        return per_group.sum()
    return per_group.sum() / counted if counted else per_group.sum() * 0


def reference_similarity(
    grad: torch.Tensor,
    act: torch.Tensor,
    offsets: torch.Tensor,
    eps: float = EPS,
    dtype: Optional[torch.dtype] = torch.float64,
) -> torch.Tensor:
    """:func:`sort_fast.gradcam_similarity` from a Python loop: ``[T]``, the cosine of every
    row's ``G`` with its group's reasoning row, 1 for the reasoning rows themselves."""
    G = _gradcam(grad, act, dtype)
    out = []
    for g in range(offsets.numel() - 1):
        a, b = int(offsets[g]), int(offsets[g + 1])
        out += [torch.ones(1, dtype=G.dtype, device=G.device), cosine(G[a + 1:b], G[a], eps)]
    return torch.cat(out)


def reference_head_gradcam(head: torch.nn.Module, h: torch.Tensor, classes: torch.Tensor,
                           times_input: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(head(h) [T, A], d head(h)[t, classes[t]] / d h[t] [T, D])`` (times ``h`` with
    ``times_input``) by ``torch.autograd.grad(..., create_graph=True)``; ``h`` requires grad."""
    scores = head(h)
    (g,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), h, create_graph=True)
    return scores, g * h if times_input else g


def gradients_or_zeros(loss: torch.Tensor, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """``d loss / d tensor`` for each of ``tensors``, zeros for one ``loss`` does not use."""
    out = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(out, tensors)]
