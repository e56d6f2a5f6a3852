"""Per-step metrics: ``metrics.jsonl`` on rank 0, plus optional TensorBoard / wandb when installed and enabled.

metrics.jsonl gets one appended (flushed, fsynced) line per step. A resumed job first rewrites it atomically with
only the lines of steps up to its checkpoint (dropping later steps and a line torn by a kill), so the file
always reads as one uninterrupted run. Trackers are best-effort and offline-safe: a missing package or
no network never stops training (wandb defaults to offline mode unless WANDB_MODE is set).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mrlora.runstore import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path, resume_step: int, enabled: bool, logging_cfg=None, run_name: str = ""):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict] = []
        self._tb = self._wandb = None
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
        if logging_cfg is not None:
            self._open_trackers(logging_cfg, run_name)

    def _open_trackers(self, logging_cfg, run_name: str) -> None:
        if logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:
                print("[mrlora] logging.tensorboard is on but tensorboard is not installed; skipping it "
                      "(pip install 'mrlora[tensorboard]')", file=sys.stderr)
        if logging_cfg.wandb:
            try:
                import wandb
            except ImportError:
                print("[mrlora] logging.wandb is on but wandb is not installed; skipping it "
                      "(pip install 'mrlora[wandb]')", file=sys.stderr)
                return
            try:
                self._wandb = wandb.init(project=logging_cfg.project, name=run_name, dir=str(self.path.parent),
                                         mode=os.environ.get("WANDB_MODE", "offline"), resume="allow")
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                print(f"[mrlora] wandb unavailable ({exc}); continuing without it", file=sys.stderr)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(_line(record))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        step = int(record["step"])
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"
