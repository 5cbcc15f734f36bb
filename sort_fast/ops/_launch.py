"""One Triton kernel launch as data: what the launchers run and what the static GPU check
(:mod:`sort_fast.ops.static_check`) compiles ahead of time, so the two cannot drift apart."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import torch

Grid = Union[Tuple[int, ...], Callable[[Dict[str, Any]], Tuple[int, ...]]]


@dataclass
class Launch:
    """``kernel[grid](**args, **options)``. ``kernel`` is a ``triton.jit`` function, possibly
    wrapped by ``triton.heuristics`` or ``triton.autotune`` (then ``options`` is empty and the
    tuned configs supply ``num_warps``/``num_stages``)."""

    kernel: Any
    grid: Grid
    args: Dict[str, Any]
    num_warps: int = 0
    options: Dict[str, Any] = field(default_factory=dict)

    def run(self) -> None:
        if all(n > 0 for n in (self.grid if isinstance(self.grid, tuple) else (1,))):
            extra = dict(self.options)
            if self.num_warps:
                extra["num_warps"] = self.num_warps
            self.kernel[self.grid](**self.args, **extra)


def run_launches(launches: Sequence[Launch], like: torch.Tensor) -> None:
    """Runs the launches in order on ``like``'s GPU, whichever device is current."""
    guard = torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext()
    with guard:
        for launch in launches:
            launch.run()
