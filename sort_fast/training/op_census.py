"""Every operator a piece of code sends through PyTorch's dispatcher, counted by phase, with
the ones that move data between host and device (docs/ops.md, "What is proven without a GPU").

Run on the ``meta`` device (tensors without data: any operator that must read a value fails)
it shows that a training step never reads a value back; run anywhere it counts the kernel-like
operators of a step, the launches a GPU would make.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["OpCensus", "Transfer", "HOST_METADATA"]

aten = torch.ops.aten

# operators that only allocate, or hand a value to Python: no kernel runs on a GPU
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.lift_fresh.default,
              aten._local_scalar_dense.default, aten.sym_size.int, aten.sym_stride.int,
              aten.sym_numel.default, aten.sym_storage_offset.default}
# operators that read a tensor's value on the host
_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
          aten.equal.default}
# arguments that PyTorch defines as host memory beside device data, read on the host without
# a copy: a PackedSequence's batch_sizes (the LSTM's schedule; cuDNN takes it on the CPU)
HOST_METADATA: Dict[Any, Tuple[int, ...]] = {aten.lstm.data: (1,)}


@dataclass
class Transfer:
    """One operator that moved data between devices or read a device value on the host."""

    phase: str
    op: str
    devices: Tuple[str, ...]


class OpCensus(TorchDispatchMode):
    """``with OpCensus() as census: ...`` records every dispatched operator under the current
    ``census.phase`` (set it between the parts of the code).

    ``ops``: ``{(phase, op name): count}`` of every operator; ``kernels(phase)``: those that run
    a kernel (not views, not bare allocations); ``transfers``: operators whose tensors lie on
    two devices (a host<->device copy) or that read a device value on the host (a sync), the
    documented host-side arguments of :data:`HOST_METADATA` aside. A custom operator
    (``sort_fast::*``) counts once: its implementation runs below the dispatcher.
    """

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.ops: Counter = Counter()
        self.transfers: List[Transfer] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[(self.phase, str(func.overloadpacket))] += 0 if _view_or_alloc(func) else 1
        if func in _READS and any(isinstance(t, torch.Tensor) and t.device.type != "cpu"
                                  for t in tree_leaves(args)):
            # recorded before it runs: on the meta device the read fails
            self.transfers.append(Transfer(self.phase, str(func), ("cpu", "device")))
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        host_args = HOST_METADATA.get(func.overloadpacket, ())
        seen = [a for i, a in enumerate(args) if i not in host_args]
        devices = {t.device.type for t in tree_leaves((seen, kwargs, out))
                   if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.transfers.append(Transfer(self.phase, str(func), tuple(sorted(devices))))
        return out

    def kernels(self, phase: Optional[str] = None) -> int:
        """Kernel-like operators recorded (in ``phase``, or in all)."""
        return sum(n for (p, _), n in self.ops.items() if phase is None or p == phase)

    def phases(self) -> List[str]:
        """The phases in the order they were first seen."""
        return list(dict.fromkeys(p for p, _ in self.ops))


def _view_or_alloc(func) -> bool:
    return func.is_view or func in _NO_KERNEL
