"""The local Slurm cluster behaves like the clusters mrlora's job graph is written for.

These are the Slurm features the launcher relies on (docs/design.md section 4), exercised through submitit the
way the launcher submits: a job array whose afterok dependent waits for every task, a failed parent that
cancels its dependents instead of leaving them pending, and a multi-node job whose tasks get distinct ranks
on nodes whose names resolve (torch.distributed's master address is the first node's name).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

submitit = pytest.importorskip("submitit")

pytestmark = pytest.mark.slurm

# The job side cannot import this test module by name, so ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write_marker(out_dir: str, index: int) -> str:
    """Array task body: leave a file that proves this task ran, and report where it ran."""
    path = Path(out_dir) / f"task_{index}.txt"
    path.write_text(f"{index} {os.environ['SLURM_ARRAY_TASK_ID']}\n")
    return os.environ["SLURMD_NODENAME"]


def count_markers(out_dir: str) -> int:
    """Dependent job body: sees every file the array wrote (it only starts after all tasks succeeded)."""
    return len(sorted(Path(out_dir).glob("task_*.txt")))


def fail_on_purpose() -> None:
    raise RuntimeError("parent fails on purpose")


def must_not_run(out_dir: str) -> None:
    Path(out_dir, "dependent_ran.txt").write_text("the dependent of a failed parent ran\n")


def describe_task() -> dict:
    """Multi-node task body: what torch.distributed setup would read from the environment."""
    first_node = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    return {
        "procid": int(os.environ["SLURM_PROCID"]),
        "ntasks": int(os.environ["SLURM_NTASKS"]),
        "node": os.environ["SLURMD_NODENAME"],
        "master": first_node,
        "master_ip": socket.gethostbyname(first_node),
    }


def _executor(folder: Path, **params) -> "submitit.AutoExecutor":
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1, mem_gb=0.25, **params)
    return executor


def test_array_then_afterok_dependent(slurm_cluster, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    executor = _executor(tmp_path / "jobs", name="mrlora-test-array")
    array_jobs = executor.map_array(write_marker, [str(out_dir)] * 3, [0, 1, 2])
    array_id = array_jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in array_jobs] == [f"{array_id}_{i}" for i in range(3)]

    executor.update_parameters(
        name="mrlora-test-merge",
        slurm_partition="cpu",
        slurm_additional_parameters={"dependency": f"afterok:{array_id}", "kill_on_invalid_dep": "yes"},
    )
    dependent = executor.submit(count_markers, str(out_dir))

    tasks = slurm_cluster.wait_for_job(array_id, array_size=3)
    dep = slurm_cluster.wait_for_job(dependent.job_id)[dependent.job_id]

    assert sorted(tasks) == [f"{array_id}_{i}" for i in range(3)]
    assert {jid: r.state for jid, r in tasks.items()} == {jid: "COMPLETED" for jid in tasks}
    assert dep.state == "COMPLETED"
    last_task_end = max(r.end for r in tasks.values())
    assert dep.start is not None and dep.start >= last_task_end, (dep.start, last_task_end)

    assert {job.result() for job in array_jobs} <= {"node1", "node2", "node3", "node4"}
    assert dependent.result() == 3
    assert sorted(p.read_text() for p in out_dir.glob("task_*.txt")) == ["0 0\n", "1 1\n", "2 2\n"]


def test_failed_parent_cancels_afterok_dependent(slurm_cluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "jobs", name="mrlora-test-fail")
    parent = executor.submit(fail_on_purpose)
    executor.update_parameters(
        name="mrlora-test-orphan",
        slurm_additional_parameters={"dependency": f"afterok:{parent.job_id}", "kill_on_invalid_dep": "yes"},
    )
    dependent = executor.submit(must_not_run, str(tmp_path))

    parent_rec = slurm_cluster.wait_for_job(parent.job_id)[parent.job_id]
    dep_rec = slurm_cluster.wait_for_job(dependent.job_id, timeout=30)[dependent.job_id]

    assert parent_rec.state == "FAILED"
    assert dep_rec.state == "CANCELLED"
    # Slurm stamps Start=End at cancel time; a job that never ran has no nodes.
    assert dep_rec.node_list == "None assigned", "the dependent of a failed parent must never start"
    assert not (tmp_path / "dependent_ran.txt").exists()
    with pytest.raises(Exception, match="parent fails on purpose"):
        parent.result()


def test_two_node_job_has_distinct_ranks_and_resolvable_nodes(slurm_cluster, tmp_path: Path) -> None:
    executor = _executor(tmp_path / "jobs", name="mrlora-test-2node", nodes=2, tasks_per_node=2)
    job = executor.submit(describe_task)

    rec = slurm_cluster.wait_for_job(job.job_id)[job.job_id]
    assert rec.state == "COMPLETED"

    tasks = job.results()
    assert sorted(t["procid"] for t in tasks) == [0, 1, 2, 3]
    assert {t["ntasks"] for t in tasks} == {4}
    nodes = {t["node"] for t in tasks}
    assert len(nodes) == 2 and nodes <= {"node1", "node2", "node3", "node4"}
    per_node = [sum(t["node"] == n for t in tasks) for n in sorted(nodes)]
    assert per_node == [2, 2]
    assert {t["master"] for t in tasks} == {min(nodes)}
    assert {t["master_ip"] for t in tasks} == {"127.0.0.1"}
