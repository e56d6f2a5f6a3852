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
import time
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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_when_parent_dies(parent_pid: int, signum: int = signal.SIGTERM, poll_s: float = 1.0) -> None:
    """Send ourselves ``signum`` (the stop signal above: checkpoint, then exit) once ``parent_pid`` is gone.

    Why: a local worker runs in its own process group so a terminal's Ctrl-C reaches only the launcher, which
    forwards the stop; but a launcher killed with SIGKILL forwards nothing, and its worker must not train on
    alone (a resume would start a second writer). Linux delivers ``signum`` when the parent dies
    (``PR_SET_PDEATHSIG``); a daemon thread comparing ``os.getppid()`` with ``parent_pid`` covers other systems
    and the moment before prctl took effect.
    """
    import ctypes
    import os
    import sys

    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl: stop now
        os.kill(os.getpid(), signum)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
