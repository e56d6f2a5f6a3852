"""What retention deletes never changes a run: a tiny run of 6 cycles whose materialised bases and step
checkpoints are deleted between cycles (what the retention policy may remove, and more: the newest base too),
and whose cycle-4 expert job is killed (SIGKILL, after its first checkpoint) and resumed by a new process,
ends bit-identical to an untouched one."""

from __future__ import annotations

import shutil
import sys

import pytest
from train_helpers import kill_after_checkpoint, tiny_run

from mrlora.reduce import merge_cycle_in_run
from mrlora.train import train_expert_in_run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

CYCLES = 6
KILLED = 4  # the cycle whose expert job is killed mid-training, then resumed


def _run(tmp_path, base: str, delete: bool):
    run = tiny_run(
        tmp_path,
        base,
        [
            "rewards=['brightness']",
            "weights=[1.0]",
            "sample.resolution=32",
            "train.steps=2",
            "train.checkpoint_every=1",
            "train.lr=3e-2",
            f"mapreduce.cycles={CYCLES}",
            "mapreduce.keep_step_checkpoints=true",
        ],
    )
    for cycle in range(1, CYCLES + 1):
        if delete and cycle == KILLED:
            job = [sys.executable, "-m", "launch.jobs", "expert", str(run.root), str(cycle), "brightness"]
            kill_after_checkpoint(job, run.expert_dir(cycle, "brightness"), step=1)
        train_expert_in_run(str(run.root), cycle, "brightness")
        merge_cycle_in_run(str(run.root), cycle)
        if delete:  # everything that can be rebuilt: the step checkpoints and the materialised base
            for ckpt in run.expert_dir(cycle, "brightness").glob("checkpoint-*"):
                shutil.rmtree(ckpt)
            shutil.rmtree(run.base_dir(cycle))
    return run


def test_deleting_bases_and_step_checkpoints_between_cycles_changes_nothing(tiny_sd3_dir, tmp_path):
    kept = _run(tmp_path / "kept", tiny_sd3_dir, delete=False)
    pruned = _run(tmp_path / "pruned", tiny_sd3_dir, delete=True)
    assert kept.base_dir(CYCLES).is_dir() and not pruned.base_dir(CYCLES).exists()
    for cycle in range(1, CYCLES + 1):
        for name in ("adapter/adapter_model.safetensors",):
            a = (kept.expert_dir(cycle, "brightness") / name).read_bytes()
            b = (pruned.expert_dir(cycle, "brightness") / name).read_bytes()
            assert a == b, (cycle, name)
        assert (kept.merged_dir(cycle) / "update.safetensors").read_bytes() == (
            pruned.merged_dir(cycle) / "update.safetensors"
        ).read_bytes()
