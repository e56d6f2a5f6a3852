"""A record per submitted job in the run directory (``logs/jobs/<job id>.json``).

Slurm knows job ids, names and states; only the launcher knows what a job *is*: which cycle, which rewards in
which array-task order, where its log goes. Status, resume (``--adopt``) and cancel read these records to map a
queue line like ``4711_2`` back to "cycle 3, OCR expert". One small file per job, written atomically, so the
chain's own window extension (on a compute node) and a launcher never write the same file.
"""

from __future__ import annotations

import datetime as _dt
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from launch.plan import MERGE, RATE, rate_unit
from mrlora.runstore import RunDir, atomic_write_json, read_json

JOURNAL_DIR = "jobs"


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    key: str
    name: str
    cycle: int
    kind: str  # "expert" | "merge" | "rate"
    rewards: tuple[str, ...]  # array task i trains rewards[i]
    array: bool
    window: int
    after: tuple[str, ...]  # job ids it waited for at submission
    log_dir: str  # submitit folder: <job>_<task>_log.out / .err (arrays: <array>_<task>_0_log.*)
    submitted_at: str
    submitted_from: str

    def task_id(self, reward: str) -> str:
        """The Slurm id of ``reward``'s task: ``<array id>_<i>`` in an array, else the job id."""
        return f"{self.job_id}_{self.rewards.index(reward)}" if self.array else self.job_id

    def log_paths(self, reward: str | None = None) -> tuple[Path, Path]:
        """stdout and stderr of rank 0 of this job (of ``reward``'s task for an array)."""
        jid = self.task_id(reward) if (reward and self.array) else self.job_id
        base = Path(self.log_dir)
        return base / f"{jid}_0_log.out", base / f"{jid}_0_log.err"


def journal_dir(run: RunDir) -> Path:
    return run.logs_dir / JOURNAL_DIR


def write_record(run: RunDir, record: JobRecord) -> None:
    atomic_write_json(journal_dir(run) / f"{record.job_id}.json", asdict(record))


def new_record(**kwargs) -> JobRecord:
    kwargs.setdefault("submitted_at", _dt.datetime.now().isoformat(timespec="seconds"))
    kwargs.setdefault("submitted_from", socket.gethostname())
    kwargs["rewards"] = tuple(kwargs.get("rewards", ()))
    kwargs["after"] = tuple(kwargs.get("after", ()))
    return JobRecord(**kwargs)


def read_records(run: RunDir) -> list[JobRecord]:
    """Every job ever submitted for the run, oldest submission first."""
    records: list[JobRecord] = []
    folder = journal_dir(run)
    if not folder.is_dir():
        return records
    for path in folder.glob("*.json"):
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue
        data["rewards"] = tuple(data.get("rewards", ()))
        data["after"] = tuple(data.get("after", ()))
        records.append(JobRecord(**{k: data[k] for k in JobRecord.__dataclass_fields__ if k in data}))
    return sorted(records, key=lambda r: (r.submitted_at, int(r.job_id) if r.job_id.isdigit() else 0))


def latest_by_unit(records: list[JobRecord]) -> dict[tuple[int, str], JobRecord]:
    """The newest record per (cycle, reward), (cycle, "merge") and (cycle, "rate:<reward>"): what status shows."""
    out: dict[tuple[int, str], JobRecord] = {}
    for rec in records:
        if rec.kind == MERGE:
            units = [(rec.cycle, MERGE)]
        elif rec.kind == RATE:
            units = [(rec.cycle, rate_unit(r)) for r in rec.rewards]
        else:
            units = [(rec.cycle, r) for r in rec.rewards]
        for unit in units:
            out[unit] = rec
    return out
