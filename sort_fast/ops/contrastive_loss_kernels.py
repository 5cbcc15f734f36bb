"""Triton kernels of the Grad-CAM cosine and contrastive gradient loss (docs/math.md).

The grid is groups x column chunks, so that even a batch of a few dozen groups fills a GPU:

1. ``_gradcam_cosine_fwd_partial_kernel`` (``[N, C]`` programs): for its column chunk, every
   row's partial dot product with its group's reasoning row and partial squared norm, written
   to ``[C, T]`` buffers in the accumulation dtype, of the chunk's entries divided by a power
   of two ``2^e`` (``[C, T]`` int32; ``e = 0``, no division, unless an entry reaches ``2^33``),
   so that no square overflows.
2. ``_gradcam_cosine_fwd_finish_kernel`` (``[N]`` programs): sums the partials over the chunks
   in a fixed order (no atomics: bit-identical results run to run), each scaled to the row's
   largest exponent (exact: powers of two), then the cosines, norms, the per-row hinge
   weights ``dL/dc`` and the per-group loss.
3. ``_gradcam_cosine_bwd_kernel`` (``[N, C]`` programs): ``dL/dgrad`` and ``dL/dact`` of its
   chunk, computed on the rows divided by a power of two where a norm reaches ``2^63``; every
   output element is written by exactly one program.

The Grad-CAM product ``G = grad * act`` is formed in registers and never written to memory.
The row width ``D`` is a compile-time constant: with the row stride known, the compiler can
prove 16-byte alignment of every row and emits 128-bit loads and stores (any ``D`` works;
widths that are not a multiple of the vector width get narrower accesses). Batch sizes
(rows, groups) are runtime values and never cause a recompile. All sums accumulate in float32,
or float64 when an input is float64.

The scalars ``margin`` and ``eps`` are float64 kernel parameters (annotated ``tl.float64``:
Triton would make a plain Python float an fp32 parameter on a GPU, rounding 0.3 to
0.30000001192) and are converted to the accumulation dtype inside the kernels. Row offsets
(``row * D``) are int64. A NaN norm poisons its whole row's gradient, as in the torch backend
(NaN-propagating ``tl.maximum``).

Imported lazily: ``TRITON_INTERPRET=1`` must be set before this module is imported to run the
kernels on CPU tensors. This module does not use ``from __future__ import annotations``: Triton
reads the kernels' parameter annotations as objects.
"""
import functools
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import Launch, run_launches
from .accumulation import accumulation_dtype

# Rows of one tile; a group with more rows is processed in several tiles.
BLOCK_Q = 16
# Widest column chunk (one program's share of a row) for 4-byte and 2-byte inputs.
MAX_BLOCK_D = 256
# Warps per program.
NUM_WARPS = 4


def launch_config(dim: int, dtype: torch.dtype) -> Dict[str, int]:
    """Every compile-time constant and ``num_warps`` of the three kernels, as a pure function
    of the row width and the input dtype (never of the data: a new batch never recompiles).

    Returns ``D``, ``BLOCK_Q``, ``BLOCK_D``, ``N_CHUNKS`` (column chunks, the grid's second
    axis) and ``num_warps``.
    """
    widest = MAX_BLOCK_D if dtype.itemsize <= 4 else MAX_BLOCK_D // 2
    block_d = min(widest, max(16, triton.next_power_of_2(dim)))
    return dict(D=dim, BLOCK_Q=BLOCK_Q, BLOCK_D=block_d, N_CHUNKS=triton.cdiv(dim, block_d),
                num_warps=NUM_WARPS)


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _param_as(value, DTYPE: tl.constexpr):
    """A float64 scalar parameter (a Python float in the interpreter) in ``DTYPE``."""
    return (value + tl.zeros([], DTYPE)).to(DTYPE)


@triton.jit
def _exponent(x, ACC: tl.constexpr):
    """``floor(log2 |x|)`` of a normal float ``x`` (int32), read from its exponent field
    (``-bias`` for 0 and subnormals, ``bias + 1`` for inf and NaN)."""
    if ACC == tl.float64:
        return ((x.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1023
    else:
        return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _pow2(e, ACC: tl.constexpr):
    """``2^e`` exactly for an int32 ``e`` in the normal range of ``ACC``; 0 below it."""
    if ACC == tl.float64:
        bits = (tl.minimum(tl.maximum(e, -1022), 1023) + 1023).to(tl.int64) << 52
        return tl.where(e < -1022, 0.0, bits.to(tl.float64, bitcast=True))
    else:
        bits = (tl.minimum(tl.maximum(e, -126), 127) + 127) << 23
        return tl.where(e < -126, 0.0, bits.to(tl.float32, bitcast=True))


@triton.jit
def _add_scaled(total, e_total, part, e_part, POWER: tl.constexpr, ACC: tl.constexpr):
    """``(s, e)`` with ``s 2^(POWER e) = total 2^(POWER e_total) + part 2^(POWER e_part)`` and
    ``e`` the larger exponent: a sum of scaled partial sums that cannot overflow; with both
    exponents 0 it is the plain ``total + part``, bit for bit."""
    e = tl.maximum(e_total, e_part)
    return (total * _pow2(POWER * (e_total - e), ACC)
            + part * _pow2(POWER * (e_part - e), ACC)), e


@triton.jit
def _chunk_exponent(x, axis: tl.constexpr, ACC: tl.constexpr):
    """The power of two ``e >= 0`` that brings the largest ``|x|`` along ``axis`` below
    ``2^33`` (0 when it is already: such entries are not scaled at all), so that the squares
    of ``x * 2^-e`` cannot overflow (docs/ops.md, long rows)."""
    return tl.maximum(_exponent(tl.max(tl.abs(x), axis=axis), ACC) - 32, 0)


@triton.jit
def _long_row_inverse_scale(norm, ACC: tl.constexpr):
    """``1 / s`` of the backward's per-row scale ``s``: for a norm of at least ``2^63`` (or
    inf) the power of two that brings it into ``[2^32, 2^33)``, else 1 (as the torch
    backend's long rows)."""
    long_row = norm >= 9223372036854775808.0  # 2^63
    return tl.where(long_row, _pow2(32 - _exponent(norm, ACC), ACC), 1.0).to(ACC)


@triton.jit
def _load_gradcam(grad_ptr, act_ptr, rows, cols, mask, D: tl.constexpr, ACC: tl.constexpr):
    """``(grad, act)`` of the given rows and columns in the accumulation dtype."""
    offs = rows * D + cols
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.load(act_ptr + offs, mask=mask, other=0.0).to(ACC)
    return g, a


@triton.jit(do_not_specialize=["num_rows"])
def _gradcam_cosine_fwd_partial_kernel(
    grad_ptr, act_ptr, offsets_ptr, dot_ptr, sq_ptr, exp_ptr, num_rows,
    D: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    chunk = tl.program_id(1)
    start = tl.load(offsets_ptr + g)
    size = (tl.load(offsets_ptr + g + 1) - start).to(tl.int32)
    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    q = tl.arange(0, BLOCK_Q)
    rg, ra = _load_gradcam(grad_ptr, act_ptr, start, cols, col_ok, D, ACC)
    r = rg * ra
    r = r * _pow2(-_chunk_exponent(r, 0, ACC), ACC)
    part = chunk.to(tl.int64) * num_rows + start
    for q0 in range(0, size, BLOCK_Q):
        pos = q0 + q
        row_ok = pos < size
        xg, xa = _load_gradcam(grad_ptr, act_ptr, (start + pos)[:, None], cols[None, :],
                               row_ok[:, None] & col_ok[None, :], D, ACC)
        x = xg * xa
        e = _chunk_exponent(x, 1, ACC)
        x = x * _pow2(-e, ACC)[:, None]
        # both sums of x 2^-e (and r 2^-e_r): the finish kernel scales them back
        tl.store(dot_ptr + part + pos, tl.sum(x * r[None, :], axis=1), mask=row_ok)
        tl.store(sq_ptr + part + pos, tl.sum(x * x, axis=1), mask=row_ok)
        tl.store(exp_ptr + part + pos, e, mask=row_ok)


@triton.jit
def _hinge_row_tile(cos_ptr, start, size, k, margin, pi, ci, q,
                    CONTRASTIVE: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Loss summed over the pairs of the rows ``pi`` (cosines ``ci``) and ``dL/dc`` of each,
    before the group's ``1/(K M)`` or ``1/K`` factor (docs/math.md, the hinge)."""
    sub_i = (pi >= 1) & (pi <= k)
    if CONTRASTIVE:
        irr_i = (pi > k) & (pi < size)
        loss = tl.zeros([BLOCK_Q], dtype=ci.dtype)
        count = tl.zeros([BLOCK_Q], dtype=ci.dtype)
        for j0 in range(0, size, BLOCK_Q):
            pj = j0 + q
            cj = tl.load(cos_ptr + start + pj, mask=pj < size, other=0.0)
            sub_j = (pj >= 1) & (pj <= k)
            irr_j = (pj > k) & (pj < size)
            # row i a sub-question, column j irrelevant; ``h <= 0`` is false for NaN, so a
            # NaN cosine reaches the loss (the hinge never masks it)
            h = margin + cj[None, :] - ci[:, None]
            on = (h > 0) & sub_i[:, None] & irr_j[None, :]
            live = ~(h <= 0) & sub_i[:, None] & irr_j[None, :]
            loss += tl.sum(tl.where(live, h, 0.0), axis=1)
            count += tl.sum(on.to(ci.dtype), axis=1)
            # row i irrelevant, column j a sub-question
            h_t = margin + ci[:, None] - cj[None, :]
            on_t = (h_t > 0) & irr_i[:, None] & sub_j[None, :]
            count += tl.sum(on_t.to(ci.dtype), axis=1)
        weight = tl.where(sub_i, -count, count)
    else:
        loss = tl.where(sub_i, 1.0 - ci, 0.0)
        weight = tl.where(sub_i, -1.0, 0.0).to(ci.dtype)
    return loss, weight


@triton.heuristics({"HAS_LOSS": lambda args: args["num_sub_ptr"] is not None})
@triton.jit(do_not_specialize=["num_rows"])
def _gradcam_cosine_fwd_finish_kernel(
    offsets_ptr, num_sub_ptr, dot_ptr, sq_ptr, exp_ptr, cos_ptr, norm_ptr, weight_ptr, loss_ptr,
    num_rows, margin: tl.float64, eps: tl.float64,
    N_CHUNKS: tl.constexpr, ACC: tl.constexpr, CONTRASTIVE: tl.constexpr,
    HAS_LOSS: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    size = (tl.load(offsets_ptr + g + 1) - start).to(tl.int32)
    q = tl.arange(0, BLOCK_Q)
    eps = _param_as(eps, ACC)
    stride = num_rows.to(tl.int64)  # between the chunks' partial sums
    # the partial sums are of rows scaled by 2^-e per chunk (exp_ptr; 0 unless the chunk holds
    # an entry of 2^33 or more): summed in a fixed order (deterministic), scaled to the
    # largest exponent; |r| = sqrt(r_sq) 2^r_e
    r_sq = tl.load(sq_ptr + start)
    r_e = tl.load(exp_ptr + start)
    for r_chunk in tl.range(1, N_CHUNKS, loop_unroll_factor=4):
        r_sq, r_e = _add_scaled(r_sq, r_e, tl.load(sq_ptr + r_chunk * stride + start),
                                tl.load(exp_ptr + r_chunk * stride + start), 2, ACC)
    r_den = tl.maximum(tl.sqrt(r_sq), eps * _pow2(-r_e, ACC), propagate_nan=tl.PropagateNan.ALL)
    for q0 in range(0, size, BLOCK_Q):
        pos = q0 + q
        ok = pos < size
        rows = start + pos
        dot = tl.load(dot_ptr + rows, mask=ok, other=0.0)
        sq = tl.load(sq_ptr + rows, mask=ok, other=0.0)
        e = tl.load(exp_ptr + rows, mask=ok, other=0)
        dot_e = e + tl.load(exp_ptr + start)
        # unrolled by 4 (fully unrolled, the exponent bookkeeping spills in float64 at D = 5000)
        for c in tl.range(1, N_CHUNKS, loop_unroll_factor=4):
            e_c = tl.load(exp_ptr + c * stride + rows, mask=ok, other=0)
            dot, dot_e = _add_scaled(dot, dot_e, tl.load(dot_ptr + c * stride + rows, mask=ok,
                                                         other=0.0),
                                     e_c + tl.load(exp_ptr + c * stride + start), 1, ACC)
            sq, e = _add_scaled(sq, e, tl.load(sq_ptr + c * stride + rows, mask=ok, other=0.0),
                                e_c, 2, ACC)
        n_hat = tl.sqrt(sq)  # |x| 2^-e
        # x.r / (max(|x|, eps) max(|r|, eps)); the reasoning row is 1 by definition
        n_den = tl.maximum(n_hat, eps * _pow2(-e, ACC), propagate_nan=tl.PropagateNan.ALL)
        cos = tl.where(pos == 0, 1.0, dot * _pow2(dot_e - e - r_e, ACC) / (n_den * r_den))
        tl.store(cos_ptr + rows, cos, mask=ok)
        tl.store(norm_ptr + rows, n_hat * _pow2(e, ACC), mask=ok)

    if HAS_LOSS:
        tl.debug_barrier()  # the hinge reads back the cosines stored above by other threads
        k = tl.load(num_sub_ptr + g).to(tl.int32)
        m = size - 1 - k
        if CONTRASTIVE:
            inv = tl.where(m > 0, 1.0 / tl.maximum(k * m, 1).to(ACC), 0.0)
        else:
            inv = 1.0 / k.to(ACC)
        loss = tl.zeros([BLOCK_Q], dtype=ACC)
        margin = _param_as(margin, ACC)
        for i0 in range(0, size, BLOCK_Q):
            pi = i0 + q
            ci = tl.load(cos_ptr + start + pi, mask=pi < size, other=0.0)
            tile_loss, weight = _hinge_row_tile(cos_ptr, start, size, k, margin, pi, ci, q,
                                                CONTRASTIVE, BLOCK_Q)
            loss += tile_loss
            tl.store(weight_ptr + start + pi, weight * inv, mask=pi < size)
        tl.store(loss_ptr + g, tl.sum(loss, axis=0) * inv)


@triton.heuristics({"HAS_GROUP_SCALE": lambda args: args["group_scale_ptr"] is not None})
@triton.jit
def _gradcam_cosine_bwd_kernel(
    grad_ptr, act_ptr, offsets_ptr, cos_ptr, norm_ptr, row_weight_ptr, group_scale_ptr,
    dgrad_ptr, dact_ptr, eps: tl.float64,
    D: tl.constexpr, ACC: tl.constexpr, HAS_GROUP_SCALE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    chunk = tl.program_id(1)
    start = tl.load(offsets_ptr + g)
    size = (tl.load(offsets_ptr + g + 1) - start).to(tl.int32)
    q = tl.arange(0, BLOCK_Q)
    eps = _param_as(eps, ACC)
    scale = tl.full([], 1.0, ACC)
    if HAS_GROUP_SCALE:
        scale = tl.load(group_scale_ptr + g).to(ACC)
    # on rows G / s (s: _long_row_inverse_scale, 1 unless |G| >= 2^63): the cosine is the
    # same, and dL/dG = dL/d(G / s) / s; the norms below are those of the scaled rows
    r_norm = tl.load(norm_ptr + start).to(ACC)
    r_inv = _long_row_inverse_scale(r_norm, ACC)
    r_den = tl.maximum(r_norm * r_inv, eps * r_inv, propagate_nan=tl.PropagateNan.ALL)

    # dL/dr = sum_j w_j x_j/(nr nj) - (sum_j w_j c_j) r/nr^2, no norm term when nr < eps
    beta_vec = tl.zeros([BLOCK_Q], dtype=ACC)
    for q0 in range(0, size, BLOCK_Q):
        pos = q0 + q
        ok = (pos >= 1) & (pos < size)
        w = tl.load(row_weight_ptr + start + pos, mask=ok, other=0.0).to(ACC)
        c = tl.load(cos_ptr + start + pos, mask=ok, other=0.0).to(ACC)
        beta_vec += w * c
    beta = tl.where(r_norm >= eps, tl.sum(beta_vec, axis=0) * scale / (r_den * r_den), 0.0)

    cols = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    rg, ra = _load_gradcam(grad_ptr, act_ptr, start, cols, col_ok, D, ACC)
    r = rg * ra * r_inv
    dr = -beta * r
    for q0 in range(0, size, BLOCK_Q):
        pos = q0 + q
        ok = (pos >= 1) & (pos < size)
        rows = start + pos
        w = tl.load(row_weight_ptr + rows, mask=ok, other=0.0).to(ACC) * scale
        c = tl.load(cos_ptr + rows, mask=ok, other=0.0).to(ACC)
        n = tl.load(norm_ptr + rows, mask=ok, other=1.0).to(ACC)
        inv = _long_row_inverse_scale(n, ACC)
        n_den = tl.maximum(n * inv, eps * inv, propagate_nan=tl.PropagateNan.ALL)
        # dL/dx_j = w_j (r/(nr nj) - c_j x_j/nj^2), no norm term when nj < eps
        a = w / (r_den * n_den)
        b = tl.where(n >= eps, w * c / (n_den * n_den), 0.0)
        mask = ok[:, None] & col_ok[None, :]
        xg, xa = _load_gradcam(grad_ptr, act_ptr, rows[:, None], cols[None, :], mask, D, ACC)
        x = xg * xa * inv[:, None]
        dx = (a[:, None] * r[None, :] - b[:, None] * x) * inv[:, None]
        offs = rows[:, None] * D + cols[None, :]
        tl.store(dgrad_ptr + offs, (dx * xa).to(dgrad_ptr.dtype.element_ty), mask=mask)
        tl.store(dact_ptr + offs, (dx * xg).to(dact_ptr.dtype.element_ty), mask=mask)
        dr += tl.sum(a[:, None] * x, axis=0)
    dr = dr * r_inv
    tl.store(dgrad_ptr + start * D + cols, (dr * ra).to(dgrad_ptr.dtype.element_ty), mask=col_ok)
    tl.store(dact_ptr + start * D + cols, (dr * rg).to(dact_ptr.dtype.element_ty), mask=col_ok)


def forward_launches(
    grad: torch.Tensor,
    act: torch.Tensor,
    offsets: torch.Tensor,
    num_sub: Optional[torch.Tensor],
    margin: float,
    eps: float,
    contrastive: bool,
) -> Tuple[List[Launch], Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                 Optional[torch.Tensor]]]:
    """The kernel launches of the forward and the outputs they fill (also what the static GPU
    check compiles, so that it checks exactly these launches): per-row ``cos [T]``,
    ``norm [T]`` and, when ``num_sub`` is given, the per-row loss weights ``dL_g/dc [T]`` and
    the per-group loss ``[N]``, all in the accumulation dtype; ``grad``/``act`` contiguous."""
    num_rows, dim = grad.shape
    num_groups = offsets.numel() - 1
    acc = accumulation_dtype(grad.dtype, act.dtype)
    cfg = launch_config(dim, grad.dtype)
    new = dict(dtype=acc, device=grad.device)
    dot = torch.empty(cfg["N_CHUNKS"], num_rows, **new)
    sq = torch.empty(cfg["N_CHUNKS"], num_rows, **new)
    exps = torch.empty(cfg["N_CHUNKS"], num_rows, dtype=torch.int32, device=grad.device)
    cos, norm = torch.empty(num_rows, **new), torch.empty(num_rows, **new)
    weight = torch.empty(num_rows, **new) if num_sub is not None else None
    loss = torch.empty(num_groups, **new) if num_sub is not None else None
    launches = [
        Launch(_gradcam_cosine_fwd_partial_kernel, (num_groups, cfg["N_CHUNKS"]),
               dict(grad_ptr=grad, act_ptr=act, offsets_ptr=offsets, dot_ptr=dot, sq_ptr=sq,
                    exp_ptr=exps, num_rows=num_rows, D=dim, ACC=_TL_DTYPE[acc],
                    BLOCK_Q=cfg["BLOCK_Q"], BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"]),
        Launch(_gradcam_cosine_fwd_finish_kernel, (num_groups,),
               dict(offsets_ptr=offsets, num_sub_ptr=num_sub, dot_ptr=dot, sq_ptr=sq,
                    exp_ptr=exps, cos_ptr=cos, norm_ptr=norm, weight_ptr=weight,
                    loss_ptr=loss, num_rows=num_rows, margin=margin, eps=eps,
                    N_CHUNKS=cfg["N_CHUNKS"], ACC=_TL_DTYPE[acc], CONTRASTIVE=contrastive,
                    BLOCK_Q=cfg["BLOCK_Q"]), cfg["num_warps"]),
    ]
    return launches, (cos, norm, weight, loss)


def backward_launches(
    grad: torch.Tensor,
    act: torch.Tensor,
    offsets: torch.Tensor,
    cos: torch.Tensor,
    norm: torch.Tensor,
    row_weight: torch.Tensor,
    group_scale: Optional[torch.Tensor],
    eps: float,
) -> Tuple[List[Launch], Tuple[torch.Tensor, torch.Tensor]]:
    """The kernel launch of the backward and the outputs it fills: ``dL/dgrad``, ``dL/dact``
    (``[T, D]``, dtypes of ``grad``/``act``) given ``dL/dc`` as ``row_weight [T] *
    group_scale [N]`` (the scale defaults to 1)."""
    dim = grad.shape[1]
    dgrad, dact = torch.empty_like(grad), torch.empty_like(act)
    cfg = launch_config(dim, grad.dtype)
    acc = accumulation_dtype(grad.dtype, act.dtype)
    launch = Launch(
        _gradcam_cosine_bwd_kernel, (offsets.numel() - 1, cfg["N_CHUNKS"]),
        dict(grad_ptr=grad, act_ptr=act, offsets_ptr=offsets, cos_ptr=cos, norm_ptr=norm,
             row_weight_ptr=row_weight, group_scale_ptr=group_scale, dgrad_ptr=dgrad,
             dact_ptr=dact, eps=eps, D=dim, ACC=_TL_DTYPE[acc], BLOCK_Q=cfg["BLOCK_Q"],
             BLOCK_D=cfg["BLOCK_D"]), cfg["num_warps"])
    return [launch], (dgrad, dact)


def _running(make_launches):
    """The host function that runs ``make_launches``'s launches (on the GPU of its first
    argument) and returns the outputs they fill; same arguments."""
    @functools.wraps(make_launches)
    def run(*args):
        launches, outputs = make_launches(*args)
        run_launches(launches, args[0])
        return outputs

    return run


# The host functions of the ops (the torch backend has the same signatures):
# forward(grad, act, offsets, num_sub, margin, eps, contrastive) -> (cos, norm, weight, loss)
# backward(grad, act, offsets, cos, norm, row_weight, group_scale, eps) -> (dgrad, dact)
forward = _running(forward_launches)
backward = _running(backward_launches)
