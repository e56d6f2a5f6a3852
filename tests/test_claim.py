"""One writer per unit directory (mrlora.claim): a live owner stops a second writer, a provably dead one is broken.

Owners are real processes: a claim held by a running subprocess, one left by a process that exited without
releasing it, a pid recycled by another process, a claim file torn by a writer killed mid-write.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mrlora.claim import ClaimHeldError, acquire, claim_path

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\nfrom mrlora.claim import acquire\nacquire(sys.argv[1], 'expert brightness')\n"
    "print('claimed', flush=True)\ntime.sleep(float(sys.argv[2]))\n"
)


def hold_claim(unit: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(unit), str(seconds)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def test_a_second_writer_is_refused_while_the_first_lives_and_the_message_names_it(tmp_path):
    unit = tmp_path / "cycle_0001" / "brightness"
    first = hold_claim(unit, 60)
    try:
        with pytest.raises(ClaimHeldError) as err:
            acquire(unit, "expert brightness")
        assert f"pid {first.pid}" in str(err.value) and "is being written by expert brightness" in str(err.value)
        assert "launch.cancel" in str(err.value)
    finally:
        first.kill()
        first.wait()


def test_a_claim_left_by_a_dead_process_is_broken_and_kept_aside(tmp_path):
    unit = tmp_path / "cycle_0001" / "brightness"
    first = hold_claim(unit, 0)
    first.wait()  # exited without releasing: as after kill -9
    claim = acquire(unit, "expert brightness")
    assert json.loads(claim_path(unit).read_text())["pid"] == os.getpid()
    assert len(list(unit.parent.glob(".claim-brightness.json.broken-*"))) == 1
    claim.release()
    assert not claim_path(unit).exists()


def test_a_recycled_pid_does_not_keep_a_dead_owners_claim(tmp_path):
    unit = tmp_path / "brightness"
    unit.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # the claim names a live pid, but a process that started at another time
        claim_path(unit).write_text(
            json.dumps(
                {
                    "owner_id": "x",
                    "host": socket.gethostname(),
                    "pid": alive.pid,
                    "pid_start": "1",
                    "slurm_job": None,
                    "created": "?",
                    "what": "old",
                }
            )
        )
        acquire(unit, "expert brightness").release()
    finally:
        alive.kill()
        alive.wait()


def test_a_torn_claim_file_is_broken(tmp_path):
    unit = tmp_path / "brightness"
    path = claim_path(unit)
    path.write_text('{"owner_id": "ab')  # cut off by a kill right after the O_EXCL create
    old = time.time() - 60
    os.utime(path, (old, old))
    acquire(unit, "expert brightness").release()


def test_a_claim_from_another_host_without_a_slurm_job_is_never_broken(tmp_path):
    unit = tmp_path / "brightness"
    claim_path(unit).write_text(
        json.dumps(
            {
                "owner_id": "x",
                "host": "elsewhere",
                "pid": 123,
                "pid_start": "9",
                "slurm_job": None,
                "created": "?",
                "what": "expert brightness",
            }
        )
    )
    with pytest.raises(ClaimHeldError, match=f"delete {claim_path(unit)} once you know it is dead"):
        acquire(unit, "expert brightness")
    assert json.loads(claim_path(unit).read_text())["host"] == "elsewhere"


def test_a_requeued_slurm_job_takes_back_its_own_claim_from_another_node(tmp_path, monkeypatch):
    unit = tmp_path / "brightness"
    claim_path(unit).write_text(
        json.dumps(
            {
                "owner_id": "x",
                "host": "node-a",
                "pid": 123,
                "pid_start": "9",
                "slurm_job": "4242_1",
                "created": "?",
                "what": "expert brightness",
            }
        )
    )
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    claim = acquire(unit, "expert brightness")
    assert json.loads(claim_path(unit).read_text())["slurm_job"] == "4242_1"
    claim.release()


def test_release_leaves_a_claim_someone_else_took(tmp_path):
    unit = tmp_path / "brightness"
    claim = acquire(unit, "expert brightness")
    claim_path(unit).write_text(json.dumps({"owner_id": "someone-else"}))
    claim.release()
    assert claim_path(unit).exists()
