"""Closed-form batched Grad-CAM of common classifier heads (docs/math.md).

``head_gradcam(head, h, classes)`` returns the scores of ``head(h)`` and, per row, the gradient
``g_t = d scores[t, c_t] / d h_t`` as a differentiable tensor. For a ReLU MLP head
``y = W2 · dropout(relu(W1 h + b1)) + b2`` it is ``g = V · W1`` with ``V_t = M_t * W2[c_t]``,
where ``M`` is the ReLU indicator times the dropout mask (scaled by ``1/(1-p)``) of this very
forward pass. The product runs as one fused "masked row-gather matmul" (a Triton kernel on CUDA,
PyTorch elsewhere) whose backward is written by hand; heads without a closed form fall back to
``torch.autograd.grad(..., create_graph=True)``.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import BranchSum
from ..layout import class_range
from . import triton_available

__all__ = ["head_gradcam"]

_BACKENDS = ("auto", "torch", "triton")
_warned: set = set()


def _gather_mm_torch(
    a: torch.Tensor, idx: Optional[torch.Tensor], amask: Optional[torch.Tensor],
    b: torch.Tensor, scale: Optional[torch.Tensor], trans_a: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
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
        impl = _gather_mm_torch
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


# --------------------------------------------------------------------------- head structure


@dataclass
class _Term:
    """``y = second(dropout(act(norm(first(h)))))``, or ``y = first(h)`` when ``second`` is
    None; ``norm`` an optional LayerNorm, ``activation`` ``"relu"``, ``"gelu"`` (exact) or
    ``"gelu_tanh"``."""

    first: nn.Linear
    dropout: Optional[nn.Dropout] = None
    second: Optional[nn.Linear] = None
    norm: Optional[nn.LayerNorm] = None
    activation: str = "relu"


def _plain(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` (parametrised or not) with its stock forward and no hooks."""
    return (
        isinstance(module, cls)
        and type(module).forward is cls.forward
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _flatten(module: nn.Module) -> Iterator[nn.Module]:
    if type(module) is nn.Sequential and not module._forward_hooks and not module._forward_pre_hooks:
        for child in module:
            yield from _flatten(child)
    elif not _plain(module, nn.Identity):
        yield module


def _terms(head: nn.Module) -> Union[List[_Term], str]:
    """The closed-form terms of ``head`` summed by its forward, or why there is none."""
    if _plain(head, BranchSum):
        terms: List[_Term] = []
        for branch in head.branches:
            sub = _terms(branch)
            if isinstance(sub, str):
                return sub
            terms.extend(sub)
        return terms
    layers = list(_flatten(head))
    code = {nn.Linear: "L", nn.ReLU: "R", nn.GELU: "G", nn.LayerNorm: "N", nn.Dropout: "D"}
    pattern = ""
    for layer in layers:
        kind = next((k for k in code if _plain(layer, k)), None)
        if kind is None:
            return f"module type {type(layer).__name__} is not recognised (or has hooks)"
        pattern += code[kind]
    by_kind = dict(zip(pattern[1:-1], layers[1:-1]))
    if pattern == "L":
        return [_Term(layers[0])]
    # Linear [LayerNorm] activation [Dropout] Linear; dropout may also precede a ReLU, with
    # which it commutes (the mask is >= 0), but not a GELU
    if re.fullmatch(r"LN?(RD?|DR|GD?)L", pattern):
        norm = by_kind.get("N")
        if norm is not None and (len(norm.normalized_shape) != 1
                                 or norm.normalized_shape[0] != layers[0].out_features):
            return f"LayerNorm over {tuple(norm.normalized_shape)} is not over the last dim"
        activation = "relu"
        if "G" in by_kind:
            activation = "gelu" if by_kind["G"].approximate == "none" else "gelu_tanh"
        return [_Term(layers[0], by_kind.get("D"), layers[-1], norm, activation)]
    names = [type(layer).__name__ for layer in layers]
    return (f"the layer sequence {names} is not Linear[-LayerNorm]-ReLU|GELU-[Dropout]-Linear")


# --------------------------------------------------------------------------- entry point


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
            raise ValueError(f"head(h) must have shape [{h.shape[0]}, A], got {tuple(scores.shape)}")
        check_class_range(classes, scores.shape[1])
        (g,) = torch.autograd.grad(scores.gather(1, classes[:, None]).sum(), x, create_graph=grad_enabled)
    out = g * x if times_input else g
    return (scores, out) if grad_enabled else (scores.detach(), out.detach())


def _term_gradcam(
    term: _Term, h: torch.Tensor, classes: torch.Tensor, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    w1 = term.first.weight  # the effective weight: parametrisations (weight norm) stay in the graph
    w2 = term.second.weight if term.second is not None else w1
    autocast = torch.is_autocast_enabled(h.device.type)
    if not autocast and (w1.dtype != h.dtype or w2.dtype != h.dtype):
        raise TypeError(f"h is {h.dtype} but the head's weights are {w1.dtype}/{w2.dtype}")
    z = F.linear(h, w1, term.first.bias)  # under autocast: in the autocast dtype
    if autocast:  # the products run in the dtype autocast gives nn.Linear
        w1, w2 = w1.to(z.dtype), w2.to(z.dtype)
    if term.second is None:  # g = W[c] (docs/math.md)
        return z, w1.index_select(0, classes)
    if term.norm is not None or term.activation != "relu":
        return _smooth_term_gradcam(term, z, classes, w1, w2)
    mask = (z > 0).to(z.dtype)
    dropout = _dropout_mask(term.dropout, z)
    if dropout is not None:
        mask = mask * dropout
    scores = F.linear(z * mask, w2, term.second.bias)
    return scores, masked_gather_mm(mask, classes, w2, w1, backend)


def _dropout_mask(drop: Optional[nn.Dropout], like: torch.Tensor) -> Optional[torch.Tensor]:
    """This forward's dropout mask (scaled by ``1/(1-p)``), drawn by the module itself so that
    the RNG use matches ``head(h)``; None when dropout is off."""
    if drop is None or not drop.training or drop.p == 0:
        return None
    return drop(torch.ones_like(like))


_GELU_K, _GELU_C = math.sqrt(2.0 / math.pi), 0.044715


def _act_slopes(a: torch.Tensor, activation: str, second: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``act'(a)`` and, with ``second``, ``act''(a)`` (else None) for ReLU, GELU (exact) and
    GELU (tanh) (docs/math.md)."""
    if activation == "relu":
        return (a > 0).to(a.dtype), torch.zeros_like(a) if second else None
    if activation == "gelu_tanh":  # act(a) = 0.5 a (1 + t), t = tanh(k (a + c a^3))
        inner = 1 + 3 * _GELU_C * a * a
        t = torch.tanh(_GELU_K * (a + _GELU_C * a.pow(3)))
        dt = (1 - t * t) * _GELU_K * inner  # dt/da
        slope = 0.5 * (1 + t) + 0.5 * a * dt
        if not second:
            return slope, None
        d2t = -2 * t * dt * _GELU_K * inner + (1 - t * t) * _GELU_K * 6 * _GELU_C * a
        return slope, dt + 0.5 * a * d2t
    pdf = torch.exp(-0.5 * a * a) * (1 / math.sqrt(2 * math.pi))  # act(a) = a Phi(a)
    slope = 0.5 * (1 + torch.erf(a * (1 / math.sqrt(2.0)))) + a * pdf
    return slope, pdf * (2 - a * a) if second else None


def _norm_rows(z: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``u = (z - mean) / sigma`` per row and ``sigma [T, 1] = sqrt(var + eps)``."""
    sigma = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    return (z - z.mean(-1, keepdim=True)) / sigma, sigma


def _centre(x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(x - mean(x) - u mean(x u)) / sigma`` per row: the transposed Jacobian of the row
    normalisation applied to ``x``."""
    return (x - x.mean(-1, keepdim=True) - u * (x * u).mean(-1, keepdim=True)) / sigma


def _affine(u: torch.Tensor, gamma: Optional[torch.Tensor],
            beta: Optional[torch.Tensor]) -> torch.Tensor:
    a = u * gamma if gamma is not None else u
    return a + beta if beta is not None else a


@torch.library.custom_op("sort_fast::norm_act_gradcam", mutates_args=())
def norm_act_gradcam(
    z: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
    rows: torch.Tensor, eps: float, normalize: bool, activation: str,
) -> torch.Tensor:
    """``E = dy_c/dz [T, H]`` of ``y = rows . act(LayerNorm(z))`` per row (``rows`` the
    gathered, dropout-masked ``W2[c]``; without ``normalize`` the LayerNorm is absent)
    (docs/math.md). Its backward is hand-written and recomputes the normalisation from ``z``,
    which the scores' LayerNorm keeps anyway: nothing of size ``[T, H]`` is saved twice."""
    if not normalize:
        return _act_slopes(z, activation)[0] * rows
    u, sigma = _norm_rows(z, eps)
    w = _act_slopes(_affine(u, gamma, beta), activation)[0] * rows
    return _centre(w * gamma if gamma is not None else w, u, sigma)


@norm_act_gradcam.register_fake
def _(z, gamma, beta, rows, eps, normalize, activation):
    return torch.empty_like(z)


def _norm_act_setup(ctx, inputs, output):
    z, gamma, beta, rows, eps, normalize, activation = inputs
    ctx.save_for_backward(z, output, gamma, beta, rows)
    ctx.eps, ctx.normalize, ctx.activation = eps, normalize, activation


def _norm_act_backward(ctx, grad_e):
    """Hand-written backward of :func:`norm_act_gradcam` (docs/math.md): through ``w =
    gamma * act'(a) * rows``, ``a = gamma * u + beta`` and ``u = (z - mean) / sigma``."""
    z, E, gamma, beta, rows = ctx.saved_tensors
    if not ctx.normalize:
        slope, curve = _act_slopes(z, ctx.activation, second=True)
        return grad_e * rows * curve, None, None, grad_e * slope, None, None, None
    u, sigma = _norm_rows(z, ctx.eps)
    slope, curve = _act_slopes(_affine(u, gamma, beta), ctx.activation, second=True)
    grad_w = _centre(grad_e, u, sigma)
    w = slope * rows
    grad_gamma = (grad_w * w).sum(0) if gamma is not None else None  # w's own gamma factor
    if gamma is not None:
        w.mul_(gamma)
        grad_w_scaled = grad_w * gamma
    else:
        grad_w_scaled = grad_w
    # E = centre(w): its direct dependence on u and sigma
    grad_u = (grad_e * (w * u).mean(-1, keepdim=True)).addcmul_(
        w, (grad_e * u).mean(-1, keepdim=True)).div_(-sigma)
    del w
    grad_sigma = (grad_e * E).sum(-1, keepdim=True).div_(-sigma)
    grad_rows = grad_w_scaled * slope
    grad_a = grad_w_scaled.mul_(rows).mul_(curve)  # through act'(a)
    del slope, curve
    if gamma is not None:
        grad_gamma += (grad_a * u).sum(0)
        grad_u.addcmul_(grad_a, gamma)
    else:
        grad_u.add_(grad_a)
    grad_beta = grad_a.sum(0) if beta is not None else None
    grad_z = _centre(grad_u, u, sigma).add_(u * (grad_sigma / u.shape[-1]))
    return grad_z, grad_gamma, grad_beta, grad_rows, None, None, None


norm_act_gradcam.register_autograd(_norm_act_backward, setup_context=_norm_act_setup)


def _smooth_term_gradcam(term: _Term, z: torch.Tensor, classes: torch.Tensor,
                         w1: torch.Tensor, w2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores and ``g = E @ W1`` of ``Linear -> [LayerNorm] -> ReLU|GELU -> [Dropout] ->
    Linear`` (docs/math.md): ``E`` (:func:`norm_act_gradcam`, one op with a hand-written
    backward) back-propagates ``mask * W2[c]`` through the activation's slope and the
    LayerNorm's Jacobian; the scores take PyTorch's fused LayerNorm and GELU."""
    acc = torch.promote_types(z.dtype, torch.float32)
    norm = term.norm
    a = z if norm is None else F.layer_norm(z, norm.normalized_shape, norm.weight, norm.bias,
                                            norm.eps)
    s = {"relu": F.relu, "gelu": F.gelu,
         "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[term.activation](a)
    mask = _dropout_mask(term.dropout, s)
    scores = F.linear(s if mask is None else s * mask, w2, term.second.bias)
    rows = w2.index_select(0, classes).to(acc)
    rows = rows if mask is None else rows * mask.to(acc)
    cast = (lambda t: None if t is None else t.to(acc))
    E = norm_act_gradcam(z.to(acc), cast(norm.weight) if norm is not None else None,
                         cast(norm.bias) if norm is not None else None, rows,
                         norm.eps if norm is not None else 0.0, norm is not None,
                         term.activation)
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

    Closed form for ``nn.Linear``, ``Linear -> [LayerNorm] -> ReLU|GELU -> [Dropout] -> Linear``
    (GELU exact or tanh; a ViLT/BERT-style answer head; nested
    ``nn.Sequential`` allowed, weights may be parametrised, e.g. weight norm) and ``BranchSum``
    of those; any other head falls back to autograd with a one-time warning. ``backend``:
    ``"triton"`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` or
    ``"auto"`` (Triton on CUDA).
    """
    _check_inputs(head, h, classes, backend)
    terms = _terms(head)
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
        if term.first.in_features != h.shape[1]:
            raise ValueError(f"h has {h.shape[1]} features but the head expects {term.first.in_features}")
    last = terms[0].second or terms[0].first
    check_class_range(classes, last.out_features)
    backend = _resolve_backend(backend, h)
    scores, grad = _term_gradcam(terms[0], h, classes, backend)
    for term in terms[1:]:
        s, g = _term_gradcam(term, h, classes, backend)
        scores, grad = scores + s, grad + g
    # G = g * h through autograd: dL/dh = dL/dG * g, dL/dg = dL/dG * h (docs/math.md)
    return scores, grad * h if times_input else grad
