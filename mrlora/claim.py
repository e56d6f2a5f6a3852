"""One writer per unit: the claim an expert's (or a RaTE token's) training job holds on its output directory.

Why: the run lease keeps two launchers apart, but not two jobs writing the same expert: a worker outliving its
launcher, or a Slurm job an admin started twice, would train ``cycle_0001/<reward>/`` concurrently and
interleave checkpoints and metrics. So the job that writes a unit claims it first, and a second writer stops
with a message naming the first. The training job itself takes the claim (not the launcher), so every way of
starting it is covered.

The claim is a small JSON file created with ``O_EXCL`` (``mrlora.runstore.create_exclusive_json``, like the run
lease: atomic on NFS and Lustre, no ``flock``) *beside* the unit, ``<parent>/.claim-<unit>.json``, so the
unit's markers never list it and moving or resetting the unit leaves it alone. It names the host, pid (and the
process's start time, so a recycled pid is not mistaken for the owner) and Slurm job. It is broken (renamed
aside) only when its owner is provably gone: a dead process on this host, a Slurm job no longer in the queue,
or this very Slurm job started again by a requeue. A claim that cannot be checked (another host, no Slurm job)
is never broken: the message says which file to delete once that process is known to be dead.

This module is imported on login nodes: stdlib only (Slurm is asked through ``launch.slurm`` when needed).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mrlora.runstore import (
    RunStoreError,
    create_exclusive_json,
    fsync_dir,
    move_aside,
    pid_alive,
    read_json,
)

TORN_AGE_S = 10.0  # an unreadable claim older than this was torn by a killed writer, not being written now
# A holder's Slurm job in one of these states is ending (its processes are being killed, e.g. after scancel and
# a quick --resume): wait up to ENDING_WAIT_S for it to leave the queue instead of failing the new job.
ENDING_STATES = ("COMPLETING", "SIGNALING", "STAGE_OUT")
ENDING_WAIT_S = 180.0


class ClaimHeldError(RunStoreError):
    """Another live process writes the unit; the message names it and what to do."""


def claim_path(unit_dir: Path | str) -> Path:
    unit_dir = Path(unit_dir)
    return unit_dir.parent / f".claim-{unit_dir.name}.json"


def process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot (/proc), or "" where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _slurm_job() -> str | None:
    from launch.jobs import (
        slurm_task_id,  # torch-free; one definition of "this job's id"
    )

    return slurm_task_id()


@dataclass
class Claim:
    """Who writes a unit. ``release()`` removes the file if it is still ours."""

    path: str
    owner_id: str
    host: str
    pid: int
    pid_start: str
    slurm_job: str | None
    created: str
    what: str

    @classmethod
    def mine(cls, path: Path, what: str) -> "Claim":
        return cls(
            path=str(path),
            owner_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=process_start(os.getpid()),
            slurm_job=_slurm_job(),
            created=_dt.datetime.now().isoformat(timespec="seconds"),
            what=what,
        )

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"{self.what or 'a job'} on host {self.host} (pid {self.pid}{job}), since {self.created}"

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if read_json(self.path).get("owner_id") == self.owner_id:
                os.unlink(self.path)
                fsync_dir(Path(self.path).parent)


def read_holder(path: Path) -> Claim | None:
    """The claim in ``path``, or None when it vanished. A file still unreadable after a few seconds was torn by
    a killed writer (``create_exclusive_json`` fills it right after creating it) and counts as nobody's."""
    deadline = time.monotonic() + 3.0
    while True:
        try:
            data = read_json(path)
            return Claim(**{k: data.get(k) for k in Claim.__dataclass_fields__ if k != "path"}, path=str(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError):
            try:
                old = time.time() - path.stat().st_mtime > TORN_AGE_S
            except FileNotFoundError:
                return None
            if old or time.monotonic() > deadline:
                return Claim(
                    path=str(path),
                    owner_id="torn",
                    host="?",
                    pid=-1,
                    pid_start="",
                    slurm_job=None,
                    created="?",
                    what="a writer killed while claiming",
                )
            time.sleep(0.2)


def owner_gone(holder: Claim) -> bool:
    """Is the claim's owner provably gone? Raises ClaimHeldError when this process cannot tell."""
    if holder.owner_id == "torn":
        return True
    if holder.host == socket.gethostname():
        if holder.pid == os.getpid() and holder.pid_start == process_start(os.getpid()):
            return True  # this process claimed it earlier and failed before releasing
        if not pid_alive(int(holder.pid or -1)):
            return True
        start = process_start(int(holder.pid))
        return bool(holder.pid_start and start and start != holder.pid_start)  # the pid was recycled
    if holder.slurm_job:
        if holder.slurm_job == _slurm_job():
            return True  # this job again, after a requeue: Slurm ended its previous run first
        from launch.slurm import ACTIVE_STATES, SlurmError, job_state

        try:
            state = job_state(holder.slurm_job)
            deadline = time.monotonic() + ENDING_WAIT_S
            while state in ENDING_STATES and time.monotonic() < deadline:  # e.g. just scancelled: wait it out
                time.sleep(2.0)
                state = job_state(holder.slurm_job)
            return state not in ACTIVE_STATES
        except SlurmError as exc:
            raise ClaimHeldError(
                f"{holder.path} says {holder.describe()} writes this unit, and Slurm cannot be asked whether that "
                f"job still runs ({exc}). Retry when Slurm answers."
            ) from None
    raise ClaimHeldError(
        f"{holder.path} says {holder.describe()} writes this unit; this host cannot check that process. Stop it "
        f"there, or delete {holder.path} once you know it is dead, then run this again."
    )


def acquire(unit_dir: Path | str, what: str) -> Claim:
    """Claim ``unit_dir`` for this process or raise ClaimHeldError naming the live owner."""
    path = claim_path(unit_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    claim = Claim.mine(path, what)
    record = {k: v for k, v in asdict(claim).items() if k != "path"}
    for _ in range(5):
        if create_exclusive_json(path, record):
            return claim
        holder = read_holder(path)
        if holder is None:
            continue
        if not owner_gone(holder):
            raise ClaimHeldError(
                f"{Path(unit_dir)} is being written by {holder.describe()}; a second writer would corrupt it, so "
                f"this one stops. Wait for it or stop it (python -m launch.cancel RUN_TS), then resume."
            )
        move_aside(path)
    raise ClaimHeldError(f"could not claim {unit_dir}: {path} keeps changing hands; retry")


def acquire_on_main(unit_dir: Path | str, what: str, is_main: bool, any_rank: Callable[[bool], bool]) -> Claim | None:
    """Claim on the main rank of a multi-process job; every rank raises if it failed (``any_rank`` is the job's
    agreement collective, so no rank is left waiting in a collective for a main rank that stopped)."""
    claim, error = None, None
    if is_main:
        try:
            claim = acquire(unit_dir, what)
        except ClaimHeldError as exc:
            error = exc
    if any_rank(error is not None):
        raise error or ClaimHeldError(f"rank 0 could not claim {unit_dir}; its log says who writes it")
    return claim


def release(claim: Claim | None) -> None:
    if claim is not None:
        claim.release()
