"""Training errors, torch-free so launchers and CLIs can catch them without heavy imports."""

from __future__ import annotations

from mrlora.cli import UserError


class TrainError(UserError, RuntimeError):
    """A training problem the user must fix; the message says what to do next."""


class Preempted(Exception):
    """Training stopped on SIGUSR2/SIGTERM after writing a checkpoint; requeue the job to continue from it.

    ``step`` is the number of finished optimizer steps saved in ``checkpoint``.
    """

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"preempted after step {step}; checkpoint {checkpoint} is complete, requeue to continue")
        self.step = step
        self.checkpoint = checkpoint
