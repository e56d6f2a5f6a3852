"""``python -m launch.status [RUN_TS]``: where a run stands, from one squeue call, one sacct call and the run dir.

A table of cycles x (each reward + merge), plus a "RaTE" row under each cycle chosen for RaTE tokens: the job's
Slurm state, progress in optimizer steps (metrics lines or the newest complete checkpoint), the latest reward
means from ``metrics.jsonl``; then elapsed time, an estimate of the time left from the cycles already merged, and
every failure with the log to read. The run directory is the truth for what is finished (markers); Slurm tells
what is queued, running or failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launch import slurm
from launch.journal import JobRecord, latest_by_unit, read_records
from launch.local import metrics_tail, reward_keys
from launch.logs import local_log
from launch.mapreduce import find_run, out_root_of
from launch.plan import MERGE, RATE, rate_unit
from launch.runs import rate_cycles_of, rate_is_done
from mrlora.cli import add_version_flag, run_cli
from mrlora.config import config_for_reward, config_from_dict
from mrlora.runstore import RunDir, RunStoreError, disk_usage, is_run_ts, pid_alive, storage_summary

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class Cell:
    state: str = "-"  # what to show: DONE / RUNNING / PENDING(reason) / FAILED / -
    steps: str = ""
    rewards: str = ""
    failure: str = ""  # "<state>: read <log>" when it failed
    job_id: str = ""  # the Slurm task that runs / ran it (<array>_<task> in an array)
    log: str = ""  # where its output goes (python -m launch.logs prints it)


@dataclass
class RunStatus:
    run: RunDir
    model: str
    executor: str
    rewards: list[str]
    cycles: int
    last_merged: int
    rows: dict[int, dict[str, Cell]] = field(default_factory=dict)
    rate_rows: dict[int, dict[str, Cell]] = field(default_factory=dict)  # cycle -> reward -> its RaTE token
    elapsed_s: float = 0.0
    eta_s: float | None = None
    queued: int = 0
    slurm_note: str = ""
    storage: str = ""  # runstore.storage_summary: what the next Map start reads, and the run's disk use

    @property
    def all_merged(self) -> bool:
        return self.last_merged >= self.cycles

    @property
    def rate_missing(self) -> list[str]:
        """ "cycle C <reward>" for every chosen RaTE token without its DONE marker."""
        return [
            f"cycle {c} {r}" for c, row in self.rate_rows.items() for r, cell in row.items() if cell.state != "DONE"
        ]

    @property
    def finished(self) -> bool:
        return self.all_merged and not self.rate_missing


def _parse_time(text: str | None) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _reward_mean(metrics: dict) -> str:
    """The newest reward mean of a metrics line ("r=0.512"), preferring a key named like reward*mean."""
    keys = reward_keys(metrics)
    return f"r={metrics[keys[0]]:.3g}" if keys else ""


def _fill_state(
    cell: Cell,
    run: RunDir,
    launcher_alive: bool | None,
    rec: JobRecord | None,
    c: int,
    unit: str,
    done: bool,
    queue: dict,
    acct: dict,
) -> None:
    """The state of one unit (an expert, a merge or a RaTE token "rate:<reward>"): marker first, then Slurm.

    ``launcher_alive``: whether a local run's launcher still runs (None for a run on Slurm).
    """
    reward = None if unit == MERGE else unit.split(":", 1)[1] if unit.startswith(f"{RATE}:") else unit
    if rec is not None:
        task = rec.task_id(reward) if reward is not None else rec.job_id
        cell.job_id = task
        cell.log = str(rec.log_paths(reward)[0])
        q = queue.get(task) or next((v for k, v in queue.items() if v.base_id == rec.job_id and "[" in k), None)
        a = acct.get(task) or next((v for k, v in acct.items() if v.base_id == rec.job_id and "[" in k), None)
        if q is not None and not done:
            cell.state = q.state + (f"({q.reason})" if q.state == "PENDING" and q.reason not in ("", "None") else "")
        elif done:
            cell.state = "DONE"
        elif a is not None:
            cell.state = a.state
            if a.state == "CANCELLED" and a.start in ("", "None", "Unknown"):
                cell.state = "CANCELLED(never ran)"  # a parent failed or the run was cancelled
            elif a.state in FAILED_STATES or a.state == "COMPLETED":
                out, err = rec.log_paths(reward)
                cell.failure = f"{a.state} (exit {a.exit_code}): read {err} (and {out.name})"
        else:
            cell.state = "SUBMITTED"
    elif done:
        cell.state = "DONE"
    elif launcher_alive is not None:
        log = local_log(run, c, unit)
        if log is not None:
            cell.log = str(log)
            cell.state = "STARTED"
            if not launcher_alive:
                cell.state = "STOPPED"
                cell.failure = f"stopped before finishing: read {log}"


def collect(run: RunDir, use_slurm: bool = True) -> RunStatus:
    meta = run.read_run_json()
    cfg = config_from_dict(meta["config"])
    rewards = list(cfg.rewards)
    state = run.scan(rewards)
    status = RunStatus(
        run=run,
        model=meta.get("model", run.root.parent.name),
        executor=meta.get("executor", "?"),
        rewards=rewards,
        cycles=cfg.mapreduce.cycles,
        last_merged=state.last_complete_cycle,
    )
    records = read_records(run)
    latest = latest_by_unit(records)

    queue: dict[str, slurm.QueuedJob] = {}
    acct: dict[str, slurm.AccountedJob] = {}
    if use_slurm and records and slurm.have_slurm():
        try:
            for q in slurm.run_jobs_in_queue(run.run_ts, {r.job_id for r in records}):
                queue[q.job_id] = q
            acct = {a.job_id: a for a in slurm.sacct_jobs(sorted({r.job_id for r in latest.values()}))}
        except slurm.SlurmError as exc:
            status.slurm_note = f"Slurm not available ({exc}); showing the run directory only"
    status.queued = len(queue)
    launcher_alive = None
    if status.executor == "local":
        lease = run.read_lease()
        launcher_alive = lease is not None and pid_alive(lease.pid)

    steps_total = {r: config_for_reward(cfg, r).train.steps for r in rewards}
    last_cycle = max([status.last_merged + 1, *state.cycles.keys(), *(c for c, _ in latest)])
    for c in range(1, min(last_cycle, status.cycles) + 1):
        row: dict[str, Cell] = {}
        cs = state.cycles.get(c)
        for unit in [*rewards, MERGE]:
            cell = Cell()
            if unit == MERGE:
                done = bool(cs and cs.merged)
            else:
                es = cs.experts.get(unit) if cs else None
                done = bool(es and es.done)
                n, metrics = metrics_tail(run, c, unit)
                ckpt = es.checkpoint_step if es and es.checkpoint_step else 0
                cell.steps = f"{max(n, ckpt)}/{steps_total[unit]}"
                cell.rewards = _reward_mean(metrics)
            _fill_state(cell, run, launcher_alive, latest.get((c, unit)), c, unit, done, queue, acct)
            row[unit] = cell
        status.rows[c] = row

    rate_steps = {r: config_for_reward(cfg, r).rate.steps for r in rewards}
    for c in rate_cycles_of(cfg):
        if c > min(last_cycle, status.cycles) and not any((c, rate_unit(r)) in latest for r in rewards):
            continue  # not reached yet
        rate_row: dict[str, Cell] = {}
        for r in rewards:
            cell = Cell()
            n, _ = metrics_tail(run, c, r, RATE)
            cell.steps = f"{n}/{rate_steps[r]}"
            _fill_state(
                cell,
                run,
                launcher_alive,
                latest.get((c, rate_unit(r))),
                c,
                rate_unit(r),
                rate_is_done(run, c, r),
                queue,
                acct,
            )
            rate_row[r] = cell
        status.rate_rows[c] = rate_row

    created = _parse_time(meta.get("created"))
    merge_times = {}
    for c in range(1, status.last_merged + 1):
        marker = run.merge_done(c)
        if marker:
            merge_times[c] = _parse_time(marker.get("written_at"))
    end = merge_times.get(status.cycles) if status.all_merged else None
    if created:
        status.elapsed_s = ((end or _dt.datetime.now()) - created).total_seconds()
    stamps = [created] + [merge_times.get(c) for c in range(1, status.last_merged + 1)]
    durations = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:]) if a and b]
    if status.all_merged:
        status.eta_s = 0.0
    elif durations:
        recent = durations[-5:]
        status.eta_s = sum(recent) / len(recent) * (status.cycles - status.last_merged)
    status.storage = storage_summary(run.root, status.last_merged)
    return status


def to_json(status: RunStatus) -> dict:
    """The status as plain data (``--json``): what scripts and dashboards read instead of the table."""

    def cells(rows: dict[int, dict[str, Cell]]) -> dict[str, dict[str, dict]]:
        return {str(c): {u: asdict(cell) for u, cell in row.items()} for c, row in rows.items()}

    return {
        "run": status.run.run_ts,
        "path": str(status.run.root),
        "model": status.model,
        "executor": status.executor,
        "rewards": status.rewards,
        "cycles": status.cycles,
        "last_merged": status.last_merged,
        "finished": status.finished,
        "elapsed_s": round(status.elapsed_s, 1),
        "eta_s": None if status.eta_s is None else round(status.eta_s, 1),
        "queued": status.queued,
        "slurm_note": status.slurm_note,
        "storage": status.storage,
        "disk_bytes": disk_usage(status.run.root),
        "rows": cells(status.rows),
        "rate_rows": cells(status.rate_rows),
    }


def list_runs(out_root: Path) -> list[dict]:
    """Every run under ``out_root`` (``--all``): id, model, cycles merged of total, executor, disk use."""
    runs: list[dict] = []
    for path in sorted(out_root.glob("*/*")) if out_root.is_dir() else []:
        if not (is_run_ts(path.name) and (path / "run.json").is_file()):
            continue
        run = RunDir(path)
        try:
            meta = run.read_run_json()
            cfg = config_from_dict(meta["config"])
            merged = run.scan(list(cfg.rewards)).last_complete_cycle
        except (OSError, ValueError, KeyError, RunStoreError) as exc:
            runs.append({"run": path.name, "model": path.parent.name, "path": str(path), "error": str(exc)})
            continue
        lease = run.read_lease()
        runs.append(
            {
                "run": path.name,
                "model": path.parent.name,
                "path": str(path),
                "created": meta.get("created", ""),
                "executor": meta.get("executor", "?"),
                "last_merged": merged,
                "cycles": int(cfg.mapreduce.cycles),
                "owned": lease is not None,
                "disk_bytes": sum(disk_usage(path).values()),
            }
        )
    return runs


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def render_runs(runs: list[dict], out_root: Path) -> str:
    if not runs:
        return f"no runs under {out_root}; start one with python -m launch.mapreduce --model ..."
    rows = [("run", "model", "cycles", "executor", "disk", "state")]
    for r in runs:
        if "error" in r:
            rows.append((r["run"], r["model"], "?", "?", "?", f"unreadable: {r['error']}"))
            continue
        state = "finished" if r["last_merged"] >= r["cycles"] else ("active" if r["owned"] else "stopped")
        rows.append(
            (r["run"], r["model"], f"{r['last_merged']}/{r['cycles']}", r["executor"], _size(r["disk_bytes"]), state)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)).rstrip() for row in rows)


def render(status: RunStatus) -> str:
    units = [*status.rewards, MERGE]
    width = max(26, *(len(u) + 2 for u in units))
    lines = [
        f"run {status.run.run_ts} ({status.model}, {status.executor})  {status.run.root}",
        f"cycles merged: {status.last_merged}/{status.cycles}   elapsed {_fmt_duration(status.elapsed_s)}   "
        f"estimated time left {_fmt_duration(status.eta_s)}   jobs in queue: {status.queued}",
    ]
    if status.storage:
        lines.append(status.storage)
    if status.slurm_note:
        lines.append(status.slurm_note)
    lines.append("cycle " + "".join(f"{u:<{width}}" for u in units))
    failures = []
    for c, row in status.rows.items():
        cells = []
        for u in units:
            cell = row[u]
            text = cell.state if u == MERGE else f"{cell.state} {cell.steps} {cell.rewards}".strip()
            cells.append(f"{text[: width - 1]:<{width}}")
            if cell.failure:
                failures.append(f"  cycle {c} {u}: {cell.failure}")
        lines.append(f"{c:<6}" + "".join(cells))
        if c in status.rate_rows:
            rate_cells = []
            for u in status.rewards:
                cell = status.rate_rows[c][u]
                rate_cells.append(f"{f'{cell.state} {cell.steps}'.strip()[: width - 1]:<{width}}")
                if cell.failure:
                    failures.append(f"  cycle {c} RaTE {u}: {cell.failure}")
            lines.append(" RaTE " + "".join(rate_cells))
    if status.finished:
        lines.append(
            "finished: every cycle is merged" + (" and every RaTE token distilled" if status.rate_rows else "")
        )
    elif status.all_merged and status.rate_missing:
        lines.append(f"every cycle is merged; RaTE tokens still to come: {', '.join(status.rate_missing)}")
    if failures:
        lines.append("failures:")
        lines.extend(failures)
        lines.append(
            f"continue with: python -m launch.mapreduce --resume {status.run.run_ts} "
            f"--out-root {status.run.root.parent.parent} --model {status.run.root.parent.name}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: the table on stdout; exit 2 with one line on stderr when the run cannot be found."""
    return run_cli(_main, argv, prog="launch.status")


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.status", description="Show where a MapReduce LoRA run stands.")
    p.add_argument("run_ts", nargs="?", help="the run's timestamp (default: the newest run)")
    p.add_argument("--out-root", metavar="DIR", help="where runs live (default: $MRLORA_OUT_ROOT or ./runs)")
    p.add_argument("--model", help="the model directory to look in (default: any)")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=10.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 10) until the run finishes or nothing is queued",
    )
    p.add_argument("--no-slurm", action="store_true", help="do not ask Slurm; show the run directory only")
    p.add_argument("--json", action="store_true", help="print the status (or with --all the runs) as JSON")
    p.add_argument("--all", action="store_true", help="list every run under --out-root with progress and disk use")
    add_version_flag(p)
    args = p.parse_args(argv)
    if args.all:
        runs = [r for r in list_runs(out_root_of(args)) if not args.model or r["model"] == args.model]
        print(json.dumps(runs, indent=1) if args.json else render_runs(runs, out_root_of(args)))
        return 0
    run = find_run(out_root_of(args), args.model, args.run_ts)
    while True:
        status = collect(run, use_slurm=not args.no_slurm)
        text = json.dumps(to_json(status), indent=1) if args.json else render(status)
        if args.watch and sys.stdout.isatty():
            sys.stdout.write("\033[2J\033[H")
        print(text, flush=True)
        if not args.watch or status.finished or (status.executor == "slurm" and status.queued == 0):
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
