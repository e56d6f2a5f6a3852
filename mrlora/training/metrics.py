"""Per-step metrics: ``metrics.jsonl`` on rank 0, plus the run's trackers (TensorBoard / W&B, ``mrlora.tracking``).

metrics.jsonl gets one appended (flushed, fsynced) line per step. A resumed job first rewrites it atomically with
only the lines of steps up to its checkpoint (dropping later steps and a line torn by a kill), so the file
always reads as one uninterrupted run. Each line also goes to the tracker, which places it on the lineage's
curve across the whole run; trackers are best-effort and never stop training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mrlora.runstore import atomic_write_text
from mrlora.tracking import Tracker


class MetricsLog:
    def __init__(self, path: Path, resume_step: int, enabled: bool, tracker: Tracker | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict] = []
        self.tracker = tracker if enabled else None
        self._fh = None
        if not enabled:
            return
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if int(rec.get("step", 0)) <= resume_step:
                    self.records.append(rec)
            atomic_write_text(self.path, "".join(_line(r) for r in self.records))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(_line(record))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self.tracker is not None:
            self.tracker.log(record, int(record["step"]))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.tracker is not None:
            self.tracker.close()


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"
