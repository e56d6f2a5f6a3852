"""RaTE jobs from the command line with the local executor: ordering, failure isolation, resume, status, and the
real ``mrlora.rate.distill_in_run`` on tiny SD3."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.runs import rate_dir
from mrlora.runstore import RunDir

REPO = Path(__file__).resolve().parents[1]
REWARDS = ["brightness", "colourfulness"]
TINY = ["--model", "tiny-sd3", "--rewards", *REWARDS]
FAKE = {
    "MRLORA_JOB_ENTRYPOINTS": "test_launch_fake_entrypoints",
    "PYTHONPATH": str(REPO / "tests"),
    "FAKE_STEP_S": "0.01",
}


def run_cli(args, env=None, module="launch.mapreduce", timeout=120):
    base = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**base, **(env or {})},
        timeout=timeout,
    )


def the_run(out: Path) -> RunDir:
    return RunDir(next((out / "tiny-sd3").iterdir()))


def status_of(run: RunDir, out: Path) -> str:
    proc = run_cli([run.run_ts, "--out-root", str(out), "--no-slurm"], module="launch.status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("cycles, rate", [("2", "3"), ("2", "0")])
def test_rate_cycle_outside_the_run_exits_2_and_writes_nothing(tmp_path, cycles, rate):
    out = tmp_path / "out"
    proc = run_cli(
        [*TINY, "--cycles", cycles, "--rate-after-cycle", rate, "--executor", "local", "--out-root", str(out)]
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "mapreduce.rate_after_cycles" in proc.stderr and "1..2" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_dry_run_lists_the_rate_jobs_after_their_cycle(tmp_path):
    proc = run_cli(
        [
            *TINY,
            "--cycles",
            "2",
            "--rate-after-cycle",
            "1",
            "--executor",
            "slurm",
            "--dry-run",
            "--cluster",
            "local",
            "--out-root",
            str(tmp_path / "out"),
        ],
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = re.findall(r"mrlora-\d{8}_\d{6}(?:_[A-Za-z0-9_.]+)?-(c\d{4}-[a-z]+)\s", proc.stdout)
    assert names[:5] == ["c0001-experts", "c0001-merge", "c0001-rate", "c0002-experts", "c0002-merge"], proc.stdout
    assert "RaTE brightness,colourfulness" in proc.stdout and "RaTE tokens after cycle(s) 1" in proc.stdout
    assert "# ---- c0001-rate" in proc.stdout, "the RaTE sbatch file is shown"
    assert not (tmp_path / "out").exists()


def test_local_run_distils_after_each_chosen_cycle_in_order(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        [
            *TINY,
            "--cycles",
            "2",
            "--rate-after-cycle",
            "1",
            "2",
            "--executor",
            "local",
            "--out-root",
            str(out),
            "--set",
            "train.steps=2",
            "--set",
            "rate.steps=3",
        ],
        FAKE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = re.findall(r"\] (cycle \d [A-Za-z ]+?): done", proc.stdout)
    assert labels == [
        "cycle 1 brightness",
        "cycle 1 colourfulness",
        "cycle 1 merge",
        "cycle 1 RaTE brightness",
        "cycle 1 RaTE colourfulness",
        "cycle 2 brightness",
        "cycle 2 colourfulness",
        "cycle 2 merge",
        "cycle 2 RaTE brightness",
        "cycle 2 RaTE colourfulness",
    ], proc.stdout
    run = the_run(out)
    assert run.read_run_json()["config"]["mapreduce"]["rate_after_cycles"] == [1, 2]
    for c in (1, 2):
        for r in REWARDS:
            done = json.loads((rate_dir(run, c, r) / "DONE.json").read_text())
            assert done["steps"] == 3 and (rate_dir(run, c, r) / "token.safetensors").exists()
    text = status_of(run, out)
    assert len(re.findall(r"(?m)^ RaTE\s+DONE 3/3\s+DONE 3/3", text)) == 2, text
    assert "every RaTE token distilled" in text


def test_failed_rate_task_does_not_stop_the_chain_and_resume_redoes_only_it(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        [
            *TINY,
            "--cycles",
            "2",
            "--rate-after-cycle",
            "1",
            "--executor",
            "local",
            "--out-root",
            str(out),
            "--set",
            "train.steps=2",
            "--set",
            "rate.steps=2",
        ],
        {**FAKE, "FAKE_FAIL": "rate:1:colourfulness"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cycle 1 RaTE colourfulness: FAILED" in proc.stdout and "nothing depends on a RaTE token" in proc.stdout
    run = the_run(out)
    assert run.scan(REWARDS).last_complete_cycle == 2, "the chain went on after the failed RaTE task"
    assert (rate_dir(run, 1, "brightness") / "DONE.json").exists()
    assert not (rate_dir(run, 1, "colourfulness") / "DONE.json").exists()
    text = status_of(run, out)
    assert "RaTE tokens still to come: cycle 1 colourfulness" in text and "cycle 1 RaTE colourfulness" in text
    kept = {r: json.loads((rate_dir(run, 1, "brightness") / "DONE.json").read_text())["written_at"] for r in REWARDS}
    expert_done = run.expert_done(2, "brightness")["written_at"]

    # resume: redo the failed token, and add cycle 2's tokens to the finished run
    proc = run_cli(
        ["--resume", run.run_ts, "--executor", "local", "--out-root", str(out), "--rate-after-cycle", "2"], FAKE
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = re.findall(r"\] (cycle \d [A-Za-z ]+?): done", proc.stdout)
    assert labels == ["cycle 1 RaTE colourfulness", "cycle 2 RaTE brightness", "cycle 2 RaTE colourfulness"]
    assert json.loads((rate_dir(run, 1, "brightness") / "DONE.json").read_text())["written_at"] == kept["brightness"]
    assert run.expert_done(2, "brightness")["written_at"] == expert_done
    meta = run.read_run_json()
    assert meta["config"]["mapreduce"]["rate_after_cycles"] == [1, 2]
    assert meta["history"][-1]["changes"] == {"mapreduce.rate_after_cycles": [[1], [1, 2]]}
    assert "every RaTE token distilled" in status_of(run, out)

    # a cycle outside the run on resume: refused, run.json untouched
    before = run.run_json.read_text()
    proc = run_cli(
        ["--resume", run.run_ts, "--executor", "local", "--out-root", str(out), "--rate-after-cycle", "5"], FAKE
    )
    assert proc.returncode == 2 and "1..2" in proc.stderr and run.run_json.read_text() == before


def test_rate_job_wrapper_checkpoints_on_sigterm_and_continues(tmp_path):
    """``python -m launch.jobs rate``: interrupted -> exit 3 after a checkpoint; rerun -> continues to DONE."""
    import signal
    import time

    out = tmp_path / "out"
    proc = run_cli(
        [
            *TINY,
            "--cycles",
            "1",
            "--executor",
            "local",
            "--out-root",
            str(out),
            "--set",
            "train.steps=1",
            "--set",
            "rate.steps=40",
        ],
        FAKE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = the_run(out)
    folder = rate_dir(run, 1, "brightness")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **FAKE, "FAKE_STEP_S": "0.1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "launch.jobs", "rate", str(run.root), "1", "brightness"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(folder.glob("checkpoint-*/COMPLETE.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 3, job.stdout.read()
    assert not (folder / "DONE.json").exists()
    kept = (folder / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(kept) < 40
    again = subprocess.run(
        [sys.executable, "-m", "launch.jobs", "rate", str(run.root), "1", "brightness"],
        cwd=REPO,
        env={**env, "FAKE_STEP_S": "0.001"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    final = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(final) == 40 and final[: len(kept)] == kept, "the rerun did not continue from the checkpoint"
    assert json.loads((folder / "DONE.json").read_text())["steps"] == 40


@pytest.mark.slow
def test_real_distillation_after_a_tiny_sd3_cycle(tmp_path, tiny_sd3_dir):
    out = tmp_path / "out"
    proc = run_cli(
        [
            "--model",
            "tiny-sd3",
            "--rewards",
            "brightness",
            "--cycles",
            "1",
            "--rate-after-cycle",
            "1",
            "--executor",
            "local",
            "--out-root",
            str(out),
            "--set",
            "train.steps=2",
            "--set",
            "rate.steps=2",
            "--set",
            "rate.checkpoint_every=1",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = the_run(out)
    folder = rate_dir(run, 1, "brightness")
    done = json.loads((folder / "DONE.json").read_text())
    assert (folder / "token.safetensors").stat().st_size > 0
    assert "cycle 1 RaTE brightness: done" in proc.stdout
    from mrlora.rate import load_token

    token = load_token(folder / "token.safetensors")
    assert token.token == "<brightness>" and done["steps"] == 2
    assert "every RaTE token distilled" in status_of(run, out)
