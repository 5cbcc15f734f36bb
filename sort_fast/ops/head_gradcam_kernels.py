"""Triton kernel of the closed-form head Grad-CAM: a masked, gathered matrix product (SPEC §4).

Imported lazily by :mod:`sort_fast.ops.head_gradcam`: ``TRITON_INTERPRET=1`` must be set before
this module is imported to run the kernel on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_mm_kernel(
    a_ptr, idx_ptr, amask_ptr, b_ptr, scale_ptr, out_ptr,
    M, N, K,
    s_ar, s_ac, s_mr, s_mc, s_bk, s_bn, s_sm, s_sn, s_om, s_on,
    GATHER: tl.constexpr, A_MASK: tl.constexpr, TRANS_A: tl.constexpr,
    SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out = op(S) @ B [* scale]`` with ``S = amask * a[idx]`` (storage ``[R, C]``) and
    ``op(S) = S`` (``[M, K]``) or ``S^T`` (``TRANS_A``); fp32 accumulation. ``UPCAST``
    multiplies in fp32 (the interpreter's bfloat16 arithmetic is wrong in Triton 3.x)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows_m = offs_m
    if GATHER:
        if not TRANS_A:
            rows_m = tl.load(idx_ptr + offs_m, mask=m_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        ok = m_ok[:, None] & k_ok[None, :]
        if TRANS_A:  # logical A[m, k] = S[k, m]: the gathered row index runs along K
            rows_k = ks
            if GATHER:
                rows_k = tl.load(idx_ptr + ks, mask=k_ok, other=0)
            a_ptrs = a_ptr + rows_k[None, :] * s_ar + offs_m[:, None] * s_ac
            m_ptrs = amask_ptr + ks[None, :] * s_mr + offs_m[:, None] * s_mc
        else:
            a_ptrs = a_ptr + rows_m[:, None] * s_ar + ks[None, :] * s_ac
            m_ptrs = amask_ptr + offs_m[:, None] * s_mr + ks[None, :] * s_mc
        a = tl.load(a_ptrs, mask=ok, other=0.0)
        b = tl.load(b_ptr + ks[:, None] * s_bk + offs_n[None, :] * s_bn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if A_MASK:
            a = a * tl.load(m_ptrs, mask=ok, other=0.0).to(a.dtype)
        acc += tl.dot(a.to(b.dtype), b, input_precision=PRECISION)
    out_ok = m_ok[:, None] & n_ok[None, :]
    if SCALE:
        scale = tl.load(scale_ptr + offs_m[:, None] * s_sm + offs_n[None, :] * s_sn, mask=out_ok, other=0.0)
        acc *= scale.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on,
             acc.to(out_ptr.dtype.element_ty), mask=out_ok)


def gather_mm(
    a: torch.Tensor, idx: Optional[torch.Tensor], amask: Optional[torch.Tensor],
    b: torch.Tensor, scale: Optional[torch.Tensor], trans_a: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    if idx is not None:
        idx = idx.contiguous()
    s_shape = (idx.numel(), a.shape[1]) if idx is not None else tuple(a.shape)
    m, k = (s_shape[1], s_shape[0]) if trans_a else s_shape
    n = b.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=b.device)
    if out.numel() == 0 or k == 0:
        return out.zero_()
    block_m, block_n, block_k = 64, 64, 32
    if a.device.type == "cpu":  # interpreter: small tiles keep it fast enough for tests
        block_m, block_n, block_k = 16, 16, 16
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and b.device.type == "cuda" else "ieee"
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    mask_strides = amask.stride() if amask is not None else (0, 0)
    scale_strides = scale.stride() if scale is not None else (0, 0)
    _gather_mm_kernel[grid](
        a, idx if idx is not None else a, amask if amask is not None else a, b,
        scale if scale is not None else a, out,
        m, n, k,
        a.stride(0), a.stride(1), *mask_strides, b.stride(0), b.stride(1), *scale_strides,
        out.stride(0), out.stride(1),
        GATHER=idx is not None, A_MASK=amask is not None, TRANS_A=trans_a,
        SCALE=scale is not None, PRECISION=precision,
        UPCAST=b.device.type == "cpu" and b.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
