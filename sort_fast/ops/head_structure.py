"""Which classifier heads have a closed-form Grad-CAM (docs/math.md): a head is read as a sum
of :class:`HeadTerm`\\ s, or the reason it cannot be is returned.

Recognised: ``nn.Linear``; ``Linear -> [LayerNorm|RMSNorm] -> ReLU|GELU -> [Dropout] ->
Linear`` (a ViLT/BERT-style answer head); a decoder's final norm and LM head,
``Sequential(LayerNorm|RMSNorm, Linear)`` or :class:`~sort_fast.heads.AnswerTokenHead` (only
the answer rows of the LM head); ``BranchSum`` of those. The norms are the stock
``nn.LayerNorm`` and ``nn.RMSNorm`` over the last dim; look-alikes such as transformers'
``LlamaRMSNorm`` (which normalises in float32 whatever the input dtype) are not recognised and
fall back to autograd. Modules with hooks or an overridden forward are not recognised either.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

import torch
from torch import nn

from ..heads import AnswerTokenHead, BranchSum

__all__ = ["HeadTerm", "closed_form_terms", "norm_kind"]


@dataclass
class HeadTerm:
    """``y = output_linear(dropout(act(norm(input_linear(h)))))``, or ``y = input_linear(h)``
    when ``output_linear`` is None; ``norm`` an optional ``nn.LayerNorm`` or ``nn.RMSNorm``,
    ``activation`` ``"relu"``, ``"gelu"`` (exact), ``"gelu_tanh"`` or ``"identity"``.

    Without ``input_linear`` the term is a decoder's final norm and LM head:
    ``y = F.linear(norm(h), W[answer_tokens], b[answer_tokens])`` (``W, b`` those of
    ``output_linear``; all its rows when ``answer_tokens`` is None), ``activation``
    ``"identity"`` and no dropout."""

    input_linear: Optional[nn.Linear]
    dropout: Optional[nn.Dropout] = None
    output_linear: Optional[nn.Linear] = None
    norm: Optional[nn.Module] = None
    activation: str = "relu"
    answer_tokens: Optional[torch.Tensor] = None

    @property
    def in_features(self) -> int:
        """The width ``D`` of ``h``."""
        first = self.input_linear if self.input_linear is not None else self.output_linear
        return first.in_features

    @property
    def out_features(self) -> int:
        """The number ``A`` of scores."""
        if self.answer_tokens is not None:
            return self.answer_tokens.numel()
        last = self.output_linear if self.output_linear is not None else self.input_linear
        return last.out_features


def norm_kind(norm: Optional[nn.Module]) -> str:
    """``"layer"``, ``"rms"`` or ``"none"``: the normalisation of a term's ``norm``."""
    if norm is None:
        return "none"
    return "rms" if isinstance(norm, nn.RMSNorm) else "layer"


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


def _norm_problem(norm: nn.Module, width: int) -> Optional[str]:
    """Why ``norm`` (a plain LayerNorm or RMSNorm) is not a norm over the last dim of size
    ``width`` (None if it is)."""
    shape = tuple(norm.normalized_shape)
    if shape != (width,):
        return f"{type(norm).__name__} over {shape} is not over the last dim ({width})"
    return None


def _answer_token_terms(head: AnswerTokenHead) -> Union[List[HeadTerm], str]:
    """The one norm-first term of an :class:`AnswerTokenHead`. Its forward reads only
    ``lm_head.weight`` and ``lm_head.bias`` (never ``lm_head``'s forward, so hooks there do
    not matter); its norm must be a plain ``nn.RMSNorm`` or ``nn.LayerNorm``."""
    if type(head).answer_logits is not AnswerTokenHead.answer_logits:
        return f"{type(head).__name__} overrides answer_logits"
    norm, lm_head = head.norm, head.lm_head
    if not isinstance(lm_head, nn.Linear):
        return f"lm_head type {type(lm_head).__name__} is not nn.Linear"
    if not (_plain(norm, nn.RMSNorm) or _plain(norm, nn.LayerNorm)):
        return (f"norm type {type(norm).__name__} is not recognised (or has hooks); "
                "nn.RMSNorm and nn.LayerNorm are")
    problem = _norm_problem(norm, lm_head.in_features)
    if problem is not None:
        return problem
    return [HeadTerm(None, None, lm_head, norm, "identity", head.answer_tokens)]


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
    if _plain(head, AnswerTokenHead):
        return _answer_token_terms(head)
    layers = list(_flatten(head))
    code = {nn.Linear: "L", nn.ReLU: "R", nn.GELU: "G", nn.LayerNorm: "N", nn.RMSNorm: "N",
            nn.Dropout: "D"}
    pattern = ""
    for layer in layers:
        kind = next((k for k in code if _plain(layer, k)), None)
        if kind is None:
            return f"module type {type(layer).__name__} is not recognised (or has hooks)"
        pattern += code[kind]
    by_kind = dict(zip(pattern[1:-1], layers[1:-1]))
    if pattern == "L":
        return [HeadTerm(layers[0])]
    if pattern == "NL":  # a decoder's final norm and LM head: every row an answer
        problem = _norm_problem(layers[0], layers[1].in_features)
        if problem is not None:
            return problem
        return [HeadTerm(None, None, layers[1], layers[0], "identity")]
    # Linear [LayerNorm|RMSNorm] activation [Dropout] Linear; dropout may also precede a ReLU,
    # with which it commutes (the mask is >= 0), but not a GELU
    if re.fullmatch(r"LN?(RD?|DR|GD?)L", pattern):
        norm = by_kind.get("N")
        if norm is not None:
            problem = _norm_problem(norm, layers[0].out_features)
            if problem is not None:
                return problem
        activation = "relu"
        if "G" in by_kind:
            activation = "gelu" if by_kind["G"].approximate == "none" else "gelu_tanh"
        return [HeadTerm(layers[0], by_kind.get("D"), layers[-1], norm, activation)]
    names = [type(layer).__name__ for layer in layers]
    return (f"the layer sequence {names} is not Linear[-LayerNorm]-ReLU|GELU-[Dropout]-Linear "
            "or LayerNorm-Linear (LayerNorm: nn.LayerNorm or nn.RMSNorm)")
