"""Multi-process training through ``torchrun`` and ``DistributedDataParallel``.

Each process takes a disjoint shard of every step's groups; DDP starts every copy from rank
0's parameters and averages the gradients in bucketed all-reduces during the backward pass.
Both Grad-CAM paths work under it: the closed form runs plain differentiable operations, and
the ``--autograd-reference`` path's ``autograd.grad(create_graph=True)`` accumulates no
parameter gradient, so DDP's hooks fire only in the final backward. Every process ends each
step with the same weights. A DDP run is not bit-identical to one process training on the
whole batch: each process averages its loss over its own shard (per role, and over the
groups it counts), and DDP averages these shard gradients, which weights questions slightly
differently when shards hold different numbers of questions per role; the gradient is also
summed in another order. Adamax, which scales each coordinate's step to about the learning
rate whatever the size of its gradient, turns such small differences in near-zero gradient
entries into weight differences of the order of the learning rate (4.7e-3 at most after 3
steps at lr 3e-3 with 2 processes in ``tests/test_train.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CLIError

__all__ = ["DistContext", "resolve_device", "init_distributed", "wrap_model",
           "average_over_processes", "gather_objects", "close_distributed"]


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


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when several processes train, else itself."""
    if not ctx.distributed:
        return model
    devices = [ctx.device] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=devices)


def average_over_processes(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of ``values`` over the processes (itself for a single process)."""
    if not ctx.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / ctx.world_size


def gather_objects(obj: Any, ctx: DistContext) -> List[Any]:
    """Every process's ``obj`` in rank order (``[obj]`` for a single process)."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
