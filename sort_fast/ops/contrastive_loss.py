"""Grad-CAM cosine similarity and the contrastive gradient loss over packed groups.

docs/math.md (Grad-CAM vector ``G = grad * act``, cosine, loss and gradients) and docs/ops.md
(packed layout, the ops). Three ``torch.library`` custom ops in the ``sort_fast`` namespace,
each with a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces them:

- ``sort_fast::contrastive_loss_fwd``: per-group loss, plus the per-row statistics the
  backward needs (cosine, norm, ``dL/dc``);
- ``sort_fast::gradcam_similarity_fwd``: the cosines (and norms);
- ``sort_fast::gradcam_cosine_bwd``: ``dL/dgrad``, ``dL/dact`` of both (registered as their
  autograd formula; it has no autograd of its own: the ops are differentiable once).

A static ``backend`` argument picks the implementation: ``"triton"`` (fused kernels,
:mod:`sort_fast.ops.contrastive_loss_kernels`, on CUDA, or CPU tensors under
``TRITON_INTERPRET=1``) or ``"torch"`` (vectorised PyTorch for the CPU, no Python loop over
groups, :mod:`sort_fast.ops.contrastive_loss_torch`).
"""
from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any, Optional, Tuple, Union

import torch

from ..layout import validate_layout
from . import contrastive_loss_torch, triton_available
from .accumulation import accumulation_dtype

__all__ = [
    "contrastive_gradient_loss",
    "counted_groups",
    "gradcam_similarity",
    "ContrastiveGradientLoss",
]

# a gradient tensor, a (grad, act) pair or a GradCAM (see gradcam_inputs)
GradCAMSource = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], Any]
MODES = ("contrastive", "sq_only")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _backend_module(name: str) -> ModuleType:
    """The host functions ``forward``/``backward`` of backend ``name``: the Triton kernels'
    module is imported on first use (it needs ``TRITON_INTERPRET`` set before import)."""
    if name == "torch":
        return contrastive_loss_torch
    from . import contrastive_loss_kernels

    return contrastive_loss_kernels


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sort_fast::contrastive_loss_fwd", mutates_args=())
def contrastive_loss_fwd(
    grad: torch.Tensor, act: torch.Tensor, offsets: torch.Tensor, num_sub: torch.Tensor,
    margin: float, eps: float, contrastive: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad``/``act [T, D]`` contiguous -> ``(loss [N], cos [T], norm [T], dL/dc [T])`` in
    the accumulation dtype; the layout must be valid (not checked here)."""
    cos, norm, weight, loss = _backend_module(backend).forward(
        grad, act, offsets, num_sub, margin, eps, contrastive)
    return loss, cos, norm, weight


@contrastive_loss_fwd.register_fake
def _(grad, act, offsets, num_sub, margin, eps, contrastive, backend):
    acc = accumulation_dtype(grad.dtype, act.dtype)
    rows = grad.new_empty(grad.shape[0], dtype=acc)
    return num_sub.new_empty(num_sub.shape[0], dtype=acc), rows, torch.empty_like(rows), \
        torch.empty_like(rows)


@torch.library.custom_op("sort_fast::gradcam_similarity_fwd", mutates_args=())
def gradcam_similarity_fwd(grad: torch.Tensor, act: torch.Tensor, offsets: torch.Tensor,
                           eps: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``grad``/``act [T, D]`` contiguous -> ``(cos [T], norm [T])``."""
    cos, norm, _, _ = _backend_module(backend).forward(grad, act, offsets, None, 0.0, eps, True)
    return cos, norm


@gradcam_similarity_fwd.register_fake
def _(grad, act, offsets, eps, backend):
    rows = grad.new_empty(grad.shape[0], dtype=accumulation_dtype(grad.dtype, act.dtype))
    return rows, torch.empty_like(rows)


@torch.library.custom_op("sort_fast::gradcam_cosine_bwd", mutates_args=())
def gradcam_cosine_bwd(
    grad: torch.Tensor, act: torch.Tensor, offsets: torch.Tensor, cos: torch.Tensor,
    norm: torch.Tensor, row_weight: torch.Tensor, group_scale: Optional[torch.Tensor],
    eps: float, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dgrad, dL/dact)`` (``[T, D]``, dtypes of ``grad``/``act``) given
    ``dL/dc = row_weight [T] * group_scale [N]`` (no scale: 1)."""
    return _backend_module(backend).backward(grad, act, offsets, cos, norm, row_weight,
                                             group_scale, eps)


@gradcam_cosine_bwd.register_fake
def _(grad, act, offsets, cos, norm, row_weight, group_scale, eps, backend):
    return torch.empty_like(grad), torch.empty_like(act)


def _loss_setup(ctx, inputs, output):
    grad, act, offsets, _, _, eps, _, backend = inputs
    _, cos, norm, weight = output
    ctx.save_for_backward(grad, act, offsets, cos, norm, weight)
    ctx.eps, ctx.backend = eps, backend


def _loss_backward(ctx, dloss, dcos, dnorm, dweight):
    grad, act, offsets, cos, norm, weight = ctx.saved_tensors
    dgrad, dact = gradcam_cosine_bwd(grad, act, offsets, cos, norm, weight,
                                     dloss.to(weight.dtype).contiguous(), ctx.eps, ctx.backend)
    return dgrad, dact, None, None, None, None, None, None


contrastive_loss_fwd.register_autograd(_loss_backward, setup_context=_loss_setup)


def _similarity_setup(ctx, inputs, output):
    grad, act, offsets, eps, backend = inputs
    cos, norm = output
    ctx.save_for_backward(grad, act, offsets, cos, norm)
    ctx.eps, ctx.backend = eps, backend


def _similarity_backward(ctx, dcos, dnorm):
    grad, act, offsets, cos, norm = ctx.saved_tensors
    dgrad, dact = gradcam_cosine_bwd(grad, act, offsets, cos, norm,
                                     dcos.to(cos.dtype).contiguous(), None, ctx.eps,
                                     ctx.backend)
    return dgrad, dact, None, None, None


gradcam_similarity_fwd.register_autograd(_similarity_backward, setup_context=_similarity_setup)


# ----------------------------------------------------------------------------- checks
def check_number(name: str, value: float, *, positive: bool = False,
                 non_negative: bool = False) -> None:
    """``value`` must be a finite real number (and > 0 or >= 0 when asked): ``ValueError``
    naming ``name`` otherwise. Not looked at inside ``torch.compile``, where Python floats
    become symbolic."""
    if torch.compiler.is_compiling():
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


def gradcam_inputs(grad: Any, act: Any, *layout: Any) -> Tuple[Any, Any, Tuple[Any, ...]]:
    """``(grad, act, layout)`` from either calling convention of the loss functions:
    ``f(grad, act, offsets, ...)`` or ``f(source, offsets, ...)`` where ``source`` is a
    :class:`~sort_fast.GradCAM` (after ``vectors()``) or a ``(grad, act)`` pair. In the second
    form the layout arguments arrive one position early and are shifted back."""
    if isinstance(grad, torch.Tensor) or grad is None:
        return grad, act, layout
    if isinstance(grad, tuple) and len(grad) == 2:
        pair = grad
    elif hasattr(grad, "gradient") and hasattr(grad, "activation"):  # a GradCAM
        pair = (grad.gradient, grad.activation)
    else:
        raise TypeError(f"grad must be a tensor, a (grad, act) pair or a GradCAM, got "
                        f"{type(grad).__name__}")
    if layout and layout[-1] is not None:
        raise TypeError("with a GradCAM or a (grad, act) pair, pass the layout next: "
                        "f(cam, offsets, num_sub)")
    return pair[0], pair[1], (act, *layout[:-1])


def _flat(name: str, t: Any) -> torch.Tensor:
    """``t`` as ``[T, D]``: activations of any shape ``[T, ...]`` (a conv map ``[T, C, H, W]``)
    are flattened per row."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must be [T, D] (or [T, ...], flattened), got shape "
                         f"{tuple(t.shape)}")
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def _check_pair(grad: torch.Tensor, act: torch.Tensor, eps: float, backend: str) -> str:
    """dtypes, devices, width, ``eps`` and ``backend`` of same-shape ``[T, D]`` ``grad`` and
    ``act`` (:func:`_prepare` compares the shapes); returns the backend to use."""
    for name, t in (("grad", grad), ("act", act)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if grad.device != act.device:
        raise ValueError(f"grad is on {grad.device} but act is on {act.device}")
    if grad.shape[1] == 0:
        raise ValueError("grad and act have no columns (D = 0)")
    check_number("eps", eps, positive=True)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if grad.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if not grad.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import"
            )
    return backend


def _prepare(grad, act, offsets, num_sub, eps, backend):
    """Checked ``(grad [T, D], act [T, D], backend)``; the layout is validated."""
    flat_grad, flat_act = _flat("grad", grad), _flat("act", act)
    if grad.shape != act.shape:  # compared before flattening
        raise ValueError(f"grad {tuple(grad.shape)} and act {tuple(act.shape)} differ in shape")
    grad, act = flat_grad, flat_act
    backend = _check_pair(grad, act, eps, backend)
    if offsets is None:
        raise TypeError("offsets is required (the packed layout, docs/ops.md)")
    validate_layout(offsets, num_sub, grad.shape[0], device=grad.device)
    return grad, act, backend


# ----------------------------------------------------------------------------- functional API
def gradcam_similarity(
    grad: GradCAMSource,
    act: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """Cosine of every row's Grad-CAM vector ``grad * act`` with its group's reasoning row.

    Args:
        grad, act: ``[T, D]`` float tensors (``dy_c/dA`` and ``A``), same device; any
            ``[T, ...]`` shape (a conv map ``[T, C, H, W]``) is flattened per row. Instead of
            the two, a :class:`~sort_fast.GradCAM` or a ``(grad, act)`` pair:
            ``gradcam_similarity(cam, offsets)``.
        offsets: ``[N+1]`` int64 group boundaries (docs/ops.md).
        eps: norm clamp, as in ``torch.nn.functional.cosine_similarity``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        ``[T]`` float32 (float64 for float64 inputs); 1 for each reasoning row. Differentiable.
    """
    grad, act, (offsets,) = gradcam_inputs(grad, act, offsets)
    grad, act, backend = _prepare(grad, act, offsets, None, eps, backend)
    cos, _ = gradcam_similarity_fwd(grad.contiguous(), act.contiguous(), offsets.contiguous(),
                                    float(eps), backend)
    return cos


def contrastive_gradient_loss(
    grad: GradCAMSource,
    act: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    num_sub: Optional[torch.Tensor] = None,
    *,
    margin: float = 0.0,
    mode: str = "contrastive",
    reduction: str = "mean",
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """Contrastive gradient loss of SOrT over packed groups (docs/math.md, paper Eq. 2).

    Args:
        grad, act: ``[T, D]`` float tensors; ``G = grad * act`` is the Grad-CAM vector. Any
            ``[T, ...]`` shape (a conv map ``[T, C, H, W]``) is flattened per row. Instead of
            the two, a :class:`~sort_fast.GradCAM` (after ``vectors()``) or a ``(grad, act)``
            pair: ``contrastive_gradient_loss(cam, offsets, num_sub)``.
        offsets: ``[N+1]`` int64; num_sub: ``[N]`` int64 (docs/ops.md).
        margin: hinge margin (``"contrastive"`` mode).
        mode: ``"contrastive"``: mean over (sub, irrelevant) pairs of
            ``max(0, margin + cos_irr - cos_sub)``; groups without irrelevant questions give 0
            and are not counted by ``"mean"``. ``"sq_only"``: mean over sub-questions of
            ``1 - cos_sub``.
        reduction: ``"mean"`` over counted groups (0 if none), ``"sum"`` or ``"none"`` (``[N]``).
        eps: norm clamp of the cosine.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        A scalar (or ``[N]``), float32 (float64 for float64 inputs).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_number("margin", margin)
    grad, act, (offsets, num_sub) = gradcam_inputs(grad, act, offsets, num_sub)
    grad, act, backend = _prepare(grad, act, offsets, num_sub, eps, backend)
    if num_sub is None:
        raise TypeError("num_sub is required (the packed layout, docs/ops.md)")
    contrastive = mode == "contrastive"
    per_group, _, _, _ = contrastive_loss_fwd(
        grad.contiguous(), act.contiguous(), offsets.contiguous(), num_sub.contiguous(),
        float(margin), float(eps), contrastive, backend)
    if reduction == "none":
        return per_group
    total = per_group.sum()
    if reduction == "sum":
        return total
    if not contrastive:
        return total / max(per_group.numel(), 1)
    # counted on the device (no host sync); with no counted group every loss is 0
    return total / counted_groups(offsets, num_sub, mode).sum().clamp_min(1)


def counted_groups(offsets: torch.Tensor, num_sub: torch.Tensor, mode: str) -> torch.Tensor:
    """``[N]`` bool: the groups that ``reduction="mean"`` of
    :func:`contrastive_gradient_loss` averages over (``offsets [N+1]``, ``num_sub [N]``): in
    ``"contrastive"`` mode those with at least one irrelevant question, in ``"sq_only"``
    mode every group."""
    if mode == "sq_only":
        return torch.ones_like(num_sub, dtype=torch.bool)
    return offsets[1:] - offsets[:-1] - 1 > num_sub


class ContrastiveGradientLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`contrastive_gradient_loss`."""

    def __init__(self, margin: float = 0.0, mode: str = "contrastive", reduction: str = "mean",
                 eps: float = 1e-8, backend: str = "auto") -> None:
        super().__init__()
        self.margin, self.mode, self.reduction, self.eps, self.backend = (
            margin, mode, reduction, eps, backend)

    def forward(self, grad: GradCAMSource, act: Optional[torch.Tensor] = None,
                offsets: Optional[torch.Tensor] = None,
                num_sub: Optional[torch.Tensor] = None) -> torch.Tensor:
        return contrastive_gradient_loss(grad, act, offsets, num_sub, margin=self.margin,
                                         mode=self.mode, reduction=self.reduction, eps=self.eps,
                                         backend=self.backend)
