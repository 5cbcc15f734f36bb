"""Which classifier heads have a closed-form Grad-CAM (docs/math.md): a head is read as a sum
of :class:`HeadTerm`\\ s, or the reason it cannot be is returned."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

from torch import nn

from ..heads import BranchSum

__all__ = ["HeadTerm", "closed_form_terms"]


@dataclass
class HeadTerm:
    """``y = output_linear(dropout(act(norm(input_linear(h)))))``, or ``y = input_linear(h)``
    when ``output_linear`` is None; ``norm`` an optional LayerNorm, ``activation``
    ``"relu"``, ``"gelu"`` (exact) or ``"gelu_tanh"``."""

    input_linear: nn.Linear
    dropout: Optional[nn.Dropout] = None
    output_linear: Optional[nn.Linear] = None
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
    """The layers of ``module`` in call order, hook-free ``nn.Sequential``\\ s opened and
    ``nn.Identity`` left out."""
    hooked = module._forward_hooks or module._forward_pre_hooks
    if type(module) is nn.Sequential and not hooked:
        for child in module:
            yield from _flatten(child)
    elif not _plain(module, nn.Identity):
        yield module


def closed_form_terms(head: nn.Module) -> Union[List[HeadTerm], str]:
    """The closed-form terms of ``head`` summed by its forward, or why there is none."""
    if _plain(head, BranchSum):
        terms: List[HeadTerm] = []
        for branch in head.branches:
            sub = closed_form_terms(branch)
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
        return [HeadTerm(layers[0])]
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
        return [HeadTerm(layers[0], by_kind.get("D"), layers[-1], norm, activation)]
    names = [type(layer).__name__ for layer in layers]
    return (f"the layer sequence {names} is not Linear[-LayerNorm]-ReLU|GELU-[Dropout]-Linear")
