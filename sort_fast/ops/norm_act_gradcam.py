"""``sort_fast::norm_act_gradcam``: ``dy_c/dz`` back through an optional row norm (LayerNorm or
RMSNorm) and an activation (ReLU, GELU or the identity), the inner step of the closed-form
Grad-CAM of a transformer answer head or of a decoder's final norm and LM head rows
(docs/math.md), a ``torch.library`` custom op with a fake implementation and a hand-written
backward, and the activation derivatives it uses."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["norm_act_gradcam", "NORMS", "ACTIVATIONS"]

_GELU_K, _GELU_C = math.sqrt(2.0 / math.pi), 0.044715
NORMS = ("none", "layer", "rms")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "identity")


def _act_slopes(a: torch.Tensor, activation: str, second: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``act'(a)`` and, with ``second``, ``act''(a)`` (else None) for ReLU, GELU (exact) and
    GELU (tanh) (docs/math.md). The identity is handled by the callers (slope 1, no curve)."""
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


def _norm_rows(z: torch.Tensor, eps: float, norm: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row, LayerNorm (``norm="layer"``): ``u = (z - mean) / sigma`` and ``sigma [T, 1] =
    sqrt(var + eps)``; RMSNorm (``"rms"``): ``u = z / sigma`` and ``sigma = sqrt(mean(z^2) +
    eps)``."""
    if norm == "rms":
        sigma = torch.sqrt(z.square().mean(-1, keepdim=True) + eps)
        return z / sigma, sigma
    centred = z - z.mean(-1, keepdim=True)
    sigma = torch.sqrt(centred.square().mean(-1, keepdim=True) + eps)
    return centred / sigma, sigma


def _centre(x: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor, norm: str) -> torch.Tensor:
    """The transposed (= the) Jacobian of the row normalisation applied to ``x`` per row:
    ``(x - mean(x) - u mean(x u)) / sigma`` (LayerNorm) or ``(x - u mean(x u)) / sigma``
    (RMSNorm)."""
    out = x - u * (x * u).mean(-1, keepdim=True)
    if norm == "layer":
        out = out - x.mean(-1, keepdim=True)
    return out / sigma


def _affine(u: torch.Tensor, gamma: Optional[torch.Tensor],
            beta: Optional[torch.Tensor]) -> torch.Tensor:
    a = u * gamma if gamma is not None else u
    return a + beta if beta is not None else a


def _check(norm: str, activation: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


@torch.library.custom_op("sort_fast::norm_act_gradcam", mutates_args=())
def norm_act_gradcam(
    z: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
    rows: torch.Tensor, eps: float, norm: str, activation: str,
) -> torch.Tensor:
    """``E = dy_c/dz [T, H]`` of ``y = rows . act(gamma * n(z) + beta)`` per row (docs/math.md):
    ``rows`` the gathered (dropout-masked) output weight rows ``W2[c]``; ``n`` the LayerNorm
    (``norm="layer"``) or RMSNorm (``"rms"``) normalisation with ``eps``, or absent
    (``"none"``: ``gamma``, ``beta`` unused); ``activation`` ``"relu"``, ``"gelu"``,
    ``"gelu_tanh"`` or ``"identity"`` (then ``beta`` does not matter). Its backward is
    hand-written and recomputes the normalisation from ``z``, which the scores' norm keeps
    anyway: nothing of size ``[T, H]`` is saved twice."""
    _check(norm, activation)
    identity = activation == "identity"
    if norm == "none":
        return rows.clone() if identity else _act_slopes(z, activation)[0] * rows
    u, sigma = _norm_rows(z, eps, norm)
    w = rows if identity else _act_slopes(_affine(u, gamma, beta), activation)[0] * rows
    return _centre(w * gamma if gamma is not None else w, u, sigma, norm)


@norm_act_gradcam.register_fake
def _(z, gamma, beta, rows, eps, norm, activation):
    _check(norm, activation)
    return torch.empty_like(z)


def _norm_act_setup(ctx, inputs, output):
    z, gamma, beta, rows, eps, norm, activation = inputs
    ctx.save_for_backward(z, output, gamma, beta, rows)
    ctx.eps, ctx.norm, ctx.activation = eps, norm, activation


def _norm_act_backward(ctx, grad_e):
    """Hand-written backward of :func:`norm_act_gradcam` (docs/math.md): through ``w =
    gamma * act'(a) * rows``, ``a = gamma * u + beta`` and ``u = (z - mean) / sigma``
    (LayerNorm) or ``u = z / sigma`` (RMSNorm). With the identity ``act' = 1``: nothing flows
    through ``a`` (``beta`` gets nothing)."""
    z, E, gamma, beta, rows = ctx.saved_tensors
    norm, identity = ctx.norm, ctx.activation == "identity"
    if norm == "none":
        if identity:
            return None, None, None, grad_e, None, None, None
        slope, curve = _act_slopes(z, ctx.activation, second=True)
        return grad_e * rows * curve, None, None, grad_e * slope, None, None, None
    u, sigma = _norm_rows(z, ctx.eps, norm)
    grad_w = _centre(grad_e, u, sigma, norm)
    if identity:
        slope = curve = None
        w = rows
    else:
        slope, curve = _act_slopes(_affine(u, gamma, beta), ctx.activation, second=True)
        w = slope * rows
    grad_gamma = (grad_w * w).sum(0) if gamma is not None else None  # w's own gamma factor
    if gamma is not None:
        w = w * gamma
        grad_w_scaled = grad_w * gamma
    else:
        grad_w_scaled = grad_w
    # E = centre(w): its direct dependence on u and sigma
    grad_u = (grad_e * (w * u).mean(-1, keepdim=True)).addcmul_(
        w, (grad_e * u).mean(-1, keepdim=True)).div_(-sigma)
    del w
    grad_sigma = (grad_e * E).sum(-1, keepdim=True).div_(-sigma)
    grad_beta = None
    if identity:
        grad_rows = grad_w_scaled
    else:
        grad_rows = grad_w_scaled * slope
        grad_a = grad_w_scaled.mul_(rows).mul_(curve)  # through act'(a)
        del slope, curve
        if gamma is not None:
            grad_gamma += (grad_a * u).sum(0)
            grad_u.addcmul_(grad_a, gamma)
        else:
            grad_u.add_(grad_a)
        grad_beta = grad_a.sum(0) if beta is not None else None
    # d sigma / dz = u / H for both norms
    grad_z = _centre(grad_u, u, sigma, norm).add_(u * (grad_sigma / u.shape[-1]))
    return grad_z, grad_gamma, grad_beta, grad_rows, None, None, None


norm_act_gradcam.register_autograd(_norm_act_backward, setup_context=_norm_act_setup)
