"""Triton kernels of the Grad-CAM cosine and contrastive gradient loss (SPEC §1, §3).

One program per group. The Grad-CAM product ``G = grad * act`` is formed in registers and never
written to memory; all sums accumulate in float32. The forward kernel saves per-row statistics
only (cosine, norm, ``dL/dc``); the backward kernel re-reads the tiles and writes ``dL/dgrad`` and
``dL/dact`` without atomics. Imported lazily: ``TRITON_INTERPRET=1`` must be set before this
module is imported to run the kernels on CPU tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Largest row tile; a group with more rows is processed in several tiles.
MAX_BLOCK_Q = 64
# Elements of one [BLOCK_Q, BLOCK_D] tile.
TILE_ELEMENTS = 4096


@triton.jit
def _load_gradcam(grad_ptr, act_ptr, rows, cols, stride_grad, stride_act, mask):
    g = tl.load(grad_ptr + rows * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(act_ptr + rows * stride_act + cols, mask=mask, other=0.0).to(tl.float32)
    return g, a


@triton.jit
def _gradcam_cosine_fwd_kernel(
    grad_ptr, act_ptr, offsets_ptr, num_sub_ptr,
    cos_ptr, norm_ptr, weight_ptr, loss_ptr,
    D, stride_grad, stride_act, margin, eps,
    COMPUTE_LOSS: tl.constexpr, CONTRASTIVE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    size = (tl.load(offsets_ptr + g + 1) - start).to(tl.int32)
    q = tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)

    # Pass 1: dot product of every row's G with the reasoning row's, and all norms.
    for q0 in range(0, size, BLOCK_Q):
        pos = q0 + q
        row_ok = pos < size
        rows = start + pos
        dot = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        sq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        r_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + d
            col_ok = cols < D
            rg, ra = _load_gradcam(grad_ptr, act_ptr, start, cols, stride_grad, stride_act, col_ok)
            r = rg * ra
            xg, xa = _load_gradcam(grad_ptr, act_ptr, rows[:, None], cols[None, :],
                                   stride_grad, stride_act, row_ok[:, None] & col_ok[None, :])
            x = xg * xa
            dot += x * r[None, :]
            sq += x * x
            r_sq += r * r
        norm = tl.sqrt(tl.sum(sq, axis=1))
        r_norm = tl.sqrt(tl.sum(r_sq, axis=0))
        # SPEC §1: x.y / (max(|x|, eps) * max(|y|, eps)); the reasoning row is 1 by definition.
        cos = tl.sum(dot, axis=1) / (tl.maximum(norm, eps) * tl.maximum(r_norm, eps))
        cos = tl.where(pos == 0, 1.0, cos)
        tl.store(cos_ptr + rows, cos, mask=row_ok)
        tl.store(norm_ptr + rows, norm, mask=row_ok)

    if COMPUTE_LOSS:
        # Pass 2 reads back the cosines this program stored in pass 1.
        tl.debug_barrier()
        k = tl.load(num_sub_ptr + g).to(tl.int32)
        m = size - 1 - k
        if CONTRASTIVE:
            pairs = (k * m).to(tl.float32)
            inv = tl.where(m > 0, 1.0 / tl.maximum(pairs, 1.0), 0.0)
        else:
            inv = 1.0 / k.to(tl.float32)
        loss_vec = tl.zeros([BLOCK_Q], dtype=tl.float32)
        for i0 in range(0, size, BLOCK_Q):
            pi = i0 + q
            ci = tl.load(cos_ptr + start + pi, mask=pi < size, other=0.0)
            sub_i = (pi >= 1) & (pi <= k)
            if CONTRASTIVE:
                irr_i = (pi > k) & (pi < size)
                # SPEC §3: hinge over all (sub, irrelevant) pairs; count the active pairs per row.
                count = tl.zeros([BLOCK_Q], dtype=tl.float32)
                for j0 in range(0, size, BLOCK_Q):
                    pj = j0 + q
                    cj = tl.load(cos_ptr + start + pj, mask=pj < size, other=0.0)
                    sub_j = (pj >= 1) & (pj <= k)
                    irr_j = (pj > k) & (pj < size)
                    h = margin + cj[None, :] - ci[:, None]  # row i a sub-question, column j irrelevant
                    on = (h > 0) & sub_i[:, None] & irr_j[None, :]
                    loss_vec += tl.sum(tl.where(on, h, 0.0), axis=1)
                    count += tl.sum(on.to(tl.float32), axis=1)
                    h_t = margin + ci[:, None] - cj[None, :]  # row i irrelevant, column j a sub-question
                    on_t = (h_t > 0) & irr_i[:, None] & sub_j[None, :]
                    count += tl.sum(on_t.to(tl.float32), axis=1)
                w = tl.where(sub_i, -count, count) * inv
            else:
                loss_vec += tl.where(sub_i, 1.0 - ci, 0.0)
                w = tl.where(sub_i, -inv, 0.0)
            tl.store(weight_ptr + start + pi, w, mask=pi < size)
        tl.store(loss_ptr + g, tl.sum(loss_vec, axis=0) * inv)


@triton.jit
def _gradcam_cosine_bwd_kernel(
    grad_ptr, act_ptr, offsets_ptr, cos_ptr, norm_ptr, row_weight_ptr, group_scale_ptr,
    dgrad_ptr, dact_ptr,
    D, stride_grad, stride_act, stride_dgrad, stride_dact, eps,
    HAS_GROUP_SCALE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    size = (tl.load(offsets_ptr + g + 1) - start).to(tl.int32)
    q = tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    scale = 1.0
    if HAS_GROUP_SCALE:
        scale = tl.load(group_scale_ptr + g).to(tl.float32)
    r_norm = tl.load(norm_ptr + start)
    r_den = tl.maximum(r_norm, eps)

    # SPEC §3: dL/dr = sum_j w_j x_j/(nr nj) - (sum_j w_j c_j) r/nr^2 (no norm term when nr < eps).
    beta_vec = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for q0 in range(0, size, BLOCK_Q):
        pos = q0 + q
        ok = (pos >= 1) & (pos < size)
        w = tl.load(row_weight_ptr + start + pos, mask=ok, other=0.0) * scale
        c = tl.load(cos_ptr + start + pos, mask=ok, other=0.0)
        beta_vec += w * c
    beta = tl.where(r_norm >= eps, tl.sum(beta_vec, axis=0) / (r_den * r_den), 0.0)

    for d0 in range(0, D, BLOCK_D):
        cols = d0 + d
        col_ok = cols < D
        rg, ra = _load_gradcam(grad_ptr, act_ptr, start, cols, stride_grad, stride_act, col_ok)
        r = rg * ra
        dr = -beta * r
        for q0 in range(0, size, BLOCK_Q):
            pos = q0 + q
            ok = (pos >= 1) & (pos < size)
            rows = start + pos
            w = tl.load(row_weight_ptr + rows, mask=ok, other=0.0) * scale
            c = tl.load(cos_ptr + rows, mask=ok, other=0.0)
            n = tl.load(norm_ptr + rows, mask=ok, other=1.0)
            n_den = tl.maximum(n, eps)
            # SPEC §3: dL/dx_j = w_j (r/(nr nj) - c_j x_j/nj^2) (no norm term when nj < eps).
            a = w / (r_den * n_den)
            b = tl.where(n >= eps, w * c / (n_den * n_den), 0.0)
            mask = ok[:, None] & col_ok[None, :]
            xg, xa = _load_gradcam(grad_ptr, act_ptr, rows[:, None], cols[None, :],
                                   stride_grad, stride_act, mask)
            x = xg * xa
            dx = a[:, None] * r[None, :] - b[:, None] * x
            tl.store(dgrad_ptr + rows[:, None] * stride_dgrad + cols[None, :],
                     (dx * xa).to(dgrad_ptr.dtype.element_ty), mask=mask)
            tl.store(dact_ptr + rows[:, None] * stride_dact + cols[None, :],
                     (dx * xg).to(dact_ptr.dtype.element_ty), mask=mask)
            dr += tl.sum(a[:, None] * x, axis=0)
        tl.store(dgrad_ptr + start * stride_dgrad + cols,
                 (dr * ra).to(dgrad_ptr.dtype.element_ty), mask=col_ok)
        tl.store(dact_ptr + start * stride_dact + cols,
                 (dr * rg).to(dact_ptr.dtype.element_ty), mask=col_ok)


def _launch_config(max_group: int, dim: int) -> Tuple[int, int, int]:
    block_q = min(triton.next_power_of_2(max_group), MAX_BLOCK_Q)
    block_d = min(triton.next_power_of_2(dim), max(32, TILE_ELEMENTS // block_q))
    num_warps = 4 if block_q * block_d <= 2048 else 8
    return block_q, block_d, num_warps


def forward(
    grad: torch.Tensor,
    act: torch.Tensor,
    offsets: torch.Tensor,
    num_sub: Optional[torch.Tensor],
    max_group: int,
    margin: float,
    eps: float,
    contrastive: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-row ``cos [T]``, ``norm [T]`` and, when ``num_sub`` is given, the per-row loss weights
    ``dL_g/dc [T]`` and per-group loss ``[N]`` (all float32)."""
    num_rows, dim = grad.shape
    num_groups = offsets.numel() - 1
    f32 = dict(dtype=torch.float32, device=grad.device)
    cos, norm = torch.empty(num_rows, **f32), torch.empty(num_rows, **f32)
    compute_loss = num_sub is not None
    weight = torch.empty(num_rows, **f32) if compute_loss else None
    loss = torch.empty(num_groups, **f32) if compute_loss else None
    block_q, block_d, num_warps = _launch_config(max_group, dim)
    _gradcam_cosine_fwd_kernel[(num_groups,)](
        grad, act, offsets, num_sub if compute_loss else offsets,
        cos, norm, weight if compute_loss else cos, loss if compute_loss else cos,
        dim, grad.stride(0), act.stride(0), float(margin), float(eps),
        COMPUTE_LOSS=compute_loss, CONTRASTIVE=contrastive,
        BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=num_warps,
    )
    return cos, norm, weight, loss


def backward(
    grad: torch.Tensor,
    act: torch.Tensor,
    offsets: torch.Tensor,
    max_group: int,
    cos: torch.Tensor,
    norm: torch.Tensor,
    row_weight: torch.Tensor,
    group_scale: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``dL/dgrad``, ``dL/dact`` (``[T, D]``, dtypes of ``grad``/``act``) given ``dL/dc`` as
    ``row_weight [T] * group_scale [N]`` (the scale defaults to 1)."""
    num_rows, dim = grad.shape
    dgrad, dact = torch.empty_like(grad), torch.empty_like(act)
    block_q, block_d, num_warps = _launch_config(max_group, dim)
    has_scale = group_scale is not None
    _gradcam_cosine_bwd_kernel[(offsets.numel() - 1,)](
        grad, act, offsets, cos, norm, row_weight.contiguous(),
        group_scale.contiguous() if has_scale else row_weight,
        dgrad, dact,
        dim, grad.stride(0), act.stride(0), dgrad.stride(0), dact.stride(0), float(eps),
        HAS_GROUP_SCALE=has_scale, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=num_warps,
    )
    return dgrad, dact
