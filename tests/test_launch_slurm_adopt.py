"""Raising a queued run's cycle count with ``--resume --adopt`` on the real local Slurm cluster.

The merge that was queued as the run's last decides when it has finished, from the run directory, that the
run now has more cycles: it neither releases the lease nor stops the chain, and the new window's last merge
extends the chain to the new end (stand-in entry points keep it fast).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_launch_slurm import REWARDS, cli, start, wait_until
from test_launch_slurm import profile as profile_path

from launch import slurm
from launch.journal import read_records
from mrlora.runstore import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_raising_cycles_of_a_queued_run_with_adopt_runs_to_the_new_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MRLORA_JOB_ENTRYPOINTS", "test_launch_fake_entrypoints")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    # window 2: both cycles are queued at once, and the merge of cycle 2 is queued as the run's last
    run = start(tmp_path, "--cycles", "2", "--set", "train.steps=10", window=2, gpus=0)
    assert [r.key for r in read_records(run)] == ["c0001-experts", "c0001-merge", "c0002-experts", "c0002-merge"]

    proc = cli(
        "launch.mapreduce",
        "--resume",
        run.run_ts,
        "--adopt",
        "--executor",
        "slurm",
        "--out-root",
        str(tmp_path / "out"),
        "--set",
        "mapreduce.cycles=5",
    )
    assert "adopting jobs" in proc.stdout and "nothing new to submit" in proc.stdout, proc.stdout
    # the merge of cycle 2, queued as the run's last, extends the chain with cycles 3-4 when it has finished,
    # and the merge of cycle 4 with cycle 5
    assert [r.key for r in read_records(run)] == ["c0001-experts", "c0001-merge", "c0002-experts", "c0002-merge"]

    wait_until(lambda: not slurm.run_jobs_in_queue(run.run_ts), 400, "the chain to finish", poll=2.0)
    assert run.scan(REWARDS).last_complete_cycle == 5, cli(
        "launch.status", run.run_ts, "--out-root", str(tmp_path / "out"), check=False
    ).stdout
    assert run.read_lease() is None  # released by the merge of cycle 5, the run's last now


def test_sites_without_sbatch_on_compute_nodes_extend_the_chain_from_the_login_node(tmp_path, monkeypatch):
    """``chain_extension = "login-node"``: the window's last merge submits nothing and says which command
    continues; that command, run on the login node (by the user or a scrontab line), submits the next window."""
    monkeypatch.setenv("MRLORA_JOB_ENTRYPOINTS", "test_launch_fake_entrypoints")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    profile = Path(profile_path(tmp_path, window=1, gpus=0))
    profile.write_text(
        profile.read_text().replace("window_cycles = ", 'chain_extension = "login-node"\nwindow_cycles = ', 1)
    )
    tmp_path.mkdir(exist_ok=True)
    out = str(tmp_path / "out")
    proc = cli(
        "launch.mapreduce",
        "--model",
        "tiny-sd3",
        "--rewards",
        *REWARDS,
        "--cluster",
        str(profile),
        "--executor",
        "slurm",
        "--out-root",
        out,
        "--cycles",
        "2",
        "--set",
        "train.steps=2",
    )
    run = next(iter(RunDir(p) for p in (tmp_path / "out" / "tiny-sd3").iterdir()))
    assert "submitted cycles 1..1 of 2" in proc.stdout, proc.stdout

    wait_until(lambda: not slurm.run_jobs_in_queue(run.run_ts), 300, "cycle 1 to finish", poll=2.0)
    assert run.scan(REWARDS).last_complete_cycle == 1
    assert [r.key for r in read_records(run)] == ["c0001-experts", "c0001-merge"]  # the merge submitted nothing
    merge = next(r for r in read_records(run) if r.kind == "merge")
    said = merge.log_paths()[0].read_text() + merge.log_paths()[1].read_text()
    assert f"--resume {run.run_ts}" in said and "--adopt" in said, said

    again = cli("launch.mapreduce", "--resume", run.run_ts, "--adopt", "--executor", "slurm", "--out-root", out)
    assert "submitted cycles 2..2 of 2" in again.stdout, again.stdout
    wait_until(lambda: not slurm.run_jobs_in_queue(run.run_ts), 300, "cycle 2 to finish", poll=2.0)
    assert run.scan(REWARDS).last_complete_cycle == 2 and run.read_lease() is None
