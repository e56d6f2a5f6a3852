"""The launcher's command line without a scheduler: bad input fails cleanly and writes nothing, --dry-run and
--help answer fast without heavy imports, and the local executor's resume refuses/continues correctly."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import mapreduce
from mrlora.runstore import LeaseInfo, RunDir

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-sd3", "--rewards", "brightness", "colourfulness"]


def run_cli(args, tmp_path, env=None, module="launch.mapreduce"):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def no_files(path: Path) -> bool:
    return not path.exists() or not any(p.is_file() for p in path.rglob("*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nosuch", "--cycles", "2"], "unknown model preset 'nosuch'"),
        ([*TINY, "--rewards", "brightness", "nosuchreward"], "unknown reward.*'nosuchreward'"),
        ([*TINY, "--weights", "1", "2", "3"], "weights.*3 values for 2 rewards"),
        ([*TINY, "--cycles", "0"], "mapreduce.cycles: must be >= 1"),
        ([*TINY, "--cluster", "nosuchcluster"], "unknown cluster profile 'nosuchcluster'"),
        ([*TINY, "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["--cycles", "2"], "--model is required"),
        ([*TINY, "--cycles", "2", "--resume"], "cannot be used with --resume"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    proc = run_cli([*args, "--out-root", str(out), "--executor", "local"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert __import__("re").search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert no_files(out)


def test_unwritable_out_root_is_refused_before_anything_is_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli([*TINY, "--out-root", str(blocker / "runs"), "--executor", "local"], tmp_path)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    if os.geteuid() != 0:  # root may write anywhere; the file-in-the-way case above covers root
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        proc = run_cli([*TINY, "--out-root", str(ro), "--executor", "local"], tmp_path)
        assert proc.returncode == 2 and "not writable" in proc.stderr


def test_executor_slurm_without_slurm_is_refused(tmp_path):
    env = {"PATH": str(tmp_path)}  # no sbatch/squeue on PATH
    proc = subprocess.run(
        [sys.executable, "-m", "launch.mapreduce", *TINY, "--executor", "slurm", "--out-root", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=60,
    )
    assert proc.returncode == 2 and "sbatch/squeue not found" in proc.stderr
    assert no_files(tmp_path / "out")


def test_launch_imports_nothing_heavy():
    code = (
        "import sys, launch.mapreduce, launch.status, launch.cancel, launch.plan, launch.submit, launch.jobs, "
        "launch.local, launch.profiles, launch.runs, launch.journal, launch.slurm\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_help_and_dry_run_of_80_cycles_answer_quickly(tmp_path):
    t0 = time.monotonic()
    proc = run_cli(["--help"], tmp_path)
    help_s = time.monotonic() - t0
    assert proc.returncode == 0 and "--resume" in proc.stdout and "--dry-run" in proc.stdout
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = run_cli(
        [
            "--model",
            "flux",
            "--cycles",
            "80",
            "--cluster",
            "example-gpu",
            "--executor",
            "slurm",
            "--dry-run",
            "--out-root",
            str(out),
        ],
        tmp_path,
    )
    dry_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "cycles 1..80" in text and "320 jobs in 20 window(s)" in text
    # GenEval has its own resources in example-gpu.toml: one job per reward, and their sbatch texts are shown
    assert "c0080-geneval" in text and "#SBATCH --time=360" in text and "#SBATCH --kill-on-invalid-dep=yes" in text
    assert no_files(out)
    print(f"--help {help_s:.2f} s, --dry-run 80 cycles {dry_s:.2f} s (wall, incl. interpreter start)")


def test_dry_run_prints_plan_and_sbatch_without_writing(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        [
            *TINY,
            "--cycles",
            "3",
            "--cluster",
            "local",
            "--executor",
            "slurm",
            "--dry-run",
            "--out-root",
            str(out),
            "--mode",
            "sequential",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "c0001-brightness" in proc.stdout and "c0001-colourfulness" in proc.stdout
    assert (
        "#SBATCH --dependency=afterok:<c0001-brightness>" in proc.stdout
        or "--dependency='afterok:<c0001-brightness>'" in proc.stdout
    )
    assert no_files(out)


def _fake_run(tmp_path) -> RunDir:
    """A started run (via the real CLI with fake jobs) to resume."""
    env = {
        "MRLORA_JOB_ENTRYPOINTS": "test_launch_fake_entrypoints",
        "PYTHONPATH": str(REPO / "tests"),
        "FAKE_STEP_S": "0.01",
        "FAKE_FAIL": "2:colourfulness",
    }
    proc = run_cli(
        [*TINY, "--cycles", "3", "--executor", "local", "--out-root", str(tmp_path / "out"), "--set", "train.steps=2"],
        tmp_path,
        env,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout and "read the log" in proc.stdout
    return RunDir(next((tmp_path / "out" / "tiny-sd3").iterdir()))


def test_local_failure_then_resume_finishes_without_retraining(tmp_path):
    run = _fake_run(tmp_path)
    state = run.scan(["brightness", "colourfulness"])
    assert state.last_complete_cycle == 1 and state.cycles[2].experts["brightness"].done
    done_before = run.expert_done(2, "brightness")["written_at"], run.expert_done(1, "brightness")["written_at"]
    env = {
        "MRLORA_JOB_ENTRYPOINTS": "test_launch_fake_entrypoints",
        "PYTHONPATH": str(REPO / "tests"),
        "FAKE_STEP_S": "0.01",
    }
    proc = run_cli(
        ["--resume", "--executor", "local", "--out-root", str(tmp_path / "out"), "--set", "mapreduce.cycles=4"],
        tmp_path,
        env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming run" in proc.stdout and "from cycle 2" in proc.stdout
    assert run.scan(["brightness", "colourfulness"]).last_complete_cycle == 4
    assert (
        run.expert_done(2, "brightness")["written_at"],
        run.expert_done(1, "brightness")["written_at"],
    ) == done_before
    meta = run.read_run_json()
    assert meta["config"]["mapreduce"]["cycles"] == 4
    assert meta["history"][-1]["changes"] == {"mapreduce.cycles": [3, 4]}
    assert not run.lease_path.exists()
    status = run_cli([run.run_ts, "--out-root", str(tmp_path / "out"), "--no-slurm"], tmp_path, module="launch.status")
    assert status.returncode == 0 and "cycles merged: 4/4" in status.stdout and "finished" in status.stdout


def test_resume_refuses_a_run_owned_by_a_live_local_launcher(tmp_path):
    run = _fake_run(tmp_path)
    holder = LeaseInfo.new("local", "test")  # this pytest process: alive, same host
    run.acquire_lease(holder, lambda _: False)
    before = run.run_json.read_text()
    proc = run_cli(["--resume", run.run_ts, "--executor", "local", "--out-root", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2 and "owned by another launcher" in proc.stderr
    assert run.run_json.read_text() == before
    run.release_lease(holder)


def test_resume_refuses_changing_the_rewards(tmp_path):
    run = _fake_run(tmp_path)
    proc = run_cli(
        [
            "--resume",
            run.run_ts,
            "--executor",
            "local",
            "--out-root",
            str(tmp_path / "out"),
            "--set",
            "rewards=['brightness']",
            "--set",
            "weights=[1.0]",
        ],
        tmp_path,
    )
    assert proc.returncode == 2 and "cannot change on resume" in proc.stderr
    assert json.loads(run.run_json.read_text())["history"][-1]["action"] == "start"


def test_find_run_picks_newest(tmp_path):
    for ts in ("20260101_000000", "20260102_000000"):
        d = tmp_path / "m" / ts
        d.mkdir(parents=True)
        (d / "run.json").write_text("{}")
    assert mapreduce.find_run(tmp_path, None, None).run_ts == "20260102_000000"
    assert mapreduce.find_run(tmp_path, "m", "20260101_000000").run_ts == "20260101_000000"


def test_status_asks_slurm_once_per_refresh_however_many_jobs(tmp_path, monkeypatch):
    """One squeue and one sacct call per refresh (login nodes and slurmctld are shared), mapped back to cells."""
    from launch import slurm, status
    from launch.journal import new_record, write_record

    run = _fake_run(tmp_path)
    common = dict(window=0, after=(), log_dir=str(tmp_path / "logs"))
    write_record(
        run,
        new_record(
            job_id="500",
            key="c0002-experts",
            name="n",
            cycle=2,
            kind="expert",
            rewards=("brightness", "colourfulness"),
            array=True,
            **common,
        ),
    )
    write_record(
        run,
        new_record(job_id="501", key="c0002-merge", name="n", cycle=2, kind="merge", rewards=(), array=False, **common),
    )
    write_record(
        run,
        new_record(
            job_id="502",
            key="c0003-experts",
            name="n",
            cycle=3,
            kind="expert",
            rewards=("brightness", "colourfulness"),
            array=True,
            **common,
        ),
    )
    name = f"mrlora-{run.run_ts}-c0002"
    answers = {
        "squeue": f"500_1|{name}-experts|RUNNING|None|mrlora:{run.run_ts}\n"
        f"501|{name}-merge|PENDING|Dependency|mrlora:{run.run_ts}\n"
        f"502_[0-1]|mrlora-{run.run_ts}-c0003-experts|PENDING|Dependency|mrlora:{run.run_ts}\n"
        f"999|someone-else|RUNNING|None|\n",
        "sacct": "500_0|n|COMPLETED|2026-01-01T00:00:00|2026-01-01T00:01:00|60|0:0\n",
    }
    calls = []

    def fake_run(cmd, timeout=60.0, **kwargs):
        calls.append(cmd[0])
        return answers[cmd[0]]

    monkeypatch.setattr(slurm, "have_slurm", lambda: True)
    monkeypatch.setattr(slurm, "run_slurm_command", fake_run)
    st = status.collect(run)
    assert sorted(calls) == ["sacct", "squeue"], calls
    assert st.queued == 3
    assert st.rows[2]["colourfulness"].state == "RUNNING"
    assert st.rows[2]["merge"].state == "PENDING(Dependency)"
    assert st.rows[3]["brightness"].state == "PENDING(Dependency)"
