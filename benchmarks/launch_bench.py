"""Launcher benchmark: scheduling overhead per cycle on the local Slurm cluster, and --dry-run time for 80 cycles.

Scheduling overhead of cycle c = (end of merge c - end of merge c-1) - (longest expert of c) - (merge c), all
from sacct: what the dependency chain, Slurm's scheduler and the window extension cost on top of the jobs
themselves (a job's own start-up, srun + python + submitit, counts as job time in sacct's Elapsed).
By default the jobs are the launcher tests' stand-in entry
points (a fixed sleep per step) so the figure is the launcher's, not the training's; ``--real`` uses the real
tiny-SD3 training and merge instead.

Run (the local cluster must be up: sudo bash tests/cluster/slurm-up.sh):
    SLURM_CONF=/var/tmp/mrlora-slurm/etc/slurm.conf python benchmarks/launch_bench.py [--cycles 4] [--window 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import slurm  # noqa: E402
from launch.journal import read_records  # noqa: E402
from mrlora.runstore import RunDir  # noqa: E402


def _when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def dry_run_seconds(repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "launch.mapreduce",
                    "--model",
                    "flux",
                    "--cycles",
                    "80",
                    "--cluster",
                    "example-gpu",
                    "--executor",
                    "slurm",
                    "--dry-run",
                    "--out-root",
                    tmp,
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"dry run failed: {proc.stderr}")
        best = min(best, elapsed)
    return best


def chain_overhead(cycles: int, window: int, real: bool, steps: int, step_s: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="launch_bench_"))
    profile = re.sub(
        r"(?m)^window_cycles = \d+",
        f"window_cycles = {window}",
        (REPO / "configs" / "clusters" / "local.toml").read_text(),
    )
    (tmp / "cluster.toml").write_text(profile)
    env = dict(os.environ)
    if not real:
        env.update(
            MRLORA_JOB_ENTRYPOINTS="test_launch_fake_entrypoints",
            FAKE_STEP_S=str(step_s),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")])),
        )
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.mapreduce",
            "--model",
            "tiny-sd3",
            "--rewards",
            "brightness",
            "colourfulness",
            "--cycles",
            str(cycles),
            "--cluster",
            str(tmp / "cluster.toml"),
            "--executor",
            "slurm",
            "--out-root",
            str(tmp / "out"),
            "--set",
            f"train.steps={steps}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    submit_s = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"launch failed: {proc.stderr}")
    run = RunDir(re.search(r"run directory: (\S+)", proc.stdout).group(1))
    while slurm.run_jobs_in_queue(run.run_ts):
        time.sleep(1.0)
    total_s = time.monotonic() - t0
    if run.scan(["brightness", "colourfulness"]).last_complete_cycle != cycles:
        raise SystemExit(f"the chain did not finish; see python -m launch.status {run.run_ts} --out-root {tmp / 'out'}")
    records = read_records(run)
    for _ in range(60):  # slurmdbd records ends a moment after the jobs leave the queue
        acct = {a.job_id: a for a in slurm.sacct_jobs([r.job_id for r in records])}
        if all(a.end not in ("", "Unknown") for a in acct.values()):
            break
        time.sleep(1.0)
    merge_end, rows = {}, []
    for c in range(1, cycles + 1):
        recs = [r for r in records if r.cycle == c]
        merge = next(acct[r.job_id] for r in recs if r.kind == "merge")
        experts = [acct[r.task_id(w)] for r in recs if r.kind == "expert" for w in r.rewards]
        merge_end[c] = _when(merge.end)
        if c == 1:
            continue
        wall = (merge_end[c] - merge_end[c - 1]).total_seconds()
        slowest = max(e.elapsed_s for e in experts)
        overhead = wall - slowest - merge.elapsed_s
        boundary = " (window boundary: submitted by the previous merge)" if (c - 1) % window == 0 else ""
        rows.append(overhead)
        print(
            f"  cycle {c}: wall {wall:5.1f} s = slowest expert {slowest:4d} s + merge {merge.elapsed_s:3d} s "
            f"+ overhead {overhead:5.1f} s{boundary}"
        )
    print(
        f"scheduling overhead per cycle: mean {statistics.mean(rows):.1f} s, max {max(rows):.1f} s "
        f"(sacct has 1 s resolution; {cycles} cycles, window {window}, "
        f"{'real tiny-SD3 jobs' if real else f'stand-in jobs {steps} x {step_s} s'})"
    )
    print(f"launcher: submit {submit_s:.2f} s on the login node; whole chain {total_s:.1f} s; run {run.root}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--real", action="store_true", help="real tiny-SD3 training and merge instead of stand-ins")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--step-s", type=float, default=1.0, help="stand-in seconds per step")
    p.add_argument("--skip-chain", action="store_true", help="only time --dry-run")
    args = p.parse_args()
    print(
        f"--dry-run, flux, 80 cycles, example-gpu profile (320 jobs): {dry_run_seconds():.2f} s wall "
        f"(best of 3, including interpreter start)"
    )
    if not args.skip_chain:
        if slurm.slurm_reachable() is not None:
            raise SystemExit("Slurm does not answer: start tests/cluster/slurm-up.sh and set SLURM_CONF")
        chain_overhead(args.cycles, args.window, args.real, args.steps, args.step_s)


if __name__ == "__main__":
    main()
