"""``python -m launch.cancel RUN_TS``: cancel exactly one run's jobs, found by comment and name.

Jobs are tagged ``--comment mrlora:<run_ts>`` and named ``mrlora-<run_ts>-...``; one squeue call finds them and
one scancel call cancels them, never anybody else's. The run directory is left as it is: finished experts and
checkpoints stay, and ``--resume`` continues from them.

A local run (no Slurm jobs) is stopped with SIGTERM: to its launcher, which forwards it to its worker and waits
for the checkpoint (``launch.local.Supervisor``), and to the process group of every worker holding a claim in the
run (``mrlora.claim``), so a worker is stopped even when its launcher is stuck or gone. SIGTERM, not SIGINT:
a launcher started with ``nohup`` or ``&`` ignores SIGINT. Slurm is not needed for a local run: where squeue
exists but Slurm does not answer, the local run is still stopped. The command waits (``--wait``) until the
processes are gone and then prints the exact command that continues the run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from launch import slurm
from launch.mapreduce import find_run, out_root_of
from launch.runs import LaunchError, resume_command
from mrlora.claim import Claim, process_start, read_holder
from mrlora.cli import add_version_flag, run_cli
from mrlora.runstore import RunDir, RunStoreError, is_run_ts, pid_alive


def local_workers(run: RunDir) -> list[Claim]:
    """The live processes on this host holding a claim on one of the run's units (experts, RaTE tokens)."""
    found = []
    for path in sorted([*run.root.glob("cycle_*/.claim-*.json"), *run.root.glob("cycle_*/rate/.claim-*.json")]):
        holder = read_holder(path)
        if holder is None or holder.host != socket.gethostname() or not pid_alive(int(holder.pid or -1)):
            continue
        if holder.pid_start and process_start(int(holder.pid)) != holder.pid_start:
            continue  # the pid now belongs to another process
        found.append(holder)
    return found


def _terminate(pid: int) -> None:
    """SIGTERM to ``pid``'s process group when it leads one (a local worker does), else to ``pid`` alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def stop_local(run: RunDir, launcher_pid: int | None, wait_s: float) -> tuple[list[str], list[int]]:
    """SIGTERM the run's local launcher and claimed workers; (what was signalled, pids still alive after
    ``wait_s`` seconds)."""
    signalled, pids = [], []
    if launcher_pid is not None and pid_alive(launcher_pid):
        os.kill(launcher_pid, signal.SIGTERM)  # the launcher, not its group: under nohup that is the caller's
        signalled.append(f"local launcher pid {launcher_pid}")
        pids.append(launcher_pid)
    for worker in local_workers(run):
        _terminate(int(worker.pid))
        signalled.append(f"{worker.what} pid {worker.pid}")
        pids.append(int(worker.pid))
    deadline = time.monotonic() + wait_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return signalled, [p for p in pids if pid_alive(p)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launch.cancel", description="Cancel every queued or running job of one run."
    )
    p.add_argument("run_ts", help="the run's id (as printed by launch.mapreduce)")
    p.add_argument("--out-root", metavar="DIR", help="where runs live (to stop a local run; default ./runs)")
    p.add_argument("--model", help="the run's model directory (to stop a local run)")
    p.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for a local run to checkpoint and exit (default 120)",
    )
    add_version_flag(p)
    args = p.parse_args(argv)
    if not is_run_ts(args.run_ts):
        print(
            f"error: {args.run_ts!r} is not a run id (YYYYmmdd_HHMMSS, optionally followed by _<suffix>)",
            file=sys.stderr,
        )
        return 2
    cancelled: list[str] = []
    still_alive: list[int] = []
    run, lease, not_found = None, None, ""
    asked_slurm = False  # whether Slurm answered: then "nothing queued" is known even without the run directory
    try:
        run = find_run(out_root_of(args), args.model, args.run_ts)
        lease = run.read_lease()
    except (LaunchError, RunStoreError) as exc:
        not_found = str(exc)
    local = lease is not None and lease.executor == "local"
    if run is not None and not local:
        try:
            local = run.read_run_json().get("executor") == "local"
        except RunStoreError:
            pass
    try:
        if slurm.have_slurm():
            try:
                jobs = slurm.run_jobs_in_queue(args.run_ts, set(lease.job_ids) if lease else set())
                asked_slurm = True
            except slurm.SlurmError as exc:
                if not local:
                    raise slurm.SlurmError(
                        f"{not_found + '; and ' if not_found else ''}Slurm does not answer, so its "
                        f"queue cannot be searched for the run's jobs: {exc}"
                    ) from None
                print(f"note: Slurm does not answer ({exc}); run {args.run_ts} is local, so nothing of it is queued")
                jobs = []
            ids = sorted({j.base_id for j in jobs})
            slurm.scancel(ids)
            cancelled.extend(ids)
    except slurm.SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if run is not None and local:
        if lease is not None and lease.host != socket.gethostname():
            print(
                f"error: run {args.run_ts} is run by a local launcher on host {lease.host} (pid {lease.pid}); "
                f"run this command there",
                file=sys.stderr,
            )
            return 2
        signalled, still_alive = stop_local(run, lease.pid if lease is not None else None, args.wait)
        cancelled.extend(signalled)
    if not cancelled:
        if not_found and not asked_slurm:
            print(f"error: {not_found}", file=sys.stderr)
            return 2
        where = f" (and no run directory of it here: {not_found})" if not_found else ""
        print(f"run {args.run_ts} has no queued or running jobs{where}")
        return 0
    print(f"cancelled run {args.run_ts}: {', '.join(cancelled)}")
    if still_alive:
        print(
            f"still checkpointing after {args.wait:.0f} s: pid(s) {', '.join(map(str, still_alive))}; they exit at "
            f"the end of their round. Resume once they are gone (a second writer is refused meanwhile)."
        )
    hint = (
        resume_command(run)
        if run is not None
        else f"python -m launch.mapreduce --resume {args.run_ts} "
        f"--out-root {out_root_of(args)}" + (f" --model {args.model}" if args.model else "")
    )
    print(f"finished work is kept; continue with: {hint}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="launch.cancel"))  # Ctrl-C: 130, like every command
