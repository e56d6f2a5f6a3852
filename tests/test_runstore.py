"""Run store: atomic writes, completion markers, scans and the lease, including writers killed mid-write."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mrlora.runstore import (
    CHECKPOINT_MARKER,
    DONE_MARKER,
    MERGE_MARKER,
    LeaseHeldError,
    LeaseInfo,
    RunDir,
    RunStoreError,
    atomic_write_json,
    atomic_write_text,
    read_marker,
    reset_incomplete_dir,
    write_marker,
)

REPO = Path(__file__).resolve().parents[1]


def _complete_checkpoint(run: RunDir, cycle: int, reward: str, step: int, payload: bytes = b"x" * 100) -> Path:
    d = run.checkpoint_dir(cycle, reward, step)
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(payload)
    write_marker(d, CHECKPOINT_MARKER, {"step": step})
    return d


def _done_expert(run: RunDir, cycle: int, reward: str) -> None:
    d = run.adapter_dir(cycle, reward)
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    write_marker(run.expert_dir(cycle, reward), DONE_MARKER, {"status": "ok"})


def _merged(run: RunDir, cycle: int) -> None:
    d = run.merged_dir(cycle)
    d.mkdir(parents=True)
    (d / "update.safetensors").write_bytes(b"update")
    write_marker(d, MERGE_MARKER)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_old_content(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_marker_detects_truncated_and_missing_files(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "w.bin").write_bytes(b"a" * 1000)
    (d / "nested").mkdir()
    (d / "nested" / "x.json").write_text("{}")
    write_marker(d, CHECKPOINT_MARKER)
    assert read_marker(d, CHECKPOINT_MARKER)["files"]["nested/x.json"]["size"] == 2
    (d / "w.bin").write_bytes(b"a" * 999)
    assert read_marker(d, CHECKPOINT_MARKER) is None
    (d / "w.bin").write_bytes(b"b" * 1000)  # same size, different bytes: only sha256 notices
    assert read_marker(d, CHECKPOINT_MARKER) is not None
    assert read_marker(d, CHECKPOINT_MARKER, verify="sha256") is None
    (d / "w.bin").unlink()
    assert read_marker(d, CHECKPOINT_MARKER) is None


def test_reset_incomplete_dir_clears_leftovers_but_never_a_complete_dir(tmp_path):
    d = tmp_path / "merged"
    d.mkdir()
    (d / "half.bin").write_bytes(b"partial")
    reset_incomplete_dir(d, MERGE_MARKER)
    assert list(d.iterdir()) == []
    (d / "update.bin").write_bytes(b"u")
    write_marker(d, MERGE_MARKER)
    with pytest.raises(RunStoreError, match="already complete"):
        reset_incomplete_dir(d, MERGE_MARKER)
    assert (d / "update.bin").exists()


def test_scan_reports_last_contiguous_merged_cycle_and_newest_complete_checkpoint(tmp_path):
    run = RunDir.create(tmp_path, "tiny-sd3", "20260101_000000")
    rewards = ["a", "b"]
    for r in rewards:
        _done_expert(run, 1, r)
    _merged(run, 1)
    _done_expert(run, 2, "a")
    _complete_checkpoint(run, 2, "b", 3)
    _complete_checkpoint(run, 2, "b", 12)
    half = run.checkpoint_dir(2, "b", 15)  # a writer died here: files but no marker
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    _merged(run, 3)  # a stray later merge without cycle 2 must not count

    state = run.scan(rewards)
    assert state.last_complete_cycle == 1
    assert state.next_cycle == 2
    assert state.cycles[2].experts["a"].done
    assert not state.cycles[2].experts["b"].done
    assert state.cycles[2].experts["b"].checkpoint_step == 12
    assert state.cycles[2].experts["b"].checkpoint_path == run.checkpoint_dir(2, "b", 12)
    assert run.merged_updates(1) == [run.merged_dir(1)]
    with pytest.raises(RunStoreError, match="cycle 2"):
        run.merged_updates(2)


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from mrlora.runstore import CHECKPOINT_MARKER, atomic_file, write_marker
    d = Path(sys.argv[1])
    d.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        with atomic_file(d / f"part{i}.bin") as tmp:
            with open(tmp, "wb") as fh:
                for _ in range(64):
                    fh.write(os.urandom(1 << 16))
                    fh.flush()
                    time.sleep(0.01)
        print(f"wrote {i}", flush=True)
    time.sleep(float(os.environ.get("PAUSE_BEFORE_MARKER", "0")))
    write_marker(d, CHECKPOINT_MARKER, {"step": 7})
    print("complete", flush=True)
    """
)


@pytest.mark.parametrize("kill_after_line", ["wrote 0", "wrote 2"])
def test_killed_writer_leaves_nothing_the_scan_accepts(tmp_path, kill_after_line):
    run = RunDir.create(tmp_path, "m", "20260101_000000")
    ckpt = run.checkpoint_dir(1, "ocr", 7)
    env = {**os.environ, "PAUSE_BEFORE_MARKER": "30"}  # the last kill lands after every payload file is in place
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(ckpt)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    for line in proc.stdout:
        if line.strip() == kill_after_line:
            break
    time.sleep(0.05)  # after "wrote 0": in the middle of the next file
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run.latest_checkpoint(1, "ocr") is None
    assert run.scan(["ocr"]).cycles[1].experts["ocr"].checkpoint_step is None
    # every file that exists under its final name is whole: temp files are the only partial ones
    for p in ckpt.iterdir():
        if p.name.startswith("part"):
            assert p.stat().st_size == 64 << 16
    # a rerun of the writer completes the checkpoint and the scan accepts it
    reset_incomplete_dir(ckpt, CHECKPOINT_MARKER)
    subprocess.run([sys.executable, "-c", WRITER, str(ckpt)], check=True, cwd=REPO, capture_output=True)
    assert run.latest_checkpoint(1, "ocr") == (7, ckpt)


def test_run_create_refuses_existing_timestamp_and_find_returns_newest(tmp_path):
    a = RunDir.create(tmp_path, "m", "20260101_000000")
    a.write_run_json({"run_ts": a.run_ts})
    b = RunDir.create(tmp_path, "m", "20260102_000000")
    b.write_run_json({"run_ts": b.run_ts})
    RunDir.create(tmp_path, "m", "20260103_000000")  # no run.json: not a run yet
    with pytest.raises(RunStoreError, match="--resume 20260101_000000"):
        RunDir.create(tmp_path, "m", "20260101_000000")
    assert RunDir.find(tmp_path, "m").root == b.root
    assert RunDir.find(tmp_path, "m", "20260101_000000").root == a.root
    with pytest.raises(RunStoreError, match="no run 20991231_000000"):
        RunDir.find(tmp_path, "m", "20991231_000000")


def test_lease_is_exclusive_until_its_owner_is_stale(tmp_path):
    run = RunDir.create(tmp_path, "m", "20260101_000000")
    first = LeaseInfo.new("slurm")
    first.job_ids = ["101", "102"]
    run.acquire_lease(first, is_stale=lambda holder: False)
    second = LeaseInfo.new("slurm")
    with pytest.raises(LeaseHeldError, match="101, 102") as err:
        run.acquire_lease(second, is_stale=lambda holder: False)
    assert err.value.lease.owner_id == first.owner_id
    assert run.read_lease().owner_id == first.owner_id

    seen = []
    run.acquire_lease(second, is_stale=lambda holder: seen.append(holder.owner_id) or True)
    assert seen == [first.owner_id]
    assert run.read_lease().owner_id == second.owner_id
    with pytest.raises(RunStoreError, match="lost the lease"):
        run.update_lease(first)
    second.job_ids = ["200"]
    run.update_lease(second)
    assert run.read_lease().job_ids == ["200"]
    run.release_lease(first)  # not the owner: no effect
    assert run.lease_path.exists()
    run.release_lease(second)
    assert not run.lease_path.exists()


def test_lease_of_dead_local_process_is_detected(tmp_path):
    from mrlora.runstore import pid_alive

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    assert pid_alive(os.getpid())
    assert not pid_alive(-1) and not pid_alive(0)
