"""Progress of long work: a tqdm bar on a terminal, plain log lines in a job log.

A job's stderr is a file (Slurm, the local executor): a tqdm bar there is a stream of carriage returns that
``less`` and ``tail`` show as one unreadable line. So a bar is drawn only when stderr is a terminal; otherwise
each update is one log line (``expert ocr: step 12/100 reward=0.512 kl=1.2e-03``) through the shared logging
setup, at most every ``min_interval_s`` seconds plus the last step.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("mrlora.progress")


class _LogLines:
    """The tqdm methods the code uses (``set_postfix`` then ``update``, and ``close``), written as log lines."""

    def __init__(self, total: int, initial: int, desc: str, min_interval_s: float):
        self.total, self.n, self.desc = total, initial, desc
        self.postfix: dict[str, Any] = {}
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._pending = False

    def update(self, n: int = 1) -> None:
        self.n += n
        self._pending = True
        self._maybe_write()

    def set_postfix(self, **values: Any) -> None:
        """Values shown with the next line (call it before ``update``, as the training loop does)."""
        self.postfix = values

    def _maybe_write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._pending or (not force and self.n < self.total and now - self._last < self.min_interval_s):
            return
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        log.info("%s: step %d/%d%s", self.desc, self.n, self.total, f" {extra}" if extra else "")
        self._last, self._pending = now, False

    def close(self) -> None:
        self._maybe_write(force=True)


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True, min_interval_s: float = 10.0):
    """A progress display for ``total`` steps: tqdm on a terminal, log lines otherwise, nothing if not enabled."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc)
    if enabled:
        return _LogLines(total, initial, desc, min_interval_s)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=True)
