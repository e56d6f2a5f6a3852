"""The few Slurm commands the launcher runs, batched: one squeue and one sacct call per question.

Login nodes and slurmctld are shared: status and resume must not issue a query per job. Every function here
runs one command, parses its ``|``-separated output into small records, and raises ``SlurmError`` with the
command's own message when it fails, so the CLI can tell the user what Slurm said.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from launch.plan import job_prefix, run_comment
from mrlora.cli import UserError

ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "RESIZING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
}


class SlurmError(UserError, RuntimeError):
    """A Slurm command failed or Slurm is not reachable; the message carries Slurm's own words."""


def have_slurm() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def run_slurm_command(
    cmd: list[str],
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    not_found: str = "is Slurm installed on this machine?",
) -> str:
    """stdout of a Slurm client command; any failure is a SlurmError carrying Slurm's own message.

    ``not_found`` is the advice when the command does not exist (e.g. where to run it instead).
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: {not_found}") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(cmd[:3])} ...` did not answer within {timeout:.0f} s; is slurmctld up?") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise SlurmError(
            f"`{' '.join(cmd[:4])}{' ...' if len(cmd) > 4 else ''}` failed (exit {proc.returncode}): {msg}"
        )
    return proc.stdout


def slurm_reachable() -> str | None:
    """None when squeue answers, else Slurm's error message."""
    try:
        run_slurm_command(["squeue", "-h", "-o", "%i", "-j", "0"], timeout=20)
    except SlurmError as exc:
        text = str(exc)
        if "Invalid job id" in text:
            return None
        return text
    return None


@dataclass(frozen=True)
class _SlurmJob:
    job_id: str  # "123" or "123_1" (or "123_[0-2]" for array tasks not yet split)
    name: str
    state: str

    @property
    def base_id(self) -> str:
        """The job id without the array task suffix."""
        return self.job_id.split("_", 1)[0]


@dataclass(frozen=True)
class QueuedJob(_SlurmJob):
    """One line of squeue: array tasks appear one per line as ``<array id>_<task>``."""

    comment: str
    reason: str


def squeue_all() -> list[QueuedJob]:
    """Every job in the queue visible to us (one call)."""
    out = run_slurm_command(["squeue", "-h", "-a", "-r", "-o", "%i|%j|%T|%r|%k"])
    jobs = []
    for line in out.splitlines():
        parts = line.split("|", 4)
        if len(parts) < 5:
            continue
        job_id, name, state, reason, comment = (p.strip() for p in parts)
        jobs.append(QueuedJob(job_id, name, state, comment, reason))
    return jobs


def run_jobs_in_queue(run_ts: str, extra_ids: set[str] | frozenset = frozenset()) -> list[QueuedJob]:
    """Queued or running jobs of run ``run_ts``: found by comment, name prefix, or one of ``extra_ids``."""
    prefix, comment = job_prefix(run_ts), run_comment(run_ts)
    return [
        j
        for j in squeue_all()
        if (j.comment == comment or j.name.startswith(prefix) or j.base_id in extra_ids) and j.state in ACTIVE_STATES
    ]


@dataclass(frozen=True)
class AccountedJob(_SlurmJob):
    """One line of ``sacct -X``: the allocation (not its steps) of a job or array task."""

    start: str
    end: str
    elapsed_s: int
    exit_code: str


def sacct_jobs(job_ids: list[str]) -> list[AccountedJob]:
    """Accounting records of ``job_ids`` (array ids expand to their tasks), one call; [] if no ids."""
    if not job_ids:
        return []
    out = run_slurm_command(
        [
            "sacct",
            "-X",
            "-P",
            "-n",
            "-j",
            ",".join(sorted(set(job_ids))),
            "-o",
            "JobID,JobName%200,State,Start,End,ElapsedRaw,ExitCode",
        ]
    )
    rows = []
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 7:
            continue
        job_id, name, state, start, end, elapsed, code = parts[:7]
        rows.append(
            AccountedJob(
                job_id,
                name,
                state.split()[0] if state else "",
                start,
                end,
                int(elapsed) if elapsed.isdigit() else 0,
                code,
            )
        )
    return rows


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        run_slurm_command(["scancel", *sorted(set(job_ids))])


def requeue(job_id: str) -> None:
    """Requeue one job or one array task (``<array id>_<task>``), never a whole array."""
    run_slurm_command(["scontrol", "requeue", job_id])


def job_state(job_id: str) -> str:
    """The current squeue state of one job or array task, or "" when it is no longer in the queue."""
    try:
        out = run_slurm_command(["squeue", "-h", "-j", job_id, "-o", "%T"], timeout=30)
    except SlurmError as exc:
        if "Invalid job id" in str(exc):
            return ""
        raise
    return out.strip().splitlines()[0].strip() if out.strip() else ""


def clean_submission_env() -> dict[str, str]:
    """The environment for sbatch from inside a job: without the parent's SLURM_*/SUBMITIT_* variables.

    sbatch exports the caller's environment into the new job; a merge job extending the chain would otherwise
    hand its own task counts, node list and submitit folder to the next window.
    """
    keep = {"SLURM_CONF"}
    return {
        k: v
        for k, v in os.environ.items()
        if not (
            (k.startswith("SLURM_") or k.startswith("SBATCH_") or k.startswith("SUBMITIT_") or k.startswith("SRUN_"))
            and k not in keep
        )
    }
