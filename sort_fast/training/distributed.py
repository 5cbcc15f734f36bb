"""Multi-process training through ``torchrun`` and ``torch.distributed``.

Gradients are averaged with ``all_reduce`` after each backward pass instead of wrapping the
model in ``DistributedDataParallel``: SOrT differentiates through
``autograd.grad(create_graph=True)``, which DDP's reducer does not support in every case.
Every process starts from rank 0's parameters and applies the same averaged gradients, so the
copies stay identical.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn

from .config import CLIError

__all__ = ["DistContext", "resolve_device", "init_distributed", "broadcast_parameters",
           "average_gradients", "gather_objects", "close_distributed"]


@dataclass
class DistContext:
    """This process's ``rank`` among ``world_size`` and its ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(flag: str, local_rank: int) -> torch.device:
    if flag == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    if flag == "cpu" or (flag == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_flag: str, threads: int) -> DistContext:
    """Sets the CPU ``threads`` (0: torch's default) and joins the process group when launched
    by ``torchrun`` (``WORLD_SIZE > 1``: NCCL on CUDA, gloo on CPU); a single process
    otherwise."""
    if threads:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world_size == 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), world_size, device)


def close_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(model: nn.Module, ctx: DistContext) -> None:
    """Copies rank 0's parameters and buffers to every process."""
    if ctx.distributed:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(model: nn.Module, ctx: DistContext) -> None:
    """Averages every parameter's gradient over the processes (one flat all-reduce)."""
    if not ctx.distributed:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def gather_objects(obj: Any, ctx: DistContext) -> List[Any]:
    """Every process's ``obj`` in rank order (``[obj]`` for a single process)."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
