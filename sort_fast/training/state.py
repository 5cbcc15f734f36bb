"""The state of a training run in progress: what its checkpoint holds besides the
configuration and the data description (docs/training.md, "Training state")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

from .data import DataOrder

__all__ = ["TrainState", "every_n_steps"]


def every_n_steps(step: int, n: int) -> bool:
    """Whether ``step`` is a multiple of ``n`` (``n`` = 0: never)."""
    return n > 0 and step % n == 0


@dataclass
class TrainState:
    """The model, optimizer, learning-rate schedule, gradient scaler and data order of a run
    after ``step`` optimizer steps. :meth:`state_dict` is what a checkpoint stores of it (with
    the processes' random-number states beside it); :meth:`load_state_dict` restores it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    order: DataOrder
    step: int = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "data": self.order.state(self.step),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a checkpoint's optimizer, schedule, scaler (checkpoints of older versions
        may have none) and step, after checking its data order against this run's (the
        model's weights were loaded when it was built)."""
        self.order.check(state["data"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
