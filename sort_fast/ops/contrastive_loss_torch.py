"""The torch backend of the Grad-CAM cosine ops (:mod:`sort_fast.ops.contrastive_loss`): the
CPU implementation, vectorised over groups, with the same host-function signatures as
:mod:`sort_fast.ops.contrastive_loss_kernels`:

- ``forward(grad, act, offsets, num_sub, margin, eps, contrastive) -> (cos, norm, weight,
  loss)``;
- ``backward(grad, act, offsets, cos, norm, row_weight, group_scale, eps) -> (dgrad, dact)``.

Segment sums over a group's rows are sparse-CSR products (rows of group ``g`` are the
contiguous range ``offsets[g]:offsets[g+1]``), which beat ``index_add_`` on the CPU. The pair
enumeration and the long-row selection (``nonzero``) size their outputs from the data: on a GPU
they would read values back, which is why ``backend="auto"`` uses the Triton kernels there
(docs/ops.md).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from ..layout import ROLE_SUB, group_ids, row_roles
from .accumulation import accumulation_dtype

# The segment sums use sparse CSR products; their beta notice is not for users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# A Grad-CAM row this long is divided by a power of two before its squares and products are
# summed, which would overflow float32 from about 2^64 (docs/ops.md). Below it, a product of
# two norms stays under 2^126: rows that are not long are computed as they are.
LONG_ROW_NORM = 2.0 ** 63


def gradcam_vectors(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """``G = grad * act [T, D]`` in the accumulation dtype."""
    acc = accumulation_dtype(grad.dtype, act.dtype)
    return grad.to(acc) * act.to(acc)


def long_rows(norm: torch.Tensor) -> torch.Tensor:
    """Indices ``[L]`` of the rows whose ``norm [T]`` reaches :data:`LONG_ROW_NORM` or
    overflowed (none for ordinary data)."""
    return (norm >= LONG_ROW_NORM).nonzero().squeeze(1)


def scale_rows(G: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Divides the ``rows [L]`` of ``G [T, D]`` in place by the power of two that brings each
    one's largest entry into ``[2^32, 2^33)``; returns the divisors and the norms of the
    scaled rows (``[L]`` each). The cosine is unchanged (``eps`` is below ``2^32``), and
    ``dL/dG = dL/d(G / s) / s``: long rows are computed where their squares fit."""
    G_rows = G.index_select(0, rows)
    exponent = torch.frexp(G_rows.abs().amax(1)).exponent  # largest in [2^(e-1), 2^e)
    scale = torch.ldexp(torch.ones_like(G_rows[:, 0]), exponent - 33)
    G_rows = G_rows / scale[:, None]
    G.index_copy_(0, rows, G_rows)
    return scale, torch.linalg.vector_norm(G_rows, dim=1)


def forward(
    grad: torch.Tensor, act: torch.Tensor, offsets: torch.Tensor,
    num_sub: Optional[torch.Tensor], margin: float, eps: float, contrastive: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``grad``/``act [T, D]`` -> per-row ``cos [T]``, ``norm [T]`` and, with ``num_sub [N]``,
    the per-row weights ``dL_g/dc [T]`` and per-group losses ``[N]`` (else None, None), in
    the accumulation dtype (docs/math.md)."""
    G = gradcam_vectors(grad, act)
    num_rows = G.shape[0]
    start = offsets[:-1]
    sizes = offsets[1:] - start
    gid = group_ids(sizes, num_rows)
    norm = torch.linalg.vector_norm(G, dim=1)
    long = long_rows(norm)
    scale, long_norm = scale_rows(G, long)
    norm.index_copy_(0, long, long_norm)
    dot = torch.einsum("td,td->t", G, G[start].index_select(0, gid))
    cos = dot / (norm.clamp_min(eps) * norm[start][gid].clamp_min(eps))
    cos[start] = 1.0
    norm.index_copy_(0, long, long_norm * scale)  # the norms of the rows as given
    if num_sub is None:
        return cos, norm, None, None
    weight, loss = hinge(cos, offsets, sizes, num_sub, gid, margin, contrastive)
    return cos, norm, weight, loss


def backward(
    grad: torch.Tensor, act: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
    norm: torch.Tensor, row_weight: torch.Tensor, group_scale: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dgrad, dL/dact)`` (``[T, D]``, dtypes of ``grad``/``act``) given
    ``dL/dc = row_weight [T] * group_scale [N]`` (no scale: 1) and the forward's ``cos`` and
    ``norm [T]``."""
    G = gradcam_vectors(grad, act)
    long = long_rows(norm)
    scale, long_norm = scale_rows(G, long)
    norm = norm.index_copy(0, long, long_norm)
    num_rows = G.shape[0]
    start = offsets[:-1]
    sizes = offsets[1:] - start
    gid = group_ids(sizes, num_rows)
    w = row_weight if group_scale is None else row_weight * group_scale[gid]
    w = w.to(G.dtype, copy=True)
    w[start] = 0.0  # the reasoning row's own similarity is the constant 1
    n_den = norm.clamp_min(eps)
    r_norm = norm[start]
    r_den = r_norm.clamp_min(eps)
    # docs/math.md gradients; the norm terms vanish where a norm is clamped to eps.
    a = w / (r_den[gid] * n_den)
    b = torch.where(norm >= eps, w * cos / n_den.square(), torch.zeros_like(w))
    beta = torch.zeros_like(r_norm).index_add_(0, gid, w * cos)
    beta = torch.where(r_norm >= eps, beta / r_den.square(), torch.zeros_like(beta))
    G_r = G[start]
    # dL/dx_j = a_j r - b_j x_j, dL/dr = sum_j a_j x_j - beta r
    dG = G_r.index_select(0, gid).mul_(a[:, None]).addcmul_(G, b[:, None], value=-1.0)
    group_rows = torch.sparse_csr_tensor(offsets, torch.arange(num_rows, device=G.device), a,
                                         size=(sizes.numel(), num_rows),
                                         check_invariants=False)
    dG[start] += torch.sparse.mm(group_rows, G).addcmul_(G_r, beta[:, None], value=-1.0)
    dG.index_copy_(0, long, dG.index_select(0, long) / scale[:, None])
    dgrad = (dG * act).to(grad.dtype)
    return dgrad, dG.mul_(grad).to(act.dtype)


def hinge(
    cos: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor, num_sub: torch.Tensor,
    gid: torch.Tensor, margin: float, contrastive: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights ``dL_g/dc [T]`` and per-group losses ``[N]`` from the cosines
    ``cos [T]`` (``gid [T]``: each row's group; docs/math.md). A NaN cosine makes its group's
    loss NaN: the hinge never masks it."""
    start = offsets[:-1]
    num_irr = sizes - 1 - num_sub
    weight = torch.zeros_like(cos)
    if not contrastive:
        inv = 1.0 / num_sub.to(cos.dtype)
        sub = (row_roles(offsets, num_sub, sizes, gid) == ROLE_SUB).nonzero().squeeze(1)
        loss = torch.zeros_like(inv).index_add_(0, gid[sub], 1.0 - cos[sub]) * inv
        weight[sub] = -inv[gid[sub]]
        return weight, loss
    # Enumerate every (sub-question, irrelevant question) pair of every group: P = sum K*M.
    pairs = num_sub * num_irr
    inv = torch.where(num_irr > 0, 1.0 / pairs.clamp_min(1).to(cos.dtype),
                      torch.zeros((), dtype=cos.dtype, device=cos.device))
    pair_group = torch.repeat_interleave(torch.arange(sizes.numel(), device=cos.device), pairs)
    first_pair = torch.cumsum(pairs, 0) - pairs
    p = torch.arange(pair_group.numel(), device=cos.device) - first_pair[pair_group]
    m_of_pair = num_irr[pair_group]
    sub_row = start[pair_group] + 1 + torch.div(p, m_of_pair, rounding_mode="floor")
    irr_row = start[pair_group] + 1 + num_sub[pair_group] + p % m_of_pair
    h = margin + cos[irr_row] - cos[sub_row]
    on = h > 0
    loss = torch.zeros_like(inv).index_add_(0, pair_group, h.clamp_min(0.0)) * inv
    step = on.to(cos.dtype) * inv[pair_group]
    weight.index_add_(0, sub_row, -step).index_add_(0, irr_row, step)
    return weight, loss
