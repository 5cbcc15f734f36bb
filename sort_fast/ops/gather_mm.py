"""The products of the closed-form ReLU-MLP head Grad-CAM (docs/math.md), two
``torch.library`` custom ops with fake implementations:

- ``sort_fast::gather_mm``: ``op(mask * a[idx]) @ b [* scale]``, the one product all three
  matrix multiplications of the closed form are (no autograd of its own);
- ``sort_fast::masked_gather_mm``: ``g = (M * W2[c]) @ W1``, with its backward written as two
  more ``gather_mm`` products.

A Triton kernel (:mod:`sort_fast.ops.head_gradcam_kernels`, imported on first use) serves
float16/bfloat16 products where :func:`kernel_supported` says so; ``torch.matmul`` serves the
rest.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["gather_mm", "masked_gather_mm", "kernel_supported"]


def gather_mm_torch(
    a: torch.Tensor, idx: Optional[torch.Tensor], amask: Optional[torch.Tensor],
    b: torch.Tensor, scale: Optional[torch.Tensor], trans_a: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`gather_mm` in PyTorch: ``a [R, K]`` (``trans_a``: ``[K, R]`` read transposed),
    ``idx [M]`` rows of ``a`` (None: all), ``amask`` like the gathered rows, ``b [K, N]``,
    ``scale [M, N]`` -> ``[M, N]`` in ``out_dtype``."""
    s = a.index_select(0, idx) if idx is not None else a
    if amask is not None:
        s = s * amask
    out = (s.t() if trans_a else s).to(b.dtype) @ b
    if scale is not None:
        out = out.mul_(scale)
    return out.to(out_dtype)


def kernel_supported(dtype: torch.dtype, capability: Optional[Tuple[int, int]]) -> bool:
    """Whether the Triton kernel serves a product in ``dtype`` on a GPU of compute
    ``capability`` (``None``: the CPU interpreter): float16/bfloat16 on sm_80+, where it
    compiles to tensor-core instructions (on sm_75 Triton emits none, so torch.matmul serves
    there, as it does float32, whose cuBLAS products a custom kernel cannot beat)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    return capability is None or capability >= (8, 0)


def _uses_kernel(backend: str, b: torch.Tensor) -> bool:
    capability = torch.cuda.get_device_capability(b.device) if b.is_cuda else None
    return backend == "triton" and kernel_supported(b.dtype, capability)


@torch.library.custom_op("sort_fast::gather_mm", mutates_args=())
def gather_mm(
    a: torch.Tensor, idx: Optional[torch.Tensor], amask: Optional[torch.Tensor],
    b: torch.Tensor, scale: Optional[torch.Tensor], trans_a: bool, out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """``op(amask * a[idx]) @ b [* scale]``, ``op`` the identity or the transpose: ``[M, N]``
    in ``out_dtype``. No autograd of its own (the closed form is differentiable once)."""
    if _uses_kernel(backend, b):
        from .head_gradcam_kernels import gather_mm as impl
    else:
        impl = gather_mm_torch
    return impl(a, idx, amask, b, scale, trans_a, out_dtype)


@gather_mm.register_fake
def _(a, idx, amask, b, scale, trans_a, out_dtype, backend):
    rows = idx.shape[0] if idx is not None else a.shape[0]
    m = a.shape[1] if trans_a else rows
    return b.new_empty((m, b.shape[1]), dtype=out_dtype)


@torch.library.custom_op("sort_fast::masked_gather_mm", mutates_args=())
def masked_gather_mm(mask: torch.Tensor, classes: torch.Tensor, w2: torch.Tensor,
                     w1: torch.Tensor, backend: str) -> torch.Tensor:
    """``g = (M * W2[c]) @ W1``: ``M [T, H]``, ``c [T]``, ``W2 [A, H]``, ``W1 [H, D]`` ->
    ``[T, D]``. ``M`` (a ReLU indicator times a dropout mask) is piecewise constant: it gets
    no gradient."""
    return gather_mm(w2, classes, mask, w1, None, False, w1.dtype, backend)


@masked_gather_mm.register_fake
def _(mask, classes, w2, w1, backend):
    return w1.new_empty((classes.shape[0], w1.shape[1]))


def _masked_setup(ctx, inputs, output):
    mask, classes, w2, w1, backend = inputs
    ctx.save_for_backward(mask, classes, w2, w1)
    ctx.backend = backend


def _masked_backward(ctx, grad_g):
    mask, classes, w2, w1 = ctx.saved_tensors
    grad_w2 = grad_w1 = None
    if ctx.needs_input_grad[3]:  # dL/dW1 = V^T U
        grad_w1 = gather_mm(w2, classes, mask, grad_g, None, True, w1.dtype, ctx.backend)
    if ctx.needs_input_grad[2]:  # dL/dW2[c_t] += M_t * (U W1^T)_t, scatter-added by class
        acc = torch.promote_types(w2.dtype, torch.float32)
        rows = gather_mm(grad_g, None, None, w1.t(), mask, False, acc, ctx.backend)
        grad_w2 = torch.zeros(w2.shape, dtype=acc, device=w2.device)
        grad_w2 = grad_w2.index_add_(0, classes, rows).to(w2.dtype)
    return None, None, grad_w2, grad_w1, None


masked_gather_mm.register_autograd(_masked_backward, setup_context=_masked_setup)
