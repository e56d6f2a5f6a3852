"""The launcher on the real local Slurm cluster, with the real training and merge entry points (tiny SD3).

What a user relies on: the chain runs to the end on its own (including the window extension from a compute
node), every merge starts after all experts of its cycle ended, sequential mode serialises the experts, a
cancelled expert takes its dependents with it and --resume finishes the run without retraining finished
experts, the pre-timeout signal requeues only the signalled task which then continues from its checkpoint, and
status shows the states as they change.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import slurm
from launch.journal import read_records
from mrlora.runstore import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
REWARDS = ["brightness", "colourfulness"]


@pytest.fixture(autouse=True)
def _tiny_model_built(tiny_sd3_dir):
    """Build the tiny model once up front (jobs inherit MRLORA_CACHE), so jobs measure the launcher, not builds."""
    return tiny_sd3_dir


def cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def profile(tmp_path: Path, window: int = 4, gpus: int = 2) -> str:
    """The local cluster's profile (2 fake GPUs = 2 processes per expert) with a chosen window and GPU count.

    Tests of multi-rank behaviour (the chain, requeue) keep 2 processes per expert; the others use one to
    stay fast on a 2-core machine.
    """
    text = (REPO / "configs" / "clusters" / "local.toml").read_text()
    text = re.sub(r"(?m)^window_cycles = \d+", f"window_cycles = {window}", text)
    text = re.sub(r"(?m)^gpus_per_node = \d+", f"gpus_per_node = {gpus}", text)
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return str(path)


def start(tmp_path: Path, *extra: str, window: int = 4, gpus: int = 2) -> RunDir:
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = cli(
        "launch.mapreduce",
        "--model",
        "tiny-sd3",
        "--rewards",
        *REWARDS,
        "--cluster",
        profile(tmp_path, window, gpus),
        "--executor",
        "slurm",
        "--out-root",
        str(tmp_path / "out"),
        *extra,
    )
    match = re.search(r"run directory: (\S+)", proc.stdout)
    assert match, proc.stdout
    return RunDir(match.group(1))


def wait_until(cond, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def queue_empty(run: RunDir) -> bool:
    return not slurm.run_jobs_in_queue(run.run_ts)


def accounting(run: RunDir) -> dict[str, slurm.AccountedJob]:
    ids = [r.job_id for r in read_records(run)]
    return {a.job_id: a for a in slurm.sacct_jobs(ids)}


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def intervals(run: RunDir) -> dict[tuple[int, str], list[tuple[dt.datetime, dt.datetime]]]:
    """(cycle, reward|"merge") -> [(start, end)] of every Slurm allocation that ran it (all submissions)."""
    acct = wait_until(
        lambda: (
            (a := accounting(run))
            and all(x.end not in ("", "Unknown") for x in a.values() if x.start not in ("", "Unknown", "None"))
            and a
        ),
        60,
        "sacct to record every job's end",
    )
    out: dict = {}
    for rec in read_records(run):
        units = [("merge", rec.job_id)] if rec.kind == "merge" else [(r, rec.task_id(r)) for r in rec.rewards]
        for unit, jid in units:
            a = acct.get(jid)
            if a is None or a.start in ("", "Unknown", "None"):
                continue
            out.setdefault((rec.cycle, unit), []).append((when(a.start), when(a.end)))
    return out


def assert_merges_follow_experts(run: RunDir, cycles: int) -> None:
    spans = intervals(run)
    for c in range(1, cycles + 1):
        merge_start = min(s for s, _ in spans[(c, "merge")])
        for r in REWARDS:
            if (c, r) in spans:
                assert max(e for _, e in spans[(c, r)]) <= merge_start, f"cycle {c}: merge began before {r} ended"
        if c > 1:
            # within a window afterok orders them; across windows the merge submits the next cycle itself once
            # its marker is written (its allocation ends a moment later): either way after MERGE_DONE.json
            merged_at = when(run.merge_done(c - 1)["written_at"])
            for r in REWARDS:
                if (c, r) in spans:
                    assert min(s for s, _ in spans[(c, r)]) >= merged_at, f"cycle {c} {r} began before merge {c - 1}"


def test_chain_runs_to_the_end_extending_its_window_and_status_follows(tmp_path):
    run = start(tmp_path, "--cycles", "2", "--set", "train.steps=2", window=1)
    records = read_records(run)
    assert {r.cycle for r in records} == {1}, "only the first window (one cycle) is submitted by the launcher"

    seen_states = set()

    def poll_status():
        out = cli("launch.status", run.run_ts, "--out-root", str(tmp_path / "out")).stdout
        seen_states.update(re.findall(r"\b(RUNNING|PENDING|DONE)\b", out))
        return queue_empty(run) and out

    final = wait_until(poll_status, 600, "the 2-cycle chain to finish", poll=2.0)
    assert run.scan(REWARDS).last_complete_cycle == 2
    assert {"RUNNING", "PENDING"} & seen_states, seen_states
    assert "cycles merged: 2/2" in final and "finished" in final and "failures" not in final
    assert {r.cycle for r in read_records(run)} == {1, 2}, "the cycle-1 merge submitted cycle 2"
    assert not run.lease_path.exists(), "the last merge releases the lease"
    assert_merges_follow_experts(run, 2)
    assert all(run.expert_done(c, r)["steps"] == 2 for c in (1, 2) for r in REWARDS)


def test_sequential_mode_runs_one_expert_after_the_other(tmp_path):
    run = start(tmp_path, "--cycles", "1", "--mode", "sequential", "--set", "train.steps=2", gpus=0)
    names = [r.key for r in read_records(run)]
    assert names == ["c0001-brightness", "c0001-colourfulness", "c0001-merge"]
    wait_until(lambda: queue_empty(run), 600, "the sequential cycle to finish", poll=2.0)
    assert run.merge_done(1) is not None
    spans = intervals(run)
    assert spans[(1, "brightness")][-1][1] <= spans[(1, "colourfulness")][0][0]
    assert spans[(1, "colourfulness")][-1][1] <= spans[(1, "merge")][0][0]


def _newest_checkpoint_step(run: RunDir, cycle: int, reward: str) -> int:
    latest = run.latest_checkpoint(cycle, reward)
    return latest[0] if latest else 0


def test_cancelled_expert_kills_its_dependents_and_resume_completes_without_retraining(tmp_path):
    run = start(tmp_path, "--cycles", "2", "--set", "train.steps=5", "--set", "train.checkpoint_every=1", gpus=0)
    array = read_records(run)[0]
    victim = "colourfulness"
    wait_until(lambda: _newest_checkpoint_step(run, 1, victim) >= 1, 300, f"a checkpoint of {victim}", poll=0.3)
    subprocess.run(["scancel", array.task_id(victim)], check=True)
    wait_until(lambda: queue_empty(run), 300, "the broken chain to leave the queue", poll=2.0)
    acct = accounting(run)
    merge_id = next(r.job_id for r in read_records(run) if r.key == "c0001-merge")
    assert acct[merge_id].state == "CANCELLED", "the merge must die with its cancelled parent, not pend forever"
    assert run.merge_done(1) is None and run.expert_done(1, victim) is None
    survivor = run.expert_done(1, "brightness")
    assert survivor is not None
    ckpt_before = _newest_checkpoint_step(run, 1, victim)
    assert ckpt_before >= 1
    kept = run.metrics_path(1, victim).read_text().splitlines()[:ckpt_before]

    status = cli("launch.status", run.run_ts, "--out-root", str(tmp_path / "out")).stdout
    assert "CANCELLED" in status

    before_resume = {r.job_id for r in read_records(run)}
    out = cli(
        "launch.mapreduce", "--resume", run.run_ts, "--out-root", str(tmp_path / "out"), "--executor", "slurm"
    ).stdout
    assert "from cycle 1" in out
    resumed = [r for r in read_records(run) if r.job_id not in before_resume]
    assert resumed[0].key == f"c0001-{victim}" and resumed[0].rewards == (victim,), "the DONE expert is skipped"
    wait_until(lambda: queue_empty(run), 600, "the resumed chain to finish", poll=2.0)
    assert run.scan(REWARDS).last_complete_cycle == 2
    assert run.expert_done(1, "brightness")["written_at"] == survivor["written_at"], "a DONE expert was retrained"
    final = run.metrics_path(1, victim).read_text().splitlines()
    assert len(final) == 5 and final[:ckpt_before] == kept, "the cancelled expert did not continue from its checkpoint"
    assert run.read_run_json()["history"][-1]["action"] == "resume"


def test_requeue_signal_continues_from_the_checkpoint(tmp_path):
    run = start(tmp_path, "--cycles", "1", "--set", "train.steps=6", "--set", "train.checkpoint_every=1")
    array = read_records(run)[0]
    target = "brightness"
    task = array.task_id(target)
    wait_until(lambda: _newest_checkpoint_step(run, 1, target) >= 1, 300, "a first checkpoint", poll=0.3)
    subprocess.run(["scancel", "--signal=USR2", task], check=True)
    # the task checkpoints, requeues itself and waits in the queue: the metrics then hold the steps it kept
    wait_until(lambda: slurm.job_state(task) == "PENDING", 120, "the signalled task to requeue itself", poll=0.2)
    kept = run.metrics_path(1, target).read_text().splitlines()
    assert 1 <= len(kept) < 6
    assert slurm.job_state(array.task_id("colourfulness")) in ("RUNNING", "COMPLETING", ""), "only one task requeued"
    wait_until(lambda: queue_empty(run), 600, "the requeued expert and the merge to finish", poll=2.0)
    assert run.merge_done(1) is not None
    assert run.expert_done(1, target)["steps"] == 6
    final = run.metrics_path(1, target).read_text().splitlines()
    assert len(final) == 6
    assert final[: len(kept)] == kept, "the requeued task retrained steps it had checkpointed"
    out_log, _ = array.log_paths(target)
    assert "requeued" in out_log.read_text()
    assert out_log.read_text().count("starting in") == 2
    other_log, _ = array.log_paths("colourfulness")
    assert other_log.read_text().count("starting in") == 1


def test_cancel_cancels_exactly_this_runs_jobs(tmp_path, monkeypatch):
    # stand-in jobs (slow steps) keep both chains in the queue long enough to look at them
    monkeypatch.setenv("MRLORA_JOB_ENTRYPOINTS", "test_launch_fake_entrypoints")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_STEP_S", "5")
    mine = start(tmp_path / "a", "--cycles", "2", "--set", "train.steps=20")
    time.sleep(1.1)  # run timestamps have one-second resolution
    other = start(tmp_path / "b", "--cycles", "1", "--set", "train.steps=20")
    assert len(slurm.run_jobs_in_queue(mine.run_ts)) >= 3
    out = cli("launch.cancel", mine.run_ts, "--out-root", str(tmp_path / "a" / "out")).stdout
    assert f"cancelled run {mine.run_ts}" in out
    wait_until(lambda: queue_empty(mine), 60, "the cancelled run to leave the queue")
    assert slurm.run_jobs_in_queue(other.run_ts), "another run's jobs were cancelled too"
    cli("launch.cancel", other.run_ts)
    wait_until(lambda: queue_empty(other), 60, "the second run to leave the queue")
    assert "no queued or running jobs" in cli("launch.cancel", mine.run_ts).stdout
