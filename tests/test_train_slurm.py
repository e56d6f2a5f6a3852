"""A real 2-node Slurm job trains one expert of a tiny run: submitit runs ``train_expert_in_run`` as two tasks
(one per node), which find each other from Slurm's environment and train one gloo process group."""

from __future__ import annotations

import pytest
import torch
from train_helpers import read_metrics, tiny_run

submitit = pytest.importorskip("submitit")


@pytest.mark.slurm
def test_two_node_slurm_job_trains_one_expert(slurm_cluster, tiny_sd3_dir, tmp_path):
    from mrlora.train import train_expert_in_run

    run = tiny_run(
        tmp_path,
        tiny_sd3_dir,
        ["sample.resolution=32", "train.steps=2", "train.checkpoint_every=1", "train.lr=3e-2"],
        executor="slurm",
    )
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(
        timeout_min=15,
        slurm_partition="debug",
        nodes=2,
        tasks_per_node=1,
        cpus_per_task=1,
        mem_gb=2,
        name="mrlora-test-train-2node",
        slurm_setup=["export OMP_NUM_THREADS=1"],
    )
    job = executor.submit(train_expert_in_run, str(run.root), 1, "brightness")
    rec = slurm_cluster.wait_for_job(job.job_id, timeout=900)[job.job_id]
    assert rec.state == "COMPLETED", f"job {job.job_id} ended {rec.state}:\n{job.stderr()}"

    results = job.results()
    assert len(results) == 2 and results[0] == results[1]  # both ranks return the same DONE marker
    done = run.expert_done(1, "brightness")
    assert done is not None and done["steps"] == 2 and done["processes"] == 2 and done["cycle"] == 1
    state = torch.load(run.checkpoint_dir(1, "brightness", 2) / "training_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(set(state["rank_digests"])) == 1
    metrics = read_metrics(run.expert_dir(1, "brightness"))
    assert [m["step"] for m in metrics] == [1, 2] and all(m["processes"] == 2 for m in metrics)
