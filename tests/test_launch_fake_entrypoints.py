"""Stand-ins for the job entry points, for tests of the launcher's own machinery (ordering, failure, requeue).

They honour the contract of docs/internals.md on the run directory (metrics.jsonl per step, step checkpoints
with COMPLETE.json, DONE.json last, merged/MERGE_DONE.json last, continue from the newest checkpoint,
checkpoint + ``Preempted`` on SIGUSR2/SIGTERM) in milliseconds instead of minutes, and they check the order the
launcher promises: an expert of cycle c refuses to start unless cycles < c are merged, a merge refuses to start
unless every expert of its cycle is DONE. Selected with ``MRLORA_JOB_ENTRYPOINTS=test_launch_fake_entrypoints``.

Knobs (environment): ``FAKE_STEP_S`` seconds per step (default 0.05); ``FAKE_FAIL=<cycle>:<reward>`` makes
that expert fail once its first step is done; ``FAKE_FAIL=rate:<cycle>:<reward>`` does the same to a RaTE task.
``distill_in_run`` refuses to start before its expert's DONE and steps ``rate.steps`` times.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from mrlora.config import config_for_reward, config_from_dict
from mrlora.runstore import (
    CHECKPOINT_MARKER,
    DONE_MARKER,
    MERGE_MARKER,
    RunDir,
    atomic_write_text,
    read_marker,
    reset_incomplete_dir,
    write_marker,
)


class Preempted(Exception):
    pass


def _stop_on_signals() -> dict:
    """{"signal": None}, set to the signal number when SIGUSR2 or SIGTERM arrives."""
    stop = {"signal": None}
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    return stop


def _run_steps(metrics: Path, step: int, total: int, record, fail: str, checkpoint_of, weights: str) -> int:
    """Steps ``step + 1 .. total``: a metrics line (``record(step)``), then a complete checkpoint; ``Preempted``
    after the step a signal arrived in; a RuntimeError after the first step when ``FAKE_FAIL`` equals ``fail``.
    A resumed task keeps only the metrics of the steps its checkpoint holds."""
    stop = _stop_on_signals()
    step_s = float(os.environ.get("FAKE_STEP_S", "0.05"))
    metrics.parent.mkdir(parents=True, exist_ok=True)
    kept = metrics.read_text().splitlines()[:step] if metrics.exists() else []
    atomic_write_text(metrics, "".join(line + "\n" for line in kept))
    while step < total:
        time.sleep(step_s)
        step += 1
        with open(metrics, "a") as fh:
            fh.write(json.dumps(record(step)) + "\n")
        if os.environ.get("FAKE_FAIL") == fail:
            raise RuntimeError(f"FAKE_FAIL={fail}: fails on purpose")
        ckpt = reset_incomplete_dir(checkpoint_of(step), CHECKPOINT_MARKER)
        (ckpt / weights).write_bytes(b"fake" * step)
        write_marker(ckpt, CHECKPOINT_MARKER, {"step": step})
        if stop["signal"] is not None:
            raise Preempted(f"signal {stop['signal']} at step {step}")
    return step


def _follow_rank0(done) -> dict:
    """Ranks > 0 write nothing (as in real training): wait for rank 0's marker (``done()``), or stop on a signal."""
    stop = _stop_on_signals()
    while stop["signal"] is None:
        marker = done()
        if marker is not None:
            return marker
        time.sleep(0.1)
    raise Preempted(f"signal {stop['signal']} on a follower rank")


def train_expert_in_run(run_root: str, cycle: int, reward: str) -> dict:
    run = RunDir(run_root)
    done = run.expert_done(cycle, reward)
    if done is not None:
        return done
    run.merged_updates(cycle - 1)  # raises unless every earlier cycle is merged
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return _follow_rank0(lambda: run.expert_done(cycle, reward))
    cfg = config_for_reward(config_from_dict(run.read_run_json()["config"]), reward)
    latest = run.latest_checkpoint(cycle, reward)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    step = _run_steps(
        run.metrics_path(cycle, reward),
        latest[0] if latest else 0,
        cfg.train.steps,
        lambda step: {"step": step, "reward_mean": 0.1 * step + cycle, "pid": os.getpid(), "restart": restart},
        f"{cycle}:{reward}",
        lambda step: run.checkpoint_dir(cycle, reward, step),
        "adapter_model.safetensors",
    )
    adapter = run.adapter_dir(cycle, reward)
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter")
    return write_marker(run.expert_dir(cycle, reward), DONE_MARKER, {"status": "ok", "steps": step})


def merge_cycle_in_run(run_root: str, cycle: int) -> dict:
    run = RunDir(run_root)
    done = run.merge_done(cycle)
    if done is not None:
        return done
    rewards = list(run.read_run_json()["config"]["rewards"])
    missing = [r for r in rewards if run.expert_done(cycle, r) is None]
    if missing:
        raise RuntimeError(f"merge of cycle {cycle} started before experts {missing} were DONE")
    merged = reset_incomplete_dir(run.merged_dir(cycle), MERGE_MARKER)
    (merged / "update.safetensors").write_bytes(b"update")
    return write_marker(merged, MERGE_MARKER, {"experts": rewards})


def distill_in_run(
    run_root: str, cycle: int, reward: str, token: str | None = None, overrides: dict | None = None
) -> dict:
    """RaTE stand-in: refuses to start before the expert's DONE, then steps like the fake expert (``rate.steps``,
    a checkpoint per step, checkpoint + ``Preempted`` on a signal) and writes token.safetensors, then DONE.json."""
    run = RunDir(run_root)
    out = run.cycle_dir(cycle) / "rate" / reward
    done = read_marker(out, DONE_MARKER)
    if done is not None:
        return done
    if run.expert_done(cycle, reward) is None:
        raise RuntimeError(f"RaTE of cycle {cycle} {reward} started before its expert was DONE")
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:
        return _follow_rank0(lambda: read_marker(out, DONE_MARKER))
    cfg = config_for_reward(config_from_dict(run.read_run_json()["config"]), reward)
    steps = [int(p.name.split("-", 1)[1]) for p in out.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).exists()]
    step = _run_steps(
        out / "metrics.jsonl",
        max(steps, default=0),
        cfg.rate.steps,
        lambda step: {"step": step, "loss": 1.0 / step, "pid": os.getpid()},
        f"rate:{cycle}:{reward}",
        lambda step: out / f"checkpoint-{step}",
        "token.safetensors",
    )
    (out / "token.safetensors").write_bytes(b"token")
    return write_marker(out, DONE_MARKER, {"status": "ok", "steps": step, "token": token or f"<{reward}>"})
