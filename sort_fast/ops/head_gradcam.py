"""Closed-form batched Grad-CAM of common classifier heads (docs/math.md).

``head_gradcam(head, h, classes)`` returns the scores of ``head(h)`` and, per row, the gradient
``g_t = d scores[t, c_t] / d h_t`` as a differentiable tensor. For a ReLU MLP head
``y = W2 · dropout(relu(W1 h + b1)) + b2`` it is ``g = V · W1`` with ``V_t = M_t * W2[c_t]``,
where ``M`` is the ReLU indicator times the dropout mask (scaled by ``1/(1-p)``) of this very
forward pass. The product runs as one fused "masked row-gather matmul" (a Triton kernel on CUDA,
PyTorch elsewhere) whose backward is written by hand; heads without a closed form fall back to
``torch.autograd.grad(..., create_graph=True)``. A decoder's final norm and LM head rows
(``AnswerTokenHead``) have ``g = J_norm(h)^T (gamma * W[c])``, the norm's Jacobian applied to one
weight row, without the ``[T, V]`` vocabulary logits. Which heads have a closed form:
:mod:`sort_fast.ops.head_structure`; the ops: :mod:`sort_fast.ops.gather_mm` and
:mod:`sort_fast.ops.norm_act_gradcam`.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import class_range
from . import triton_available
from .gather_mm import masked_gather_mm
from .head_structure import HeadTerm, closed_form_terms, norm_kind
from .norm_act_gradcam import norm_act_gradcam

__all__ = ["head_gradcam", "check_classes", "check_class_range"]

_BACKENDS = ("auto", "torch", "triton")
_warned: set = set()


def check_classes(classes: torch.Tensor, num_rows: int, device: torch.device) -> None:
    """``classes`` must be an int64 ``[num_rows]`` tensor on ``device`` (TypeError/ValueError)."""
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"classes must be a torch.Tensor, got {type(classes).__name__}")
    if classes.dtype != torch.int64:
        raise TypeError(f"classes must be int64, got {classes.dtype}")
    if classes.shape != (num_rows,):
        raise ValueError(
            f"classes must have shape [{num_rows}] (one class per row), got {tuple(classes.shape)}"
        )
    if classes.device != device:
        raise ValueError(f"classes is on {classes.device} but the data is on {device}")


def check_class_range(classes: torch.Tensor, num_classes: int) -> None:
    """Every class must index one of the ``num_classes`` scores: one host sync, none when the
    range of this very tensor is known (:func:`sort_fast.layout.class_range`), no check inside
    ``torch.compile``."""
    if classes.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = class_range(classes)
    if lo < 0 or hi >= num_classes:
        bad = int(((classes < 0) | (classes >= num_classes)).nonzero()[0, 0])
        raise ValueError(
            f"classes[{bad}]={int(classes[bad])} is outside [0, {num_classes}) (the head has "
            f"{num_classes} outputs)"
        )


def _check_inputs(head: nn.Module, h: torch.Tensor, classes: torch.Tensor, backend: str) -> None:
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"h must be a floating-point tensor, got {h.dtype}")
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D [T, D], got shape {tuple(h.shape)}")
    check_classes(classes, h.shape[0], h.device)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _resolve_backend(backend: str, h: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if h.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package")
    return backend


def _autograd_gradcam(
    head: nn.Module, h: torch.Tensor, classes: torch.Tensor, times_input: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_enabled = torch.is_grad_enabled()
    with torch.enable_grad():
        x = h if h.requires_grad else h.detach().requires_grad_()
        scores = head(x)
        if scores.dim() != 2 or scores.shape[0] != h.shape[0]:
            raise ValueError(f"head(h) must have shape [{h.shape[0]}, A], got "
                             f"{tuple(scores.shape)}")
        check_class_range(classes, scores.shape[1])
        (g,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), x,
                                   create_graph=grad_enabled)
    out = g * x if times_input else g
    return (scores, out) if grad_enabled else (scores.detach(), out.detach())


def _term_gradcam(
    term: HeadTerm, h: torch.Tensor, classes: torch.Tensor, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[T, A]`` and ``dy_c/dh [T, D]`` of one term of a head."""
    if term.input_linear is None:
        return _norm_first_gradcam(term, h, classes)
    # the effective weights: parametrisations (weight norm) stay in the graph
    w1 = term.input_linear.weight
    w2 = term.output_linear.weight if term.output_linear is not None else w1
    autocast = _autocast_enabled(h)
    if not autocast and (w1.dtype != h.dtype or w2.dtype != h.dtype):
        raise TypeError(f"h is {h.dtype} but the head's weights are {w1.dtype}/{w2.dtype}")
    z = F.linear(h, w1, term.input_linear.bias)  # under autocast: in the autocast dtype
    if autocast:  # the products run in the dtype autocast gives nn.Linear
        w1, w2 = w1.to(z.dtype), w2.to(z.dtype)
    if term.output_linear is None:  # g = W[c] (docs/math.md)
        return z, w1.index_select(0, classes)
    if term.norm is not None or term.activation != "relu":
        return _smooth_term_gradcam(term, z, classes, w1, w2)
    mask = (z > 0).to(z.dtype)
    dropout = _dropout_mask(term.dropout, z)
    if dropout is not None:
        mask = mask * dropout
    scores = F.linear(z * mask, w2, term.output_linear.bias)
    return scores, masked_gather_mm(mask, classes, w2, w1, backend)


def _autocast_enabled(h: torch.Tensor) -> bool:
    device_type = h.device.type  # a device without autocast (meta) cannot be asked about it
    return (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type))


def _norm_args(norm: Optional[nn.Module], acc: torch.dtype, with_beta: bool = True
               ) -> Tuple[str, float, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(norm, eps, gamma, beta)`` of :func:`norm_act_gradcam` for a term's ``norm``, the
    affine parameters in ``acc``. An RMSNorm without ``eps`` uses, as ``F.rms_norm`` does, the
    machine epsilon of the dtype it computes in (``acc``: float32 for half inputs)."""
    kind = norm_kind(norm)
    if norm is None:
        return kind, 0.0, None, None
    eps = norm.eps if norm.eps is not None else torch.finfo(acc).eps
    gamma = norm.weight.to(acc) if norm.weight is not None else None
    bias = getattr(norm, "bias", None) if with_beta else None
    return kind, eps, gamma, bias.to(acc) if bias is not None else None


def _norm_first_gradcam(
    term: HeadTerm, h: torch.Tensor, classes: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores and ``g`` of a decoder's final norm and LM head rows (docs/math.md):
    ``y = F.linear(norm(h), W[answer_tokens], b[answer_tokens])`` and ``g = J^T (gamma *
    W[answer_tokens[c]])``, ``J`` the norm's Jacobian (:func:`norm_act_gradcam`, identity
    activation). Only the ``A`` answer rows of the LM head are ever multiplied: no ``[T, V]``
    logits. ``g`` is in ``h``'s dtype, as autograd's would be."""
    norm, out = term.norm, term.output_linear
    weight, bias = out.weight, out.bias  # the effective weights (parametrisations stay)
    if term.answer_tokens is not None:
        weight = weight.index_select(0, term.answer_tokens)
        bias = None if bias is None else bias.index_select(0, term.answer_tokens)
    dtypes = {weight.dtype} | ({norm.weight.dtype} if norm.weight is not None else set())
    autocast = _autocast_enabled(h)
    if not autocast and dtypes != {h.dtype}:
        raise TypeError(f"h is {h.dtype} but the head's weights are "
                        f"{'/'.join(sorted(map(str, dtypes)))}")
    scores = F.linear(norm(h), weight, bias)  # under autocast: in the autocast dtype
    acc = torch.promote_types(h.dtype, torch.float32)
    rows = weight.index_select(0, classes)
    if autocast:  # the row as autocast's nn.Linear multiplies it
        rows = rows.to(scores.dtype)
    kind, eps, gamma, _ = _norm_args(norm, acc, with_beta=False)  # beta: no say in dy/dh
    E = norm_act_gradcam(h.to(acc), gamma, None, rows.to(acc), eps, kind, "identity")
    return scores, E.to(h.dtype)


def _dropout_mask(drop: Optional[nn.Dropout], like: torch.Tensor) -> Optional[torch.Tensor]:
    """This forward's dropout mask (scaled by ``1/(1-p)``), drawn by the module itself so that
    the RNG use matches ``head(h)``; None when dropout is off."""
    if drop is None or not drop.training or drop.p == 0:
        return None
    return drop(torch.ones_like(like))


def _smooth_term_gradcam(
    term: HeadTerm, z: torch.Tensor, classes: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores and ``g = E @ W1`` of ``Linear -> [LayerNorm|RMSNorm] -> ReLU|GELU -> [Dropout]
    -> Linear`` (docs/math.md): ``E`` (:func:`norm_act_gradcam`, one op with a hand-written
    backward) back-propagates ``mask * W2[c]`` through the activation's slope and the
    norm's Jacobian; the scores take PyTorch's fused norm and GELU."""
    acc = torch.promote_types(z.dtype, torch.float32)
    norm = term.norm
    a = z if norm is None else norm(z)  # a plain nn.LayerNorm / nn.RMSNorm
    s = {"relu": F.relu, "gelu": F.gelu,
         "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[term.activation](a)
    mask = _dropout_mask(term.dropout, s)
    scores = F.linear(s if mask is None else s * mask, w2, term.output_linear.bias)
    rows = w2.index_select(0, classes).to(acc)
    rows = rows if mask is None else rows * mask.to(acc)
    kind, eps, gamma, beta = _norm_args(norm, acc)
    E = norm_act_gradcam(z.to(acc), gamma, beta, rows, eps, kind, term.activation)
    return scores, E.to(w1.dtype) @ w1


def head_gradcam(
    head: nn.Module,
    h: torch.Tensor,
    classes: torch.Tensor,
    *,
    backend: str = "auto",
    times_input: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores and per-row Grad-CAM gradient of a classifier head (docs/math.md).

    ``h [T, D]`` floating, ``classes [T]`` int64 -> ``(scores [T, A], grad [T, D])`` with
    ``scores = head(h)`` and ``grad[t] = d scores[t, classes[t]] / d h[t]`` (or the Grad-CAM
    vector ``grad * h`` when ``times_input``), differentiable w.r.t. ``h`` and the head's
    parameters as ``torch.autograd.grad(..., create_graph=True)`` would be (once).

    Closed form for ``nn.Linear``, ``Linear -> [LayerNorm|RMSNorm] -> ReLU|GELU -> [Dropout] ->
    Linear`` (GELU exact or tanh; a ViLT/BERT-style answer head), a decoder's final norm and LM
    head ``Sequential(LayerNorm|RMSNorm, Linear)`` or ``AnswerTokenHead(norm, lm_head,
    answer_tokens)`` (only the answer rows of the LM head are used, never ``[T, V]`` logits),
    nested ``nn.Sequential`` allowed, weights may be parametrised (e.g. weight norm), and
    ``BranchSum`` of those. The norms are the stock ``nn.LayerNorm`` and ``nn.RMSNorm``
    (transformers' ``LlamaRMSNorm``, which computes in float32, is not recognised); any other
    head, or a module with hooks, falls back to autograd with a one-time warning. ``backend``:
    ``"triton"`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` or
    ``"auto"`` (Triton on CUDA).
    """
    _check_inputs(head, h, classes, backend)
    terms = closed_form_terms(head)
    if isinstance(terms, str):
        key = (type(head).__name__, terms)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"head_gradcam: no closed form for {type(head).__name__}: {terms}; "
                "falling back to autograd with create_graph=True",
                stacklevel=2,
            )
        return _autograd_gradcam(head, h, classes, times_input)
    for term in terms:
        if term.in_features != h.shape[1]:
            raise ValueError(f"h has {h.shape[1]} features but the head expects "
                             f"{term.in_features}")
    check_class_range(classes, terms[0].out_features)
    backend = _resolve_backend(backend, h)
    scores, grad = _term_gradcam(terms[0], h, classes, backend)
    for term in terms[1:]:
        s, g = _term_gradcam(term, h, classes, backend)
        scores, grad = scores + s, grad + g
    # G = g * h through autograd: dL/dh = dL/dG * g, dL/dg = dL/dG * h (docs/math.md)
    return scores, grad * h if times_input else grad
