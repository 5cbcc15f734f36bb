"""Grad-CAM vectors of any named layer through a forward hook (docs/math.md).

``G = dy_c/dA * A`` for the activation ``A`` of a layer of any model, differentiable (second
order), for heads without a closed form (see ``sort_fast.ops.head_gradcam`` for those).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .ops.head_gradcam import check_class_range, check_classes

__all__ = ["GradCAM"]


class GradCAM:
    """Captures the output ``A`` of ``model``'s submodule ``layer`` while the context is open.

    >>> with GradCAM(model, layer="fusion") as cam:
    ...     scores = model(x)                        # [T, num_answers]
    ...     G = cam.vectors(scores, classes)         # [T, *A.shape[1:]], differentiable

    The activation of the latest forward pass is kept (``cam.activation``); ``cam.gradient`` is
    ``dy_c/dA`` from the latest ``vectors`` call. On exit (also on an exception) the hook is
    removed and no tensor is referenced any more.
    """

    def __init__(self, model: nn.Module, layer: Union[str, nn.Module]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(layer, str):
            try:
                layer = model.get_submodule(layer)
            except AttributeError as e:
                names = [name for name, _ in model.named_modules() if name]
                raise ValueError(f"model has no submodule {layer!r}; it has {names}") from e
        elif not isinstance(layer, nn.Module):
            raise TypeError("layer must be a submodule name or an nn.Module, got "
                            f"{type(layer).__name__}")
        self.model = model
        self.layer = layer
        self._handle: Optional[torch.utils.hooks.RemovableHandle] = None
        self._activation: Optional[torch.Tensor] = None
        self._gradient: Optional[torch.Tensor] = None

    def __enter__(self) -> "GradCAM":
        if self._handle is not None:
            raise RuntimeError("this GradCAM context is already open")
        self._handle = self.layer.register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is None:
            raise RuntimeError("this GradCAM context is not open: use `with GradCAM(...)`")
        self._handle.remove()
        self._handle = None
        self._activation = None
        self._gradient = None

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise TypeError(
                "GradCAM needs the layer to output one floating-point tensor, got "
                f"{type(output).__name__}"
            )
        if torch.is_grad_enabled() and not output.requires_grad:
            # e.g. an Identity on an input: track a new leaf from here, leave the caller's tensor be
            output = output.detach().requires_grad_()
        self._activation = output
        return output

    @property
    def activation(self) -> torch.Tensor:
        """``A``, the layer output of the latest forward pass."""
        if self._activation is None:
            raise RuntimeError("no activation captured: run the model inside the `with` block")
        return self._activation

    @property
    def gradient(self) -> torch.Tensor:
        """``dy_c/dA`` from the latest ``vectors`` call."""
        if self._gradient is None:
            raise RuntimeError("no gradient yet: call vectors(scores, classes) first")
        return self._gradient

    def vectors(
        self, scores: torch.Tensor, classes: torch.Tensor, *, create_graph: bool = True
    ) -> torch.Tensor:
        """``scores [T, A]``, ``classes [T]`` int64 -> ``G = dy_c/dA * A`` (shape of ``A``)."""
        act = self.activation
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise ValueError("scores must be a 2-D [T, A] tensor, got "
                             f"{getattr(scores, 'shape', scores)}")
        check_classes(classes, scores.shape[0], scores.device)
        check_class_range(classes, scores.shape[1])
        if not scores.requires_grad:
            raise RuntimeError("scores do not require grad: run the forward pass with grad enabled")
        # the gathered sum is the one-hot grad_outputs of the original code without the one-hot
        (grad,) = torch.autograd.grad(
            scores.gather(1, classes[:, None]).sum(), act, create_graph=create_graph
        )
        self._gradient = grad
        return grad * act
