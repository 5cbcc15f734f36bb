"""One training step of the trainer, and the same step over static shapes for
``torch.compile(dynamic=False)`` and CUDA graphs (docs/ops.md, "Static shapes and CUDA
graphs")."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Iterable, Optional, Tuple

import torch

from ..data import PackedBatch
from .objective import Objective

__all__ = ["make_optimizer", "train_step", "compile_objective", "compile_static_step",
           "cuda_graph_step"]


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, *,
                   capturable: bool = False) -> torch.optim.Adamax:
    """The trainer's optimizer: ``Adamax(params, lr)``. ``capturable=True`` (for CUDA
    graphs) keeps the step counter and the learning rate as tensors on the parameters' device,
    so that a captured step reads neither from the host (a learning-rate schedule then writes
    into the tensor; the update is the same up to float rounding)."""
    params = list(params)
    if not capturable:
        return torch.optim.Adamax(params, lr=lr)
    device = params[0].device if params else torch.device("cpu")
    return torch.optim.Adamax(params, lr=torch.tensor(lr, device=device), capturable=True)


def train_step(model: torch.nn.Module, batch: PackedBatch, objective: Objective,
               optimizer: torch.optim.Optimizer, *, grad_clip: float = 0.0,
               scaler: Optional[torch.amp.GradScaler] = None,
               autocast: Optional[ContextManager] = None,
               loss_fn: Optional[Callable] = None,
               mark: Callable[[str], None] = lambda phase: None,
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One step of ``python -m sort_fast.train``: gradients cleared, ``objective`` (or
    ``loss_fn``, e.g. its compiled form) under ``autocast``, backward through ``scaler``,
    gradient clipping at ``grad_clip`` (0: none; its norm joins the parts), optimizer step.
    Returns the loss and its detached parts; reads nothing back from the device.
    ``mark(phase)`` is called before ``"backward"`` and ``"optimizer"`` (for counting)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        loss, parts = (loss_fn or objective)(model, batch)
    mark("backward")
    scaler.scale(loss).backward()
    mark("optimizer")
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                            grad_clip).detach()
    scaler.step(optimizer)
    scaler.update()
    return loss, parts


def compile_objective(objective: Objective, **compile_options) -> Callable:
    """``objective`` under ``torch.compile(**compile_options)`` (the trainer's ``--compile``):
    the model's forward (its LSTM included, through Dynamo's RNN support), the closed-form
    Grad-CAM and the loss in one graph."""
    compiled = torch.compile(objective, **compile_options)

    def step(model: torch.nn.Module, batch: PackedBatch):
        with torch._dynamo.config.patch(allow_rnn=True):
            return compiled(model, batch)

    return step


def compile_static_step(objective: Objective, **compile_options) -> Callable:
    """:func:`compile_objective` with ``dynamic=False``, for batches padded to a few static
    shapes (:func:`~sort_fast.data.buckets.pad_to_bucket`): one graph per shape, no
    recompilation once each shape was seen. ``compile_options`` go to ``torch.compile`` (e.g.
    ``mode="reduce-overhead"`` on a GPU: CUDA graphs)."""
    return compile_objective(objective, dynamic=False, **compile_options)


def cuda_graph_step(objective: Objective) -> Callable:
    """The trainer's ``--cuda-graphs`` step: :func:`compile_static_step` in mode
    ``reduce-overhead`` (CUDA graphs). Each call starts a new graph step, and the loss parts
    are copied out of the graph's output memory, which the next replay overwrites (the trainer
    reads them steps later)."""
    compiled = compile_static_step(objective, mode="reduce-overhead")

    def step(model: torch.nn.Module, batch: PackedBatch):
        torch.compiler.cudagraph_mark_step_begin()
        loss, parts = compiled(model, batch)
        return loss, {name: value.clone() for name, value in parts.items()}

    return step
