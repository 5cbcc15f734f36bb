"""``sort_fast::norm_act_gradcam``: ``dy_c/dz`` back through a LayerNorm and a ReLU/GELU, the
inner step of the closed-form Grad-CAM of a transformer answer head (docs/math.md), a
``torch.library`` custom op with a fake implementation and a hand-written backward, and the
activation derivatives it uses."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["norm_act_gradcam"]

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
