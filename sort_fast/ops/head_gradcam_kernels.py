"""Triton kernel of the closed-form head Grad-CAM: a masked, gathered matrix product
(docs/math.md, closed-form Grad-CAM) on tensor cores, for float16 and bfloat16 operands.

float32 products go to ``torch.matmul`` (cuBLAS, which honours the user's TF32 setting): a
custom kernel brings nothing there. On CUDA the tile shape comes from ``triton.autotune`` over
:data:`TUNING_CONFIGS` (multi-stage software pipelining), keyed on the product's fixed sizes
only, so a new batch size does not re-tune. Imported lazily by
:mod:`sort_fast.ops.gather_mm`: ``TRITON_INTERPRET=1`` must be set before this module is
imported to run the kernel on CPU tensors (with :data:`INTERPRETER_CONFIG`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import Launch, run_launches

# Tile shapes tried on CUDA; the static GPU check compiles every one of them.
TUNING_CONFIGS: List[triton.Config] = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)
    for bm, bn, bk, stages, warps in (
        (64, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 8),
        (128, 128, 32, 3, 8),
        (64, 64, 64, 3, 4),
    )
]
# The interpreter's tile: small, so that tests stay fast.
INTERPRETER_CONFIG: Dict[str, int] = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
DTYPES = (torch.float16, torch.bfloat16)


@triton.heuristics({
    "GATHER": lambda args: args["idx_ptr"] is not None,
    "A_MASK": lambda args: args["amask_ptr"] is not None,
    "SCALE": lambda args: args["scale_ptr"] is not None,
})
@triton.jit
def _gather_mm_kernel(
    a_ptr, idx_ptr, amask_ptr, b_ptr, scale_ptr, out_ptr,
    M, N: tl.constexpr, K, A_CONTIG: tl.constexpr,
    stride_a_row: tl.constexpr, stride_a_col: tl.constexpr, stride_mask_row: tl.constexpr,
    stride_mask_col: tl.constexpr, stride_b_k: tl.constexpr, stride_b_n: tl.constexpr,
    stride_scale_m: tl.constexpr, stride_scale_n: tl.constexpr, stride_out_m: tl.constexpr,
    stride_out_n: tl.constexpr,
    TRANS_A: tl.constexpr, UPCAST: tl.constexpr,
    GATHER: tl.constexpr, A_MASK: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out = op(S) @ B [* scale]`` with ``S = amask * a[idx]`` (storage ``[R, C]``) and
    ``op(S) = S`` (``[M, K]``) or ``S^T`` (``TRANS_A``); fp32 accumulation. ``idx``,
    ``amask`` and ``scale`` are optional (``None``). The strides are compile-time constants
    (model widths, fixed for a run): with them known the compiler can prove 16-byte alignment
    of every row and emit 128-bit loads. ``UPCAST`` multiplies in fp32 (the
    interpreter's bfloat16 arithmetic is wrong in Triton 3.x). Row indices (along ``M`` or,
    with ``TRANS_A``, ``K``: the batch's rows) are int64 before they meet a row stride, so
    ``rows * width`` may pass 2^31."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # bounds along the axis A's storage is contiguous in are compile-time constants (model
    # widths; the batch's row count runs along the other axis), so that whole vectors of a
    # masked load share one mask bit and the loads stay 128 bits wide
    m_ok = offs_m < (A_CONTIG if TRANS_A else M)
    n_ok = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    rows_m = offs_m64
    if GATHER:
        if not TRANS_A:
            rows_m = tl.load(idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        ks64 = ks.to(tl.int64)
        k_ok = ks < (K if TRANS_A else A_CONTIG)
        ok = m_ok[:, None] & k_ok[None, :]
        if TRANS_A:  # logical A[m, k] = S[k, m]: the gathered row index runs along K
            rows_k = ks64
            if GATHER:
                rows_k = tl.load(idx_ptr + ks, mask=k_ok, other=0).to(tl.int64)
            a_ptrs = a_ptr + rows_k[None, :] * stride_a_row + offs_m[:, None] * stride_a_col
            mask_offs = ks64[None, :] * stride_mask_row + offs_m[:, None] * stride_mask_col
        else:
            a_ptrs = a_ptr + rows_m[:, None] * stride_a_row + ks[None, :] * stride_a_col
            mask_offs = offs_m64[:, None] * stride_mask_row + ks[None, :] * stride_mask_col
        a = tl.load(a_ptrs, mask=ok, other=0.0)
        b = tl.load(b_ptr + ks64[:, None] * stride_b_k + offs_n[None, :] * stride_b_n,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if A_MASK:
            a = a * tl.load(amask_ptr + mask_offs, mask=ok, other=0.0).to(a.dtype)
        acc += tl.dot(a.to(b.dtype), b)
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SCALE:
        scale = tl.load(scale_ptr + offs_m64[:, None] * stride_scale_m
                        + offs_n[None, :] * stride_scale_n, mask=out_ok, other=0.0)
        acc *= scale.to(tl.float32)
    tl.store(out_ptr + offs_m64[:, None] * stride_out_m + offs_n[None, :] * stride_out_n,
             acc.to(out_ptr.dtype.element_ty), mask=out_ok)


# The tuning key: the product's widths and layout, never a batch size (the rows run along M,
# or along K with TRANS_A; A_CONTIG and N are widths): one tuning per product for the run.
TUNING_KEY = ["N", "A_CONTIG", "TRANS_A", "stride_a_row", "stride_a_col", "stride_mask_row",
              "stride_b_k", "stride_b_n", "stride_scale_m", "stride_out_m"]
_gather_mm_tuned = triton.autotune(configs=TUNING_CONFIGS, key=TUNING_KEY)(_gather_mm_kernel)


def gather_mm_launch(
    a: torch.Tensor, idx: Optional[torch.Tensor], amask: Optional[torch.Tensor],
    b: torch.Tensor, scale: Optional[torch.Tensor], trans_a: bool, out_dtype: torch.dtype,
    tuned: bool,
) -> Tuple[Optional[Launch], torch.Tensor]:
    """The launch of :func:`gather_mm` (``None`` for an empty product, whose output is
    zero-filled) and its output ``[M, N]``. ``tuned``: the autotuned kernel (CUDA), else the
    interpreter's fixed tile."""
    if idx is not None:
        idx = idx.contiguous()
    s_shape = (idx.numel(), a.shape[1]) if idx is not None else tuple(a.shape)
    m, k = (s_shape[1], s_shape[0]) if trans_a else s_shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=b.device)
    if out.numel() == 0 or k == 0:
        return None, out.zero_()
    mask_strides = amask.stride() if amask is not None else (0, 0)
    scale_strides = scale.stride() if scale is not None else (0, 0)
    args = dict(
        a_ptr=a, idx_ptr=idx, amask_ptr=amask, b_ptr=b, scale_ptr=scale, out_ptr=out,
        M=m, N=n, K=k, A_CONTIG=m if trans_a else k,
        stride_a_row=a.stride(0), stride_a_col=a.stride(1),
        stride_mask_row=mask_strides[0], stride_mask_col=mask_strides[1],
        stride_b_k=b.stride(0), stride_b_n=b.stride(1),
        stride_scale_m=scale_strides[0], stride_scale_n=scale_strides[1],
        stride_out_m=out.stride(0), stride_out_n=out.stride(1), TRANS_A=trans_a,
    )
    if not tuned:
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        return Launch(_gather_mm_kernel, grid,
                      dict(args, UPCAST=b.dtype == torch.bfloat16, **cfg), 4), out

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

    return Launch(_gather_mm_tuned, grid, dict(args, UPCAST=False)), out


def gather_mm(
    a: torch.Tensor, idx: Optional[torch.Tensor], amask: Optional[torch.Tensor],
    b: torch.Tensor, scale: Optional[torch.Tensor], trans_a: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``op(amask * a[idx]) @ b [* scale]`` (``op`` the identity or the transpose) for float16
    or bfloat16 ``b``; fp32 accumulation, result in ``out_dtype``."""
    launch, out = gather_mm_launch(a, idx, amask, b, scale, trans_a, out_dtype,
                                   tuned=b.is_cuda)
    if launch is not None:
        run_launches([launch], b)
    return out
