"""Bad input is caught on the login node, before run.json exists or anything queues, with a message naming the
thing and the fix; what no finished work depends on may still change on resume; run ids never collide.

The launcher is the real one (tiny-sd3 preset); runs that must exist are made by it with the fast stand-in
job entry points (tests/test_launch_fake_entrypoints.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrlora.runstore import RunDir, is_run_ts

REPO = Path(__file__).resolve().parents[1]
FAKE = {
    "MRLORA_JOB_ENTRYPOINTS": "test_launch_fake_entrypoints",
    "PYTHONPATH": str(REPO / "tests"),
    "FAKE_STEP_S": "0.01",
}
ONE = ["--model", "tiny-sd3", "--rewards", "brightness", "--executor", "local", "--set", "train.steps=1"]


def launch(args, out: Path, env: dict | None = None, cwd: Path = REPO, module: str = "launch.mapreduce"):
    base = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    extra = ["--out-root", str(out)] if module != "launch.status" else ["--out-root", str(out), "--no-slurm"]
    return subprocess.run(
        [sys.executable, "-m", module, *args, *extra],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def refused(proc, message: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_model_path_is_reported_before_anything_is_written(tmp_path):
    out = tmp_path / "runs"
    proc = launch([*ONE, "--set", f"model.pretrained={tmp_path / 'no-such-model'}"], out)
    refused(proc, f"model.pretrained: {tmp_path / 'no-such-model'} does not exist")
    assert "--set model.pretrained=" in proc.stderr and nothing_written(out)


def test_a_directory_that_is_not_a_diffusers_model_is_reported(tmp_path):
    (tmp_path / "weights").mkdir()
    proc = launch([*ONE, "--set", f"model.pretrained={tmp_path / 'weights'}"], tmp_path / "runs")
    refused(proc, "is not a diffusers model directory (no model_index.json)")


@pytest.mark.parametrize("kind", ["missing", "empty", "blank lines only", "a directory"])
def test_an_unusable_prompt_file_is_reported_before_anything_is_written(tmp_path, kind):
    path = tmp_path / "prompts.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "blank lines only":
        path.write_text("\n  \n")
    elif kind == "a directory":
        path.mkdir()
    out = tmp_path / "runs"
    proc = launch([*ONE, "--set", f"prompts.brightness={path}"], out)
    refused(proc, "prompts.brightness:")
    assert str(path) in proc.stderr and "--set prompts.brightness=" in proc.stderr
    assert nothing_written(out)


def test_a_reward_model_missing_from_the_offline_cache_is_reported_before_anything_is_written(tmp_path):
    out = tmp_path / "runs"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    proc = launch([*ONE, "--rewards", "pickscore", "--set", "prompts.pickscore=gen:simple:8"], out, offline)
    refused(proc, "reward 'pickscore'")
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "python -m rewards.prefetch --rewards pickscore" in proc.stderr
    assert nothing_written(out)


def test_a_hub_model_missing_from_the_offline_cache_is_reported_before_anything_is_written(tmp_path):
    out = tmp_path / "runs"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    proc = launch(["--model", "sd35m", "--executor", "local"], out, offline)
    refused(
        proc,
        "hub model 'stabilityai/stable-diffusion-3.5-medium' is not in the Hugging Face cache "
        f"{tmp_path / 'empty-hf-home' / 'hub'}",
    )
    assert "hf download stabilityai/stable-diffusion-3.5-medium" in proc.stderr
    assert nothing_written(out)


def test_a_dry_run_checks_in_the_jobs_environment_and_warns_after_the_plan(tmp_path):
    """example-gpu's [env] makes the jobs offline with HF_HOME=/shared/cache/huggingface: that cache is checked,
    not this machine's, and a dry run still shows the plan."""
    proc = launch(
        ["--model", "sd35m", "--executor", "slurm", "--cluster", "example-gpu", "--dry-run"],
        tmp_path / "runs",
        {"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "c0001-merge" in proc.stdout
    assert (
        "warning: launching this for real would stop here: model.pretrained: hub model "
        "'stabilityai/stable-diffusion-3.5-medium' is not in the Hugging Face cache /shared/cache/huggingface/hub"
        in proc.stdout
    )


def test_a_gpu_preset_submitted_without_a_cluster_profile_is_refused(tmp_path):
    out = tmp_path / "runs"
    proc = launch(["--model", "sd35m", "--executor", "slurm", "--dry-run"], out, {"PATH": "/usr/bin:/bin"})
    refused(proc, "--model sd35m trains on GPUs, but no --cluster was given")
    assert "--cluster example-gpu" in proc.stderr
    ok = launch(
        ["--model", "sd35m", "--executor", "slurm", "--dry-run", "--cluster", "example-gpu"],
        out,
        {"PATH": "/usr/bin:/bin"},
    )
    assert ok.returncode == 0, ok.stderr


def test_set_values_typed_on_the_command_line_reach_the_config(tmp_path):
    proc = launch(
        [
            "--model",
            "tiny-sd3",
            "--set",
            "lora.target_modules=[to_q,to_k]",
            "--set",
            "train.ema=false",
            "--set",
            "rewards=[brightness,colourfulness]",
            "--print-config",
        ],
        tmp_path / "runs",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("lora.target_modules = ['to_q', 'to_k']") for line in lines), proc.stdout
    assert any(line.startswith("train.ema = False") for line in lines)
    assert any(line.startswith("rewards = ['brightness', 'colourfulness']") for line in lines)
    assert any(line.startswith("weights = [1.0, 1.0]") for line in lines)


@pytest.mark.parametrize("args", [["--weights", "nan", "1", "1"], ["--set", "weights=[1,1,nan]"]])
def test_non_finite_weights_are_refused_with_a_message(tmp_path, args):
    out = tmp_path / "runs"
    proc = launch(["--model", "tiny-sd3", "--executor", "local", *args], out)
    refused(proc, "weights: merge weights must be finite numbers")
    assert nothing_written(out)


def test_a_relative_prompt_path_is_recorded_absolute_and_a_resume_from_elsewhere_finds_it(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "prompts.txt").write_text("a red apple\na blue car\n")
    out = tmp_path / "runs"
    proc = launch([*ONE, "--set", "prompts.brightness=prompts.txt", "--cycles", "1"], out, FAKE, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = RunDir.find(out, "tiny-sd3")
    assert run.read_run_json()["config"]["prompts"]["brightness"] == str(work / "prompts.txt")
    resumed = launch(
        ["--resume", run.run_ts, "--model", "tiny-sd3", "--executor", "local", "--set", "mapreduce.cycles=2"],
        out,
        FAKE,
        cwd=elsewhere,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert run.scan(["brightness"]).last_complete_cycle == 2


def _failed_before_training(tmp_path) -> tuple[RunDir, Path]:
    """A run whose first expert failed before its first checkpoint (as when the job cannot load its model)."""
    out = tmp_path / "runs"
    proc = launch([*ONE, "--cycles", "1"], out, {**FAKE, "FAKE_FAIL": "1:brightness"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run = RunDir.find(out, "tiny-sd3")
    assert run.latest_checkpoint(1, "brightness") is None
    return run, out


def test_fixing_the_model_on_resume_is_allowed_while_nothing_was_trained(tmp_path):
    run, out = _failed_before_training(tmp_path)
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    proc = launch(
        ["--resume", run.run_ts, "--model", "tiny-sd3", "--executor", "local", "--set", f"model.pretrained={model}"],
        out,
        FAKE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    history = run.read_run_json()["history"][-1]
    assert history["changes"]["model.pretrained"] == ["tiny:sd3", str(model)]
    # once an expert trained on it, the model is frozen
    again = launch(
        ["--resume", run.run_ts, "--model", "tiny-sd3", "--executor", "local", "--set", "model.pretrained=tiny:sd3"],
        out,
        FAKE,
    )
    refused(again, "--set model.pretrained cannot change on resume: the merge of cycle 1 was trained with")


def test_fewer_cycles_than_already_merged_is_refused_on_resume(tmp_path):
    out = tmp_path / "runs"
    assert launch([*ONE, "--cycles", "2"], out, FAKE).returncode == 0
    run = RunDir.find(out, "tiny-sd3")
    before = run.run_json.read_text()
    proc = launch(
        ["--resume", run.run_ts, "--model", "tiny-sd3", "--executor", "local", "--set", "mapreduce.cycles=1"], out, FAKE
    )
    refused(proc, "has already merged 2 cycles, so it cannot have fewer")
    assert run.run_json.read_text() == before


def test_three_launches_in_the_same_second_get_three_runs(tmp_path):
    out = tmp_path / "runs"
    base = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "launch.mapreduce", *ONE, "--cycles", "1", "--out-root", str(out), *extra],
            cwd=REPO,
            env={**base, **FAKE},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in ([], [], ["--name", "sweep_lr.1"])
    ]
    texts = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], texts
    ids = sorted(p.name for p in (out / "tiny-sd3").iterdir())
    assert len(ids) == 3 and all(is_run_ts(i) for i in ids), ids
    assert sum(i.endswith("_sweep_lr.1") for i in ids) == 1


def test_a_run_id_that_is_taken_is_refused_with_advice_that_fits(tmp_path):
    from mrlora.runstore import RunStoreError, new_run_ts

    taken = new_run_ts(name="sweep")
    RunDir.create(tmp_path, "tiny-sd3", taken)
    with pytest.raises(RunStoreError, match=f"choose another --name, or continue that run with --resume {taken}"):
        RunDir.create(tmp_path, "tiny-sd3", taken)
    fresh = {RunDir.create(tmp_path, "tiny-sd3").run_ts for _ in range(20)}  # no waiting between them
    assert len(fresh) == 20


def test_an_old_style_run_id_still_resumes_shows_status_and_cancels(tmp_path):
    out = tmp_path / "runs"
    assert launch([*ONE, "--cycles", "1"], out, FAKE).returncode == 0
    run = RunDir.find(out, "tiny-sd3")
    old_id = "20260101_120000"
    old = run.root.rename(run.root.parent / old_id)
    meta = json.loads((old / "run.json").read_text())
    meta["run_ts"] = old_id
    (old / "run.json").write_text(json.dumps(meta))
    resumed = launch(["--resume", old_id, "--executor", "local", "--set", "mapreduce.cycles=2"], out, FAKE)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    status = launch([old_id], out, module="launch.status")
    assert status.returncode == 0 and "cycles merged: 2/2" in status.stdout, status.stdout + status.stderr
    cancel = launch([old_id, "--model", "tiny-sd3"], out, {"PATH": "/usr/bin:/bin"}, module="launch.cancel")
    assert cancel.returncode == 0 and "has no queued or running jobs" in cancel.stdout, cancel.stdout + cancel.stderr
