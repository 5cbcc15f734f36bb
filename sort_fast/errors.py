"""The exceptions the command-line entry points turn into a one-line message and an exit code
(``sort_fast.training.config.run_command``)."""
from __future__ import annotations

import signal

__all__ = ["CLIError", "Interrupted"]


class CLIError(Exception):
    """A user-facing problem (bad flag combination, unreadable or malformed file, incompatible
    checkpoint); the command-line entry points print its message on one line and exit 2."""


class Interrupted(Exception):
    """A run stopped by signal ``signum`` after saving its state; ``resume`` is the command
    that continues it."""

    def __init__(self, signum: int, step: int, resume: str) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; the "
                         "checkpoint is saved, resume with:")
        self.signum, self.resume = signum, resume
