"""``--write-sbatch DIR``: plain sbatch scripts a cluster user can read and submit by hand, on the real local Slurm
cluster (stand-in entry points keep the jobs fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch_slurm import REWARDS, cli, profile, wait_until

from launch import slurm
from mrlora.runstore import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_scripts_written_with_write_sbatch_run_the_whole_run_when_submitted_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("MRLORA_JOB_ENTRYPOINTS", "test_launch_fake_entrypoints")
    # the scripts run `python` after the profile's setup lines, which on a cluster activate the environment;
    # here the environment is this interpreter's, whatever PATH the test was started with
    monkeypatch.setenv("MRLORA_PYTHON", sys.executable)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    tmp_path.mkdir(exist_ok=True)
    scripts = tmp_path / "sbatch"
    proc = cli(
        "launch.mapreduce",
        "--model",
        "tiny-sd3",
        "--rewards",
        *REWARDS,
        "--cluster",
        profile(tmp_path, window=1, gpus=0),
        "--out-root",
        str(tmp_path / "out"),
        "--cycles",
        "2",
        "--set",
        "train.steps=2",
        "--write-sbatch",
        str(scripts),
    )
    run = RunDir(next((tmp_path / "out" / "tiny-sd3").iterdir()))
    assert "submit them all" in proc.stdout and run.read_lease() is None
    assert not slurm.run_jobs_in_queue(run.run_ts)  # nothing was submitted
    text = (scripts / "c0002-experts.sbatch").read_text()
    assert f"launch.jobs expert {run.root} 2" in text and ".pkl" not in text and "submitit" not in text
    assert "# waits for: afterok:<job of c0001-merge>" in text

    submitted = subprocess.run(["bash", str(scripts / "submit.sh")], capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    assert len(submitted.stdout.splitlines()) == 4  # "<job key> <id>" per job
    wait_until(lambda: not slurm.run_jobs_in_queue(run.run_ts), 300, "the hand-submitted jobs to finish", poll=2.0)
    state = run.scan(REWARDS)
    assert state.last_complete_cycle == 2, cli(
        "launch.status", run.run_ts, "--out-root", str(tmp_path / "out"), check=False
    ).stdout
