"""``python -m launch.logs``: a user finds and follows the log of one job of a run without knowing where logs go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.logs import local_log
from mrlora.runstore import RunDir

REPO = Path(__file__).resolve().parents[1]
FAKE = {
    "MRLORA_JOB_ENTRYPOINTS": "test_launch_fake_entrypoints",
    "PYTHONPATH": str(REPO / "tests"),
    "FAKE_STEP_S": "0.01",
}


def _cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def _local_run(tmp_path) -> RunDir:
    proc = _cli(
        "launch.mapreduce",
        "--model",
        "tiny-sd3",
        "--rewards",
        "brightness",
        "colourfulness",
        "--cycles",
        "1",
        "--executor",
        "local",
        "--out-root",
        str(tmp_path / "out"),
        "--set",
        "train.steps=2",
        env=FAKE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return RunDir(next((tmp_path / "out" / "tiny-sd3").iterdir()))


def test_logs_lists_a_cycles_logs_then_prints_and_follows_one(tmp_path):
    run = _local_run(tmp_path)
    where = ["--out-root", str(tmp_path / "out")]
    listing = _cli("launch.logs", run.run_ts, *where)
    assert listing.returncode == 0, listing.stderr
    assert "brightness" in listing.stdout and "merge" in listing.stdout and "logs of cycle 1" in listing.stdout

    merge_log = local_log(run, 1, "merge")
    assert merge_log is not None
    with open(merge_log, "a") as fh:
        fh.write("the last line of the merge\n")
    shown = _cli("launch.logs", run.run_ts, *where, "--merge", "-n", "1")
    assert shown.returncode == 0 and shown.stdout == "the last line of the merge\n"
    assert str(merge_log) in shown.stderr

    follower = subprocess.Popen(
        [sys.executable, "-m", "launch.logs", run.run_ts, *where, "--reward", "brightness", "-n", "0", "-f"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.0)  # let it open the log and seek to its end
        with open(local_log(run, 1, "brightness"), "a") as fh:
            fh.write("appended while following\n")
        assert follower.stdout.readline() == "appended while following\n"
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
    assert follower.returncode == 130


def test_logs_of_a_job_that_has_none_says_what_to_do(tmp_path):
    run = _local_run(tmp_path)
    proc = _cli("launch.logs", run.run_ts, "--out-root", str(tmp_path / "out"), "--cycle", "1", "--rate", "brightness")
    assert proc.returncode == 2 and "no log of rate:brightness in cycle 1" in proc.stderr
    assert "launch.status" in proc.stderr and "Traceback" not in proc.stderr
