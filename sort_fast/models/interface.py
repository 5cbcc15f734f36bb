"""What the trainer, its objectives and the evaluator need of a VQA model (docs/models.md).

A model takes a :class:`~sort_fast.data.PackedBatch` and returns a :class:`VQAOutput`; SOrT
differentiates its answer scores with respect to the fusion-layer activations ``joint``. A
model whose ``classifier`` maps ``joint`` to the scores and is a head
:func:`~sort_fast.ops.head_gradcam.head_gradcam` has a closed form for gets the fast Grad-CAM
path; any model gets the autograd one (``--autograd-reference``). ``attention`` is what SQuINT
aligns, for models that attend over image regions.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, runtime_checkable

import torch

from ..data.group import PackedBatch

__all__ = ["VQAOutput", "VQAModel", "ModelSpec"]


@runtime_checkable
class VQAOutput(Protocol):
    """``scores [T, A]`` answer logits (``None`` when the forward was asked not to compute
    them), ``joint [T, D]`` the fusion-layer activations Grad-CAM is taken at (``scores`` is a
    function of ``joint`` alone), ``attention`` region weights ``[T, R]`` or ``[T, G, R]`` (0 on
    padded regions), or ``None`` for a model without region attention."""

    scores: Optional[torch.Tensor]
    joint: torch.Tensor
    attention: Optional[torch.Tensor]


@runtime_checkable
class VQAModel(Protocol):
    """A VQA model the trainer can train with every ``--loss``.

    ``model(batch, scores=False)`` may skip the classifier (the closed-form Grad-CAM runs it
    on ``out.joint``); ``classifier`` maps ``joint [T, D]`` to ``scores [T, A]``, or is
    ``None`` when the scores depend on more than ``joint`` (the Grad-CAM gradient is then taken
    by autograd, and the forward always computes the scores); ``config`` is a dataclass that
    :meth:`ModelSpec.build` builds the model from again (checkpoints store it as a dict);
    the evaluator also calls ``region_gradcam(batch, classes)``, its region-level Grad-CAM
    ``[T, R]`` (grounding).
    Besides these, a model is an ``nn.Module`` (``parameters``, ``state_dict``,
    ``train``/``eval``, ``to``)."""

    config: Any
    classifier: Optional[torch.nn.Module]

    def __call__(self, batch: PackedBatch, *, scores: bool = True) -> VQAOutput: ...

    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]: ...


class ModelSpec(Protocol):
    """A model's configuration: a dataclass that builds the model it describes."""

    def build(self) -> VQAModel: ...
