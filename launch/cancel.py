"""``python -m launch.cancel RUN_TS``: cancel exactly one run's jobs, found by comment and name.

Jobs are tagged ``--comment mrlora:<run_ts>`` and named ``mrlora-<run_ts>-...``; one squeue call finds them and
one scancel call cancels them, never anybody else's. The run directory is left as it is: finished experts and
checkpoints stay, and ``--resume`` continues from them. A local run (no Slurm jobs) is stopped by sending its
launcher SIGINT, which checkpoints the running task.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from launch import slurm
from launch.mapreduce import find_run, out_root_of
from launch.runs import LaunchError
from mrlora.runstore import RunStoreError, is_run_ts, pid_alive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.cancel", description="Cancel every queued or running job of one run.")
    p.add_argument("run_ts", help="the run's timestamp (as printed by launch.mapreduce)")
    p.add_argument("--out-root", metavar="DIR", help="where runs live (to stop a local run; default ./runs)")
    p.add_argument("--model", help="the run's model directory (to stop a local run)")
    args = p.parse_args(argv)
    if not is_run_ts(args.run_ts):
        print(f"error: {args.run_ts!r} is not a run timestamp (YYYYmmdd_HHMMSS)", file=sys.stderr)
        return 2
    cancelled: list[str] = []
    try:
        lease_ids: set[str] = set()
        run = None
        try:
            run = find_run(out_root_of(args), args.model, args.run_ts)
            lease = run.read_lease()
            lease_ids = set(lease.job_ids) if lease else set()
        except (LaunchError, RunStoreError):
            lease = None
        if slurm.have_slurm():
            jobs = slurm.run_jobs_in_queue(args.run_ts, lease_ids)
            ids = sorted({j.base_id for j in jobs})
            slurm.scancel(ids)
            cancelled.extend(ids)
        if lease is not None and lease.executor == "local" and lease.host == socket.gethostname() \
                and pid_alive(lease.pid):
            os.kill(lease.pid, signal.SIGINT)
            cancelled.append(f"local launcher pid {lease.pid}")
    except slurm.SlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cancelled:
        print(f"cancelled run {args.run_ts}: {', '.join(cancelled)}")
        print(f"finished work is kept; continue with: python -m launch.mapreduce --resume {args.run_ts}")
    else:
        print(f"run {args.run_ts} has no queued or running jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
