"""Runs as the launcher sees them: run.json, progress for the planner, the lease and its liveness check.

The run directory is the single source of truth (docs/design.md section 3). This module turns it into what the
planner needs (``Progress``), writes ``run.json`` once and appends resume changes to its ``history``, and
decides whether a lease's owner is gone: a Slurm chain is alive while any of its jobs is in the queue, a local
run while its launcher process lives on this host.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import socket
import sys
from pathlib import Path

from launch.journal import read_records
from launch.plan import MERGE, RATE, Progress, rate_unit
from launch.profiles import ClusterProfile, profile_from_dict
from mrlora.cli import UserError, code_version
from mrlora.runstore import DONE_MARKER, LeaseInfo, RunDir, pid_alive, read_marker


class LaunchError(UserError, RuntimeError):
    """A launch that must not go ahead; the message tells the user what to do instead."""


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", "launch.mapreduce", *sys.argv[1:]])


def resume_command(run: RunDir) -> str:
    """The exact command that continues ``run`` from any directory (its out-root and model spelled out)."""
    return (
        f"python -m launch.mapreduce --resume {run.run_ts} --out-root {shlex.quote(str(run.root.parent.parent))} "
        f"--model {shlex.quote(run.root.parent.name)}"
    )


def profile_of(meta: dict) -> ClusterProfile:
    return profile_from_dict(meta["cluster"], where=f"run.json cluster profile of {meta.get('run_ts', '?')}")


def progress_of(run: RunDir, rewards: list[str], live: dict | None = None) -> Progress:
    """What the run directory proves finished (plus work held by queued jobs) in the planner's terms."""
    state = run.scan(rewards)
    done = frozenset((c, r) for c, cs in state.cycles.items() for r, es in cs.experts.items() if es.done)
    merged = frozenset(c for c, cs in state.cycles.items() if cs.merged)
    rate_done = frozenset((c, r) for c in state.cycles for r in rewards if rate_is_done(run, c, r))
    return Progress(done=done, merged=merged, live=dict(live or {}), rate_done=rate_done)


def rate_cycles_of(cfg) -> list[int]:
    """``mapreduce.rate_after_cycles`` of a config (absent in run.json files written before the field existed)."""
    return [int(c) for c in cfg.mapreduce.get("rate_after_cycles", None) or []]


def rate_dir(run: RunDir, cycle: int, reward: str) -> Path:
    """``cycle_XXXX/rate/<reward>/``: where ``mrlora.rate.distill_in_run`` writes the token (docs/internals.md)."""
    return run.cycle_dir(cycle) / RATE / reward


def rate_is_done(run: RunDir, cycle: int, reward: str) -> bool:
    return read_marker(rate_dir(run, cycle, reward), DONE_MARKER) is not None


def live_units(run: RunDir, queued) -> dict:
    """Map queued jobs of the run to the units they will produce: {(cycle, reward|"merge"|"rate:<reward>"): id}."""
    records = {r.job_id: r for r in read_records(run)}
    live: dict = {}
    for q in queued:
        rec = records.get(q.base_id)
        if rec is None:
            continue
        if rec.kind == MERGE:
            live[(rec.cycle, MERGE)] = rec.job_id
            continue
        unit = rate_unit if rec.kind == RATE else (lambda r: r)
        if rec.array and "_" in q.job_id and q.job_id.split("_", 1)[1].isdigit():
            index = int(q.job_id.split("_", 1)[1])
            if index < len(rec.rewards):
                live[(rec.cycle, unit(rec.rewards[index]))] = rec.job_id
        else:  # a single job, or array tasks not yet split ("123_[0-2]"): all of its rewards
            for r in rec.rewards:
                live[(rec.cycle, unit(r))] = rec.job_id
    return live


def lease_is_stale(run_ts: str):
    """A liveness check for RunDir.acquire_lease: is the holder's chain (or local launcher) gone?"""

    def check(holder: LeaseInfo) -> bool:
        if holder.owner_id == "corrupt":
            return True
        same_host = holder.host == socket.gethostname()
        if holder.executor == "local" or not holder.job_ids:
            if same_host:
                return not pid_alive(holder.pid)
            if holder.executor == "local":
                raise LaunchError(
                    f"run {run_ts} is being run by a local launcher on host {holder.host} (pid {holder.pid}); "
                    f"this host cannot check it. Stop it there, or delete the run's LEASE.json if it is dead."
                )
        from launch import slurm

        return not slurm.run_jobs_in_queue(run_ts, set(holder.job_ids))

    return check


def check_out_root(out_root: Path) -> None:
    """Fail before anything is written when ``out_root`` cannot hold a run directory."""
    probe = out_root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise LaunchError(f"--out-root {out_root}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LaunchError(
            f"--out-root {out_root} is not writable ({probe} denies write access); "
            f"pass --out-root with a directory you can write on the shared filesystem"
        )


def new_run_json(run: RunDir, model: str, cfg_dict: dict, profile: ClusterProfile, executor: str) -> dict:
    return {
        "run_ts": run.run_ts,
        "model": model,
        "created": now(),
        "code_version": code_version(),
        "config": cfg_dict,
        "cluster": profile.to_dict(),
        "executor": executor,
        "history": [{"at": now(), "command": command_line(), "changes": {}, "action": "start"}],
    }


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict:
    """{dotted key: [old, new]} for every value that differs."""
    a, b = flatten(old), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# Changing these mid-run would make finished cycles incompatible with the rest: start a new run instead.
FROZEN_ON_RESUME = ("rewards", "model.", "lora.")


def trained_work(run: RunDir, rewards: list[str]) -> str | None:
    """The first merge, finished expert or checkpoint in the run (work that depends on its model, LoRA and
    rewards), or None when nothing was trained yet."""
    for c, cs in sorted(run.scan(rewards).cycles.items()):
        if cs.merged:
            return f"the merge of cycle {c}"
        for r, es in cs.experts.items():
            if es.done:
                return f"expert {r} of cycle {c}"
            if es.checkpoint_step is not None:
                return f"checkpoint {es.checkpoint_step} of expert {r} in cycle {c}"
    return None


def check_resume_changes(changes: dict, run: RunDir, rewards: list[str]) -> None:
    """Refuse changes that finished work contradicts: a frozen key once anything was trained (until then, e.g.
    a model path fixed after the first job could not load it, it may change), fewer cycles than are merged."""
    frozen = [k for k in changes if k == "rewards" or any(k.startswith(p) for p in FROZEN_ON_RESUME if p.endswith("."))]
    work = trained_work(run, rewards) if frozen else None
    if work is not None:
        key = frozen[0]
        raise LaunchError(
            f"--set {key} cannot change on resume: {work} was trained with {changes[key][0]!r}. Start a new run "
            f"to use {changes[key][1]!r}."
        )
    if "mapreduce.cycles" in changes:
        merged = run.scan(rewards).last_complete_cycle
        wanted = changes["mapreduce.cycles"][1]
        if isinstance(wanted, int) and wanted < merged:
            raise LaunchError(
                f"--set mapreduce.cycles={wanted}: run {run.run_ts} has already merged {merged} cycles, so it "
                f"cannot have fewer. Keep mapreduce.cycles >= {merged}; to use the model of cycle {wanted}, evaluate "
                f"or export it (python -m eval.run --checkpoint {run.root}:{wanted})."
            )
