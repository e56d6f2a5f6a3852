"""``python -m launch.logs RUN_TS [--cycle C] [--reward R | --merge] [-f]``: print or follow the right job log.

A run's logs live in two places that a user should not have to know: submitit's folder for Slurm jobs
(``logs/slurm/<job>_<task>_0_log.{out,err}``, found through the job journal, newest submission of the unit)
and ``logs/local/<task>.log`` for the local executor. This command finds the log of one unit (an expert, a
merge or a RaTE token of a cycle), prints its last lines and, with ``-f``, follows it as ``tail -f`` does.
Without ``--reward``/``--merge`` it lists the logs of the cycle; without ``--cycle`` it takes the newest cycle
that has any.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launch.journal import latest_by_unit, read_records
from launch.local import LOCAL_LOG_DIR
from launch.mapreduce import find_run, out_root_of
from launch.plan import MERGE, RATE, rate_unit, safe_name
from launch.runs import LaunchError
from mrlora.cli import add_version_flag, run_cli
from mrlora.runstore import RunDir


def local_log(run: RunDir, cycle: int, unit: str) -> Path | None:
    """The local executor's log of ``unit`` ("<reward>", "merge" or "rate:<reward>") in ``cycle``, if written."""
    folder = run.logs_dir / LOCAL_LOG_DIR
    names: tuple[str, ...] = (
        f"c{cycle:04d}-{unit}.log",
        f"c{cycle:04d}-experts-{unit}.log",
        f"c{cycle:04d}-{safe_name(unit)}.log",
        f"c{cycle:04d}-experts-{safe_name(unit)}.log",
    )
    if unit.startswith(f"{RATE}:"):
        reward = unit.split(":", 1)[1]
        names = (
            f"c{cycle:04d}-{RATE}-{safe_name(reward)}.log",
            f"c{cycle:04d}-{RATE}-{reward}.log",
            f"c{cycle:04d}-{RATE}.log",
        )
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


def unit_logs(run: RunDir, cycle: int, unit: str) -> list[Path]:
    """The existing log files of ``unit`` in ``cycle``: a Slurm job's stdout and stderr, or the local log."""
    rec = latest_by_unit(read_records(run)).get((cycle, unit))
    found: list[Path] = []
    if rec is not None:
        reward = None if unit == MERGE else unit.split(":", 1)[1] if unit.startswith(f"{RATE}:") else unit
        found = [p for p in rec.log_paths(reward) if p.exists()]
    local = local_log(run, cycle, unit)
    if local is not None:
        found.append(local)
    return found


def _units(run: RunDir, cycle: int) -> list[str]:
    """Every unit a log can exist for in ``cycle``: the run's rewards, the merge and the rewards' RaTE tokens."""
    from mrlora.config import config_from_dict

    rewards = list(config_from_dict(run.read_run_json()["config"]).rewards)
    return [*rewards, MERGE, *(rate_unit(r) for r in rewards)]


def _newest_cycle_with_logs(run: RunDir) -> int:
    cycles = sorted({rec.cycle for rec in read_records(run)})
    folder = run.logs_dir / LOCAL_LOG_DIR
    if folder.is_dir():
        cycles += [int(p.name[1:5]) for p in folder.glob("c[0-9][0-9][0-9][0-9]-*.log")]
    if not cycles:
        raise LaunchError(f"run {run.run_ts} has no job logs yet; see python -m launch.status {run.run_ts}")
    return max(cycles)


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of ``path`` (read from the end, so a long log costs no more than its tail)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        block, data = 8192, b""
        while size > 0 and data.count(b"\n") <= n:
            step = min(block, size)
            size -= step
            fh.seek(size)
            data = fh.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-n:] if n > 0 else []


def follow(path: Path, poll_s: float = 0.5) -> None:
    """Print what is appended to ``path`` until Ctrl-C (a requeued job appends to the same log)."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        while True:
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
            else:
                time.sleep(poll_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.logs", description=__doc__.split("\n")[0])
    p.add_argument("run_ts", nargs="?", help="the run's id (default: the newest run)")
    p.add_argument("--out-root", metavar="DIR", help="where runs live (default: $MRLORA_OUT_ROOT or ./runs)")
    p.add_argument("--model", help="the model directory to look in (default: any)")
    p.add_argument("--cycle", type=int, help="cycle (default: the newest cycle with a log)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--reward", help="the expert of this reward")
    which.add_argument("--merge", action="store_true", help="the cycle's merge job")
    which.add_argument("--rate", metavar="REWARD", help="the RaTE distillation of this reward's expert")
    p.add_argument("-n", "--lines", type=int, default=40, help="how many last lines to print (default 40)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what the job appends (Ctrl-C stops)")
    p.add_argument("--stderr", action="store_true", help="a Slurm job's stderr instead of its stdout")
    add_version_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: the log on stdout; exit 2 with one line on stderr when there is no such log."""
    return run_cli(_main, argv, prog="launch.logs")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    run = find_run(out_root_of(args), args.model, args.run_ts)
    cycle = args.cycle if args.cycle is not None else _newest_cycle_with_logs(run)
    unit = MERGE if args.merge else rate_unit(args.rate) if args.rate else args.reward
    if unit is None:
        listed = [(u, unit_logs(run, cycle, u)) for u in _units(run, cycle)]
        listed = [(u, paths) for u, paths in listed if paths]
        if not listed:
            raise LaunchError(f"cycle {cycle} of run {run.run_ts} has no job logs yet")
        print(f"logs of cycle {cycle} of run {run.run_ts} (pick one with --reward R, --merge or --rate R):")
        for u, paths in listed:
            for path in paths:
                print(f"  {u:<24} {path}")
        return 0
    paths = unit_logs(run, cycle, unit)
    if args.stderr:
        paths = [p for p in paths if p.suffix == ".err"] or paths
    else:
        paths = [p for p in paths if p.suffix != ".err"] or paths
    if not paths:
        known = ", ".join(_units(run, cycle))
        raise LaunchError(
            f"no log of {unit} in cycle {cycle} of run {run.run_ts} (units: {known}); the job may not "
            f"have started yet: python -m launch.status {run.run_ts}"
        )
    path = paths[0]
    print(f"==> {path} <==", file=sys.stderr)
    for line in tail_lines(path, args.lines):
        print(line)
    sys.stdout.flush()
    if args.follow:
        follow(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
