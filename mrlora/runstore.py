"""The run directory on the shared filesystem: the single source of truth of a MapReduce run.

Everything that survives a crash, a preemption or a login-node reboot lives here, so the rules are strict
(docs/design.md section 3):

* every file is written to a temporary name in the same directory, flushed, fsynced, ``os.replace``d and the
  directory fsynced, so a reader never sees a half-written file;
* a directory (checkpoint, finished expert, merged cycle) counts as complete only when its marker exists and
  the sizes it lists match; the marker is written last. Scans trust markers, never "latest" pointers;
* ownership of a run is a lease file created with ``O_EXCL`` (``flock`` is often disabled on Lustre), broken
  only when the caller's liveness check (``squeue``, pid) says its owner is gone.

This module is imported on login nodes: stdlib only.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from mrlora.cli import UserError

RUN_TS_FORMAT = "%Y%m%d_%H%M%S"
RUN_JSON = "run.json"
LEASE = "LEASE.json"
CHECKPOINT_MARKER = "COMPLETE.json"
DONE_MARKER = "DONE.json"
MERGE_MARKER = "MERGE_DONE.json"
BASE_MARKER = "BASE_DONE.json"
UPDATE_JSON = "update.json"  # cycle_XXXX/merged/update.json: how the cycle's update was made
CONTINUE_ADAPTER = "adapter"  # cycle_XXXX/merged/adapter/: reference mode's averaged LoRA
MARKER_NAMES = (CHECKPOINT_MARKER, DONE_MARKER, MERGE_MARKER, BASE_MARKER)
DAMAGED_INFIX = ".damaged-"
_TMP_PREFIX = ".tmp-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_CYCLE_RE = re.compile(r"^cycle_(\d{4,})$")


class RunStoreError(UserError, RuntimeError):
    """A run-directory problem the user must act on; the message says what to do."""


class LeaseHeldError(RunStoreError):
    """Another launcher chain owns the run."""

    def __init__(self, message: str, lease: "LeaseInfo"):
        super().__init__(message)
        self.lease = lease


class NotVisibleError(RunStoreError):
    """A file another node wrote did not appear within the polling bound."""


class DamagedFileError(RunStoreError):
    """A file differs from what its marker recorded (size or sha256): it was damaged after it was written.

    ``path`` is the damaged file, ``unit`` the directory its marker makes complete (what must be redone).
    """

    def __init__(self, message: str, path: Path, unit: Path | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.unit = Path(unit) if unit is not None else None


# ----------------------------------------------------------------------------------------------- atomic writes


def fsync_dir(path: Path | str) -> None:
    """Persist a directory entry (a rename or a new file) on filesystems that need it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{_TMP_PREFIX}{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it into place.

    Use it for writers that want a filename (``safetensors.torch.save_file``, ``torch.save``). On an exception
    the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path | str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def wait_for(path: Path | str, timeout: float = 60.0, interval: float = 0.5) -> Path:
    """Poll for ``path`` written on another node (NFS attribute caching can hide it for a while)."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        # listing the parent refreshes the directory cache on NFS clients
        with contextlib.suppress(OSError):
            os.listdir(path.parent)
        if path.exists():
            return path
        if time.monotonic() >= deadline:
            raise NotVisibleError(
                f"{path} did not appear within {timeout:.0f} s. If another job wrote it, check that job's log; "
                "if the shared filesystem is slow, raise the timeout."
            )
        time.sleep(interval)


# --------------------------------------------------------------------------------------------------- markers


def file_digest(path: Path | str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    files = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name not in MARKER_NAMES and not p.name.startswith(_TMP_PREFIX):
            files.append(p)
    return files


def write_marker(
    directory: Path | str,
    name: str,
    extra: dict | None = None,
    checksums: bool = True,
    digests: dict[str, str] | None = None,
) -> dict:
    """Record every file of ``directory`` (size and sha256) in marker ``name``, written last and atomically.

    The marker is what makes the directory complete: call this only after every other file is in place.
    ``digests`` (relative path -> sha256) are checksums the writer computed while streaming the file out, so
    large files are not read back just to hash them.
    """
    directory = Path(directory)
    files = {}
    for p in _payload_files(directory):
        rel = p.relative_to(directory).as_posix()
        entry: dict[str, int | str] = {"size": p.stat().st_size}
        if checksums:
            entry["sha256"] = (digests or {}).get(rel) or file_digest(p)
        files[rel] = entry
    marker = {
        "complete": True,
        "written_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "files": files,
        **(extra or {}),
    }
    atomic_write_json(directory / name, marker)
    return marker


def read_marker(directory: Path | str, name: str, verify: str = "size") -> dict | None:
    """The marker's content if the directory is complete, else None.

    ``verify``: "none" trusts the marker, "size" (default, cheap) checks every listed file exists with its
    size, "sha256" also re-hashes them (use before trusting a checkpoint someone else wrote).
    """
    directory = Path(directory)
    try:
        marker = read_json(directory / name)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("complete") is not True:
        return None
    if verify == "none":
        return marker
    for rel, entry in marker.get("files", {}).items():
        p = directory / rel
        try:
            if p.stat().st_size != entry["size"]:
                return None
        except OSError:
            return None
        if verify == "sha256" and "sha256" in entry and file_digest(p) != entry["sha256"]:
            return None
    return marker


def marker_entry(directory: Path | str, marker: str, rel: str) -> dict | None:
    """What ``marker`` of ``directory`` recorded for file ``rel`` (``{"size", "sha256"}``), or None."""
    try:
        data = read_json(Path(directory) / marker)
    except (OSError, ValueError):
        return None
    entry = data.get("files", {}).get(rel) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None


def damaged_files(directory: Path | str, marker: str, verify: str = "size") -> list[str]:
    """Files of a directory that has ``marker`` whose size (or, with ``verify="sha256"``, content) no longer
    matches it; empty when the directory is intact or has no marker."""
    directory = Path(directory)
    try:
        data = read_json(directory / marker)
    except (OSError, ValueError):
        return []
    bad = []
    for rel, entry in (data.get("files", {}) if isinstance(data, dict) else {}).items():
        p = directory / rel
        try:
            if p.stat().st_size != entry["size"]:
                bad.append(rel)
                continue
        except OSError:
            bad.append(rel)
            continue
        if verify == "sha256" and "sha256" in entry and file_digest(p) != entry["sha256"]:
            bad.append(rel)
    return bad


def set_aside_damaged(directory: Path | str, why: str = "damaged") -> Path:
    """Rename ``directory`` to ``<directory>.damaged-<timestamp>`` (never delete what may be a user's data).

    Used when a unit (a merge, a materialised base, an expert's result) is provably damaged: the run then sees
    it as not done, and resuming redoes exactly that unit. Returns the new path.
    """
    directory = Path(directory)
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    target = directory.with_name(f"{directory.name}{DAMAGED_INFIX}{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}{DAMAGED_INFIX}{stamp}-{n}")
    os.rename(directory, target)
    fsync_dir(directory.parent)
    logging.getLogger("mrlora.runstore").warning("%s is %s: moved it aside to %s", directory, why, target)
    return target


def forget_files(directory: Path | str, marker: str, prefixes: list[str]) -> dict:
    """Rewrite ``marker`` without the entries under ``prefixes`` (relative paths or folder names), before the
    retention policy deletes them, so the directory stays verifiably complete; records them as ``pruned``."""
    directory = Path(directory)
    data = read_json(directory / marker)
    files = data.get("files", {})
    gone = sorted(rel for rel in files if any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in prefixes))
    data["files"] = {rel: entry for rel, entry in files.items() if rel not in gone}
    data["pruned"] = sorted(set(data.get("pruned", [])) | set(prefixes))
    atomic_write_json(directory / marker, data)
    return data


def replace_file(directory: Path | str, marker: str, rel: str, data: bytes) -> dict:
    """Replace file ``rel`` of a complete directory and re-record it in ``marker`` (size, and sha256 where the
    marker keeps checksums), so the directory stays verifiably complete. A crash between the two atomic writes
    leaves the directory incomplete (the size no longer matches), never wrong."""
    directory = Path(directory)
    atomic_write_bytes(directory / rel, data)
    record = read_json(directory / marker)
    old = record.get("files", {}).get(rel, {})
    entry: dict[str, int | str] = {"size": len(data)}
    if "sha256" in old:
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    record["files"] = {**record.get("files", {}), rel: entry}
    atomic_write_json(directory / marker, record)
    return record


def quarantine(exc: DamagedFileError, next_step: str) -> DamagedFileError:
    """Move the unit a damaged file belongs to aside (``set_aside_damaged``) and return the error to raise: it
    names the file, where the unit went, and ``next_step`` (what redoes it, e.g. resuming the run)."""
    if exc.unit is None or not exc.unit.exists():
        return exc
    aside = set_aside_damaged(exc.unit)
    return DamagedFileError(
        f"{exc.path} is damaged (it differs from what its marker recorded); moved "
        f"{exc.unit.name} aside to {aside}; {next_step}",
        exc.path,
        exc.unit,
    )


def reset_incomplete_dir(directory: Path | str, marker: str) -> Path:
    """Make ``directory`` an empty directory unless it is already complete (then raise).

    Writers call this before filling a directory: leftovers of a killed writer are removed, a completed
    directory is never overwritten. A directory whose marker exists but whose files no longer match it (a
    truncated file, a lost file) is damaged, not complete: it is moved aside (``set_aside_damaged``) so the unit
    can be redone, and the user can still inspect what was there.
    """
    directory = Path(directory)
    if read_marker(directory, marker, verify="none") is not None:
        if not damaged_files(directory, marker):
            raise RunStoreError(f"{directory} is already complete ({marker} exists); refusing to overwrite it")
        set_aside_damaged(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def complete_checkpoints(directory: Path | str) -> list[tuple[int, Path]]:
    """The complete ``checkpoint-<step>`` directories under ``directory``, oldest first (marker present and sizes
    matching). Every writer of step checkpoints (experts, RaTE tokens) resumes from the last of these."""
    directory = Path(directory)
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _CHECKPOINT_RE.match(p.name)
            if m and p.is_dir() and read_marker(p, CHECKPOINT_MARKER) is not None:
                found.append((int(m.group(1)), p))
    return sorted(found)


# ------------------------------------------------------------------------------------------------------- lease


def create_exclusive_json(path: Path | str, obj) -> bool:
    """Create ``path`` holding ``obj`` unless it already exists; True when this call created it.

    ``O_EXCL`` creation is atomic on NFS v3+ and Lustre, where ``flock`` is often disabled: of two processes
    racing, exactly one wins. The run lease and the per-unit claims (``mrlora.claim``) take ownership this way.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(Path(path).parent)
    return True


def move_aside(path: Path | str) -> None:
    """Break a stale ownership file by renaming it to ``<name>.broken-<id>`` (kept for a post-mortem).

    Of two processes breaking it at once only one rename succeeds; the other finds it gone and simply retries
    its ``create_exclusive_json``, so both cannot end up owners.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, path.with_name(f"{path.name}.broken-{uuid.uuid4().hex[:8]}"))


@dataclass
class LeaseInfo:
    """Who owns a run: the launcher process that created the lease and the Slurm jobs it submitted."""

    owner_id: str
    host: str
    pid: int
    created: str
    executor: str = "slurm"
    job_ids: list[str] = field(default_factory=list)
    command: str = ""

    @classmethod
    def new(cls, executor: str, command: str = "") -> "LeaseInfo":
        return cls(
            owner_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            created=_dt.datetime.now().isoformat(timespec="seconds"),
            executor=executor,
            command=command,
        )


def pid_alive(pid: int) -> bool:
    """True when ``pid`` runs on this host and is not a zombie (PID 1 may not reap orphans)."""
    if pid <= 0:  # 0 and negative ids name process groups in os.kill, never one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------- layout


@dataclass
class ExpertState:
    done: bool = False
    checkpoint_step: int | None = None
    checkpoint_path: Path | None = None


@dataclass
class CycleState:
    cycle: int
    experts: dict[str, ExpertState]
    merged: bool = False


@dataclass
class RunState:
    """What the run directory proves is finished; resume and status read only this."""

    last_complete_cycle: int
    cycles: dict[int, CycleState]

    @property
    def next_cycle(self) -> int:
        return self.last_complete_cycle + 1


# A run id is its start time, then ``_`` and a name or a short random suffix. Only letters, digits, "_" and "."
# follow: the id prefixes Slurm job names (mrlora-<id>-...), and no id may be another's prefix up to a "-".
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]{0,62}")
_RUN_ID_RE = re.compile(rf"(\d{{8}}_\d{{6}})(?:_({RUN_NAME_RE.pattern}))?")


def new_run_ts(now: _dt.datetime | None = None, name: str | None = None) -> str:
    """A new run id: the start time and ``name`` or a random suffix, so launches in the same second (a sweep)
    never collide, and ids still sort by start time."""
    stamp = (now or _dt.datetime.now()).strftime(RUN_TS_FORMAT)
    return f"{stamp}_{name if name is not None else uuid.uuid4().hex[:6]}"


def is_run_ts(name: str) -> bool:
    """A run id: ``20261123_101500_3fa9c1`` or ``20261123_101500_<name>`` (letters, digits, "_", "."), or an
    older run's id, the start time alone (``20261123_101500``)."""
    m = _RUN_ID_RE.fullmatch(name)
    if m is None:
        return False
    try:
        _dt.datetime.strptime(m.group(1), RUN_TS_FORMAT)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, init=False)
class RunDir:
    """Paths and completion checks of one run: ``OUT_ROOT/<model>/<RUN_TS>/``."""

    root: Path

    def __init__(self, root: Path | str) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- identity
    @property
    def run_ts(self) -> str:
        return self.root.name

    @classmethod
    def create(cls, out_root: Path | str, model: str, run_ts: str | None = None) -> "RunDir":
        """Create a new, empty run directory named ``run_ts`` (default: a fresh ``new_run_ts()``); the id is
        the run's identity, so never reuse one. A fresh id that exists already is drawn again (no waiting)."""
        parent = Path(out_root) / model
        parent.mkdir(parents=True, exist_ok=True)
        stamp = run_ts or new_run_ts()
        for _ in range(20):
            try:
                (parent / stamp).mkdir()
                return cls(parent / stamp)
            except FileExistsError:
                if run_ts:
                    raise RunStoreError(
                        f"run {parent / stamp} already exists: choose another --name, or continue "
                        f"that run with --resume {stamp}"
                    ) from None
                stamp = new_run_ts()
        raise RunStoreError(f"could not create a fresh run directory under {parent}")

    @classmethod
    def find(cls, out_root: Path | str, model: str, run_ts: str | None = None) -> "RunDir":
        """The run ``run_ts`` (or the newest run with a run.json) of ``model`` under ``out_root``."""
        parent = Path(out_root) / model
        if run_ts:
            run = cls(parent / run_ts)
            if not run.run_json.exists():
                raise RunStoreError(
                    f"no run {run_ts} under {parent} (missing {run.run_json}); `python -m launch.status "
                    f"--out-root {out_root} --model {model}` lists runs"
                )
            return run
        runs = (
            sorted(p for p in parent.glob("*") if is_run_ts(p.name) and (p / RUN_JSON).exists())
            if parent.is_dir()
            else []
        )
        if not runs:
            raise RunStoreError(f"no runs of {model} under {out_root}; start one with python -m launch.mapreduce")
        return cls(runs[-1])

    # -- paths
    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def lease_path(self) -> Path:
        return self.root / LEASE

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def evals_dir(self) -> Path:
        """``evals/``: where the commands a run suggests write its evals and report (one run, one folder)."""
        return self.root / "evals"

    @property
    def tracking_dir(self) -> Path:
        """``tracking/``: TensorBoard / W&B files of the whole run, one curve per expert lineage (mrlora.tracking)."""
        return self.root / "tracking"

    def cycle_dir(self, cycle: int) -> Path:
        if cycle < 1:
            raise ValueError(f"cycles count from 1, got {cycle}")
        return self.root / f"cycle_{cycle:04d}"

    def expert_dir(self, cycle: int, reward: str) -> Path:
        return self.cycle_dir(cycle) / reward

    def checkpoint_dir(self, cycle: int, reward: str, step: int) -> Path:
        return self.expert_dir(cycle, reward) / f"checkpoint-{step}"

    def adapter_dir(self, cycle: int, reward: str) -> Path:
        return self.expert_dir(cycle, reward) / "adapter"

    def metrics_path(self, cycle: int, reward: str) -> Path:
        return self.expert_dir(cycle, reward) / "metrics.jsonl"

    def merged_dir(self, cycle: int) -> Path:
        return self.cycle_dir(cycle) / "merged"

    def base_dir(self, cycle: int) -> Path:
        """The materialised model after ``cycle`` (written by that cycle's merge job every K cycles)."""
        return self.cycle_dir(cycle) / "base"

    # -- run.json
    def write_run_json(self, data: dict) -> None:
        atomic_write_json(self.run_json, data)

    def read_run_json(self) -> dict:
        try:
            return read_json(self.run_json)
        except FileNotFoundError:
            raise RunStoreError(f"{self.root} is not a run directory (no {RUN_JSON})") from None
        except ValueError as exc:
            raise RunStoreError(f"{self.run_json} is corrupt ({exc}); restore it from a backup") from None

    # -- completion
    def expert_done(self, cycle: int, reward: str) -> dict | None:
        return read_marker(self.expert_dir(cycle, reward), DONE_MARKER)

    def merge_done(self, cycle: int) -> dict | None:
        return read_marker(self.merged_dir(cycle), MERGE_MARKER)

    def checkpoints(self, cycle: int, reward: str) -> list[tuple[int, Path]]:
        """Complete step checkpoints of an expert, oldest first."""
        return complete_checkpoints(self.expert_dir(cycle, reward))

    def latest_checkpoint(self, cycle: int, reward: str) -> tuple[int, Path] | None:
        found = self.checkpoints(cycle, reward)
        return found[-1] if found else None

    def cycles_present(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.root.glob("cycle_*") if (m := _CYCLE_RE.match(p.name)))

    def scan(self, rewards: list[str]) -> RunState:
        """What is provably finished: the contiguous prefix of merged cycles, and per-expert progress."""
        cycles: dict[int, CycleState] = {}
        for c in self.cycles_present():
            experts = {}
            for r in rewards:
                latest = self.latest_checkpoint(c, r)
                experts[r] = ExpertState(
                    done=self.expert_done(c, r) is not None,
                    checkpoint_step=latest[0] if latest else None,
                    checkpoint_path=latest[1] if latest else None,
                )
            cycles[c] = CycleState(c, experts, merged=self.merge_done(c) is not None)
        last = 0
        while last + 1 in cycles and cycles[last + 1].merged:
            last += 1
        return RunState(last_complete_cycle=last, cycles=cycles)

    def merged_updates(self, up_to_cycle: int) -> list[Path]:
        """Merged-update directories of cycles 1..up_to_cycle; every one must be complete."""
        dirs = []
        for c in range(1, up_to_cycle + 1):
            if self.merge_done(c) is None:
                raise RunStoreError(
                    f"cycle {c} of {self.root} has no complete merge ({self.merged_dir(c) / MERGE_MARKER}); "
                    f"resume the run to redo it"
                )
            dirs.append(self.merged_dir(c))
        return dirs

    # -- lease
    def read_lease(self) -> LeaseInfo | None:
        try:
            data = read_json(self.lease_path)
        except FileNotFoundError:
            return None
        except ValueError:
            # a torn lease can only come from a writer killed mid-write; treat as held by nobody we can check
            return LeaseInfo(owner_id="corrupt", host="?", pid=-1, created="?")
        return LeaseInfo(**{k: v for k, v in data.items() if k in LeaseInfo.__dataclass_fields__})

    def acquire_lease(self, info: LeaseInfo, is_stale: Callable[[LeaseInfo], bool]) -> LeaseInfo:
        """Take ownership of the run or raise LeaseHeldError naming the owner.

        The lease file is created with O_EXCL, which is atomic on NFS v3+ and Lustre. A held lease is broken
        only when ``is_stale(holder)`` says its jobs and process are gone; breaking renames it aside first, so
        two launchers racing to break it cannot both win.
        """
        for _ in range(3):
            if create_exclusive_json(self.lease_path, asdict(info)):
                return info
            holder = self.read_lease()
            if holder is None:
                continue
            if holder.owner_id == info.owner_id:
                return info
            if not is_stale(holder):
                jobs = f" (jobs {', '.join(holder.job_ids)})" if holder.job_ids else ""
                raise LeaseHeldError(
                    f"run {self.root} is owned by another launcher: host {holder.host} pid {holder.pid}"
                    f"{jobs}, since {holder.created}. Wait for it, cancel it with "
                    f"`python -m launch.cancel {self.run_ts}`, or pass --adopt to take over its jobs.",
                    holder,
                )
            move_aside(self.lease_path)
        raise RunStoreError(f"could not acquire the lease of {self.root}: it keeps changing hands; retry")

    def update_lease(self, info: LeaseInfo) -> None:
        """Rewrite our own lease (e.g. with the job ids just submitted)."""
        holder = self.read_lease()
        if holder is None or holder.owner_id != info.owner_id:
            raise RunStoreError(f"lost the lease of {self.root} to {holder}; another launcher took over the run")
        atomic_write_json(self.lease_path, asdict(info))

    def release_lease(self, info: LeaseInfo) -> None:
        holder = self.read_lease()
        if holder is not None and holder.owner_id == info.owner_id:
            with contextlib.suppress(FileNotFoundError):
                self.lease_path.unlink()
            fsync_dir(self.root)


# ------------------------------------------------------------------------------------ the model after cycle c


@dataclass(frozen=True)
class ModelAfter:
    """The model after ``cycle``: ``base_dir`` (a materialised ``cycle_XXXX/base``, or None for base_0) with
    ``update_dirs`` folded on top, in order. ``chain`` is every update the model contains."""

    cycle: int
    base_dir: Path | None
    update_dirs: tuple[Path, ...]
    chain: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def base_cycle(self) -> int:
        """The cycle whose materialised base is used (0: base_0)."""
        return _cycle_number(self.base_dir) if self.base_dir is not None else 0

    def describe(self) -> str:
        base = f"cycle {self.base_cycle}'s materialised base" if self.base_dir is not None else "base_0"
        return f"{base} + {len(self.update_dirs)} update(s)"


@dataclass(frozen=True)
class MapStart:
    """Where the Map step of a cycle starts: the model ``base`` (the model after the previous cycle, minus the
    update a reference-mode LoRA continues), then (reference mode only) the LoRA initialised from
    ``init_adapter`` instead of fresh."""

    base: ModelAfter
    init_adapter: Path | None

    @property
    def update_dirs(self) -> list[Path]:
        return list(self.base.update_dirs)


def _cycle_number(unit_dir: Path) -> int:
    """The cycle of ``cycle_XXXX/<unit>``."""
    return int(Path(unit_dir).parent.name.split("_")[1])


def update_info(update_dir: Path | str) -> dict:
    """``update.json`` of a merged cycle (RunStoreError when unreadable)."""
    path = Path(update_dir) / UPDATE_JSON
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise RunStoreError(f"cannot read {path} ({exc}); redo that cycle's merge (resume the run)") from None


def updates_after(run_dir: Path | str, cycle: int) -> list[Path]:
    """Update directories whose fold onto base_0 is the model after ``cycle`` (0: base_0 itself).

    Exact updates add up: cycles 1..cycle. A reference-mode update whose experts continued the previous
    reference merge's LoRA already contains that previous update (``supersedes_previous`` in update.json), so
    it replaces it in the chain instead of adding to it. Every cycle up to ``cycle`` must be merged. Readers
    get the model from ``model_after``, which starts from a materialised base where one exists.
    """
    chain: list[Path] = []
    for d in RunDir(run_dir).merged_updates(cycle):
        if update_info(d).get("supersedes_previous"):
            chain.pop()
        chain.append(d)
    return chain


def base_chain(base_dir: Path | str) -> list[int] | None:
    """The cycles whose updates an intact (sizes checked) materialised base contains, else None."""
    marker = read_marker(base_dir, BASE_MARKER)
    if marker is None or not isinstance(marker.get("chain"), list):
        return None
    return [int(c) for c in marker["chain"]]


def model_after(run_dir: Path | str, cycle: int) -> ModelAfter:
    """THE answer to "which weights are the model after ``cycle``" (0: base_0), for Map, eval, export, RaTE and
    status: the newest intact materialised base whose folded chain is a prefix of the cycle's chain of
    updates, plus the updates after it. A deleted or damaged base is skipped (an older one, or base_0, plus
    more updates is the same model). Every cycle up to ``cycle`` must have a complete merge."""
    if cycle < 0:
        raise ValueError(f"cycle must be >= 0 (0 is base_0), got {cycle}")
    run = RunDir(run_dir)
    chain = updates_after(run.root, cycle)
    chain_cycles = [_cycle_number(d) for d in chain]
    for b in sorted((c for c in run.cycles_present() if c <= cycle), reverse=True):
        folded = base_chain(run.base_dir(b))
        if folded is not None and folded == chain_cycles[: len(folded)]:
            return ModelAfter(cycle, run.base_dir(b), tuple(chain[len(folded) :]), tuple(chain))
    return ModelAfter(cycle, None, tuple(chain), tuple(chain))


def continues_reference_merge(run: "RunDir", merge_mode: str, cycle: int) -> bool:
    """Whether the experts of ``cycle`` continue the previous cycle's averaged LoRA (reference mode only): then
    the Map step starts from it (``map_start``) and this cycle's update supersedes the previous one."""
    return merge_mode == "reference" and cycle > 1 and update_info(run.merged_dir(cycle - 1)).get("mode") == "reference"


def map_start(run_dir: Path | str, cycle: int) -> MapStart:
    """How the Map step of ``cycle`` (and the RaTE teacher and eval of its experts) builds its starting weights.

    Exact mode: the model after cycle - 1 and a fresh LoRA. Reference mode (the public code, for ablations):
    when cycle - 1 was a reference merge, that cycle's averaged LoRA (``merged/adapter``) is continued on the
    model without its update; both give the same model at step 0.
    """
    if cycle < 1:
        raise ValueError(f"cycles count from 1, got {cycle}")
    run = RunDir(run_dir)
    model = model_after(run.root, cycle - 1)
    mode = run.read_run_json()["config"]["mapreduce"]["merge_mode"]
    if continues_reference_merge(run, mode, cycle):
        if not model.update_dirs:  # reference-mode runs are never materialised (mrlora.reduce.materialise)
            raise RunStoreError(f"{model.base_dir} contains cycle {cycle - 1}'s reference update; move it aside")
        trimmed = ModelAfter(cycle - 1, model.base_dir, model.update_dirs[:-1], model.chain[:-1])
        return MapStart(base=trimmed, init_adapter=run.merged_dir(cycle - 1) / CONTINUE_ADAPTER)
    return MapStart(base=model, init_adapter=None)


def disk_usage(run_dir: Path | str) -> dict[str, int]:
    """Bytes on disk per kind of entry of a run: ``bases``, ``updates``, ``experts`` (adapters, step
    checkpoints, metrics), ``rate``, ``set_aside`` (``*.damaged-*``) and ``other`` (run.json, logs)."""
    run = RunDir(run_dir)
    usage = dict.fromkeys(("bases", "updates", "experts", "rate", "set_aside", "other"), 0)
    for dirpath, _, names in os.walk(run.root):
        rel = Path(dirpath).relative_to(run.root).parts
        if any(DAMAGED_INFIX in part for part in rel):
            kind = "set_aside"
        elif len(rel) >= 2 and _CYCLE_RE.match(rel[0]):
            kind = {"base": "bases", "merged": "updates", "rate": "rate"}.get(rel[1], "experts")
        else:
            kind = "other"
        for name in names:
            with contextlib.suppress(OSError):
                usage[kind] += os.lstat(os.path.join(dirpath, name)).st_size
    return usage


def storage_summary(run_dir: Path | str, cycle: int) -> str:
    """One line for ``launch.status``: what the model after ``cycle`` is read from, and the run's disk use."""
    usage = disk_usage(run_dir)
    parts = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.1f}" for k, v in usage.items() if v)
    try:
        model = model_after(run_dir, cycle).describe()
    except RunStoreError:
        model = "not readable (a merge is missing; resume the run)"
    return f"model after cycle {cycle}: {model}   disk {sum(usage.values()) / 1e9:.1f} GB ({parts})"
