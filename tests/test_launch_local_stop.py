"""Stopping a local run the ways people do: Ctrl-C, ``kill``, a closed terminal, ``kill -9``, ``launch.cancel``
(also under ``nohup ... &`` and where squeue exists but Slurm does not answer). Every way leaves no worker
behind, keeps the last checkpoint, exits with the shell's code for the signal and says how to continue.

The launcher is the real one, started as a subprocess on the tiny-sd3 preset; signals are real. The job entry
points are the fast stand-ins (tests/test_launch_fake_entrypoints.py: a step every ``FAKE_STEP_S`` seconds, a
checkpoint per step, checkpoint + exit on SIGTERM) except in the test marked "real training", which trains the
tiny model for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrlora.runstore import RunDir, pid_alive

REPO = Path(__file__).resolve().parents[1]
FAKE = {
    "MRLORA_JOB_ENTRYPOINTS": "test_launch_fake_entrypoints",
    "PYTHONPATH": str(REPO / "tests"),
    "FAKE_STEP_S": "0.2",
}


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF" and not k.startswith("SLURM_")}
    return {**env, **(extra or {})}


def start_launcher(out: Path, extra_env: dict | None = None, steps: int = 200, args: tuple = ()) -> subprocess.Popen:
    """The launcher as a terminal would run it: its own process group (the terminal's foreground group)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.mapreduce",
            "--model",
            "tiny-sd3",
            "--rewards",
            "brightness",
            "--cycles",
            "1",
            "--executor",
            "local",
            "--out-root",
            str(out),
            "--set",
            f"train.steps={steps}",
            *args,
        ],
        cwd=REPO,
        env=_env(extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def the_run(out: Path, timeout: float = 60) -> RunDir:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = (
            [p for p in (out / "tiny-sd3").glob("*") if (p / "run.json").exists()]
            if (out / "tiny-sd3").is_dir()
            else []
        )
        if runs:
            return RunDir(runs[0])
        time.sleep(0.1)
    pytest.fail(f"no run directory under {out} within {timeout:.0f} s")


def wait_for_steps(run: RunDir, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    path = run.metrics_path(1, "brightness")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"launcher exited ({proc.returncode}) early: {proc.stdout.read()}")
        time.sleep(0.05)
    pytest.fail(f"expert did not log {n} steps within {timeout:.0f} s")


def workers_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {[p for p in pids if pid_alive(p)]} are still running"
        time.sleep(0.05)


def assert_stopped_cleanly(run: RunDir, worker: int) -> None:
    """The worker is gone, the run's newest checkpoint is complete and holds every logged step, the lease is free."""
    wait_gone([worker])
    steps = [json.loads(line)["step"] for line in run.metrics_path(1, "brightness").read_text().splitlines()]
    latest = run.latest_checkpoint(1, "brightness")
    assert latest is not None and latest[0] == steps[-1], (latest, steps)
    assert run.expert_done(1, "brightness") is None
    assert not run.lease_path.exists()


@pytest.mark.parametrize(
    "sig, code",
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
    ids=["ctrl-c", "kill", "terminal-closed"],
)
def test_stopping_the_launcher_checkpoints_its_worker_and_exits_with_the_signal_code(tmp_path, sig, code):
    out = tmp_path / "runs"
    proc = start_launcher(out, FAKE)
    run = the_run(out)
    wait_for_steps(run, 2, proc)
    (worker,) = workers_of(proc.pid)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # a terminal's Ctrl-C goes to the whole foreground group
    else:
        proc.send_signal(sig)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == code, text
    assert f"stopped by {signal.Signals(sig).name}" in text
    assert f"--resume {run.run_ts} --out-root {out} --model tiny-sd3" in text
    assert "Traceback" not in text
    assert_stopped_cleanly(run, worker)


def test_a_launcher_killed_with_sigkill_takes_its_worker_along(tmp_path):
    out = tmp_path / "runs"
    proc = start_launcher(out, FAKE)
    run = the_run(out)
    wait_for_steps(run, 2, proc)
    (worker,) = workers_of(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    wait_gone([worker])  # the worker noticed its launcher died, checkpointed and exited
    latest = run.latest_checkpoint(1, "brightness")
    steps = run.metrics_path(1, "brightness").read_text().splitlines()
    assert latest is not None and latest[0] == len(steps)


def _cancel(run: RunDir, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cancel", run.run_ts, "--out-root", str(out), "--model", "tiny-sd3"],
        cwd=REPO,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cancel_stops_a_launcher_started_with_nohup_in_the_background(tmp_path):
    """``nohup ... &`` from a script: the launcher ignores SIGINT, so cancel must not rely on it."""
    out = tmp_path / "runs"
    log = tmp_path / "nohup.out"
    cmd = (
        f"nohup {sys.executable} -m launch.mapreduce --model tiny-sd3 --rewards brightness --cycles 1 "
        f"--executor local --out-root {out} --set train.steps=200 > {log} 2>&1 & echo $!"
    )
    pid = int(
        subprocess.run(
            ["bash", "-c", cmd], cwd=REPO, env=_env(FAKE), capture_output=True, text=True, timeout=30
        ).stdout.split()[-1]
    )
    try:
        run = the_run(out)
        deadline = time.monotonic() + 60
        while not workers_of(pid) or not run.metrics_path(1, "brightness").exists():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        (worker,) = workers_of(pid)
        done = _cancel(run, out)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"local launcher pid {pid}" in done.stdout
        assert (
            f"continue with: python -m launch.mapreduce --resume {run.run_ts} --out-root {out} --model tiny-sd3"
            in done.stdout
        )
        assert not pid_alive(pid), "cancel returned while the launcher still ran"
        assert_stopped_cleanly(run, worker)
        assert "stopped by SIGTERM" in log.read_text()
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_cancel_stops_a_local_run_where_squeue_exists_but_slurm_does_not_answer(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("squeue", "sbatch", "scancel"):
        (fake_bin / name).write_text(
            "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller "
            "(connect failure)' >&2\nexit 1\n"
        )
        (fake_bin / name).chmod(0o755)
    out = tmp_path / "runs"
    proc = start_launcher(out, FAKE)  # started without the fake Slurm: auto picks local
    try:
        run = the_run(out)
        wait_for_steps(run, 1, proc)
        (worker,) = workers_of(proc.pid)
        done = _cancel(run, out, {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"})
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Slurm does not answer" in done.stdout and f"local launcher pid {proc.pid}" in done.stdout
        assert proc.wait(timeout=30) == 143
        assert_stopped_cleanly(run, worker)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_cancel_of_an_unknown_run_says_where_it_looked(tmp_path):
    no_slurm = tmp_path / "bin"
    no_slurm.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "launch.cancel", "20260101_000000", "--out-root", str(tmp_path)],
        cwd=REPO,
        env=_env({"PATH": str(no_slurm)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and f"no run 20260101_000000 under {tmp_path}" in done.stderr, done.stderr


# ------------------------------------------------------------------------------------------------ real training


def test_killing_the_launcher_mid_training_then_resuming_trains_every_step_exactly_once(tmp_path, tiny_sd3_dir):
    """Real training: the worker checkpoints on the forwarded SIGTERM and is gone before the launcher exits, so
    the second launcher (--resume, started for real) is the expert's only writer."""
    from mrlora.claim import claim_path

    out = tmp_path / "runs"
    proc = start_launcher(out, steps=4)
    run = the_run(out)
    wait_for_steps(run, 1, proc, timeout=300)
    (worker,) = workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, text
    assert_stopped_cleanly(run, worker)
    assert not claim_path(run.expert_dir(1, "brightness")).exists()  # released with the checkpoint
    stopped_at = run.latest_checkpoint(1, "brightness")[0]
    assert stopped_at < 4, "the expert finished before the signal; the test proved nothing"
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.mapreduce",
            "--resume",
            run.run_ts,
            "--out-root",
            str(out),
            "--model",
            "tiny-sd3",
            "--executor",
            "local",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in run.metrics_path(1, "brightness").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert run.expert_done(1, "brightness")["steps"] == 4


def test_an_expert_job_started_twice_stops_the_second_before_it_writes(tmp_path, tiny_sd3_dir):
    """Real training: the same job started twice (as an admin might on Slurm) has one writer."""
    from train_helpers import tiny_run

    from mrlora.claim import claim_path

    run = tiny_run(tmp_path, tiny_sd3_dir, ["rewards=['brightness']", "weights=[1.0]", "train.steps=40"])
    job = [sys.executable, "-m", "launch.jobs", "expert", str(run.root), "1", "brightness"]
    first = subprocess.Popen(job, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(run, 1, first, timeout=300)
        assert json.loads(claim_path(run.expert_dir(1, "brightness")).read_text())["pid"] == first.pid
        second = subprocess.run(job, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "is being written by expert brightness on host" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 3  # checkpointed and stopped, undisturbed by the second
        steps = [json.loads(line)["step"] for line in run.metrics_path(1, "brightness").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1))
        assert run.latest_checkpoint(1, "brightness")[0] == steps[-1]
        assert not claim_path(run.expert_dir(1, "brightness")).exists()
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()


def test_cancel_stops_a_worker_whose_launcher_is_gone(tmp_path, tiny_sd3_dir):
    """Real training: a worker found through its claim (no launcher, no lease) is stopped at a checkpoint."""
    from train_helpers import tiny_run

    run = tiny_run(tmp_path, tiny_sd3_dir, ["rewards=['brightness']", "weights=[1.0]", "train.steps=40"])
    worker = subprocess.Popen(
        [sys.executable, "-m", "launch.jobs", "expert", str(run.root), "1", "brightness"],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_steps(run, 1, worker, timeout=300)
        done = _cancel(run, run.root.parent.parent)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"expert brightness pid {worker.pid}" in done.stdout
        assert worker.wait(timeout=60) == 3  # checkpointed and stopped
        assert_stopped_cleanly(run, worker.pid)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate()
