"""The sbatch text the launcher submits: pinned by golden files, and identical to what submitit itself writes.

Regenerate the golden files after an intended change with ``MRLORA_UPDATE_GOLDEN=1 pytest tests/test_launch_sbatch.py``
and review the diff.
"""

import os
import shutil
from pathlib import Path

import pytest

from launch.plan import build_plan, submission_dependencies
from launch.profiles import profile_from_dict
from launch.submit import render_sbatch, sbatch_parameters, submit_command

GOLDEN = Path(__file__).parent / "golden"
FOLDER = "/runs/tiny-sd3/20260101_000000/logs/slurm"
RUN_TS = "20260101_000000"
PROFILE = {
    "name": "golden",
    "partition": "gpu",
    "account": "proj",
    "qos": "",
    "expert_time_min": 240,
    "merge_time_min": 30,
    "nodes_per_expert": 2,
    "gpus_per_node": 4,
    "cpus_per_gpu": 8,
    "mem_per_gpu_gb": 32,
    "gres_gpu": True,
    "merge_partition": "cpu",
    "merge_cpus": 4,
    "merge_mem_gb": 64,
    "window_cycles": 2,
    "setup": ["module load cuda/12.4"],
    "env": {"OMP_NUM_THREADS": "1"},
    "signal_delay_s": 300,
}


def _plan(**profile_over):
    profile = profile_from_dict({**PROFILE, **profile_over})
    plan = build_plan(run_ts=RUN_TS, rewards=["geneval", "pickscore", "ocr"], cycles=2, profile=profile)
    return plan, profile


def _render(job, plan, profile):
    deps = submission_dependencies(job, {k: f"10{i}" for i, k in enumerate(plan.by_key())})
    return render_sbatch(job, RUN_TS, profile, deps, FOLDER, python="python3")


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MRLORA_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with MRLORA_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"sbatch text differs from {path}"


def test_golden_expert_array():
    plan, profile = _plan()
    text = _render(plan.jobs[0], plan, profile)
    for flag in (
        "--array=0-2%3",
        "--kill-on-invalid-dep=yes",
        "--requeue",
        "--open-mode=append",
        "--signal=USR2@300",
        "--comment=mrlora:20260101_000000",
        "--gres=gpu:4",
        "--ntasks-per-node=4",
        "--nodes=2",
        "--job-name=mrlora-20260101_000000-c0001-experts",
        "--time=240",
    ):
        assert flag in text
    _check("expert_array.sbatch", text)


def test_golden_merge_waits_for_the_array():
    plan, profile = _plan()
    text = _render(plan.jobs[1], plan, profile)
    assert "--dependency=afterok:100" in text and "--partition=cpu" in text and "gres" not in text
    _check("merge.sbatch", text)


def test_golden_per_reward_job_of_a_later_cycle():
    plan, profile = _plan(rewards={"geneval": {"nodes_per_expert": 4, "expert_time_min": 360}})
    job = plan.by_key()["c0002-geneval"]
    text = _render(job, plan, profile)
    assert "--nodes=4" in text and "--time=360" in text and "--array" not in text
    assert "--dependency=afterok:103" in text  # c0001-merge
    _check("expert_single_cycle2.sbatch", text)


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SlurmExecutor needs srun on PATH")
@pytest.mark.parametrize("index", [0, 1])
def test_render_is_what_submitit_writes_when_submitting(tmp_path, index):
    import submitit

    plan, profile = _plan()
    job = plan.jobs[index]
    deps = ["42"] if index else []
    params = sbatch_parameters(job, RUN_TS, profile, deps)
    executor = submitit.SlurmExecutor(folder=tmp_path)
    executor.update_parameters(**params)
    if job.array:
        executor.parameters["map_count"] = len(job.rewards)
    ours = render_sbatch(job, RUN_TS, profile, deps, tmp_path)
    assert ours == executor._make_submission_file_text(submit_command(tmp_path), "uid")
