"""SIGUSR2 / SIGTERM -> "checkpoint at the next round boundary, then stop" (the preemption contract).

Slurm (and submitit) send SIGUSR2 before a time limit or preemption, SIGTERM on scancel; torchrun forwards
SIGTERM to its workers. Stopping mid-step would waste the step or corrupt state, so the handler only sets a flag;
the loop polls it after each sampling round (``train.updates_per_round`` optimizer steps; a checkpoint inside
a round would need the round's samples to resume) and all ranks agree (any rank signalled -> all stop) before writing
the checkpoint. Previous handlers are restored on exit, so a caller's own handlers keep working afterwards.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    """A context manager installing the handlers (main thread only) and exposing ``requested``."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.received = signum

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
