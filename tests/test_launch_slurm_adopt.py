"""Raising a queued run's cycle count with ``--resume --adopt`` on the real local Slurm cluster.

The merge that was queued as the run's last decides when it has finished, from the run directory, that the
run now has more cycles: it neither releases the lease nor stops the chain, and the new window's last merge
extends the chain to the new end (stand-in entry points keep it fast).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launch import slurm
from launch.journal import read_records
from test_launch_slurm import REWARDS, cli, start, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_raising_cycles_of_a_queued_run_with_adopt_runs_to_the_new_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MRLORA_JOB_ENTRYPOINTS", "test_launch_fake_entrypoints")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    # window 2: both cycles are queued at once, and the merge of cycle 2 is queued as the run's last
    run = start(tmp_path, "--cycles", "2", "--set", "train.steps=6", window=2, gpus=0)
    assert [r.key for r in read_records(run)] == ["c0001-experts", "c0001-merge", "c0002-experts", "c0002-merge"]

    proc = cli("launch.mapreduce", "--resume", run.run_ts, "--adopt", "--executor", "slurm",
               "--out-root", str(tmp_path / "out"), "--set", "mapreduce.cycles=5")
    assert "adopting jobs" in proc.stdout, proc.stdout
    # the adopter submits cycles 3-4 after the queued merge of cycle 2; the merge of cycle 4 submits cycle 5
    assert {r.key for r in read_records(run)} >= {"c0003-experts", "c0003-merge", "c0004-experts", "c0004-merge"}
    assert "c0005-merge" not in {r.key for r in read_records(run)}

    wait_until(lambda: not slurm.run_jobs_in_queue(run.run_ts), 400, "the chain to finish", poll=2.0)
    assert run.scan(REWARDS).last_complete_cycle == 5, cli("launch.status", run.run_ts, "--out-root",
                                                           str(tmp_path / "out"), check=False).stdout
    assert run.read_lease() is None  # released by the merge of cycle 5, the run's last now
