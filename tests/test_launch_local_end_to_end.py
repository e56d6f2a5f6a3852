"""The README's first command, for real: tiny SD3, local executor, real Flow-GRPO experts and exact merges."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mrlora.runstore import RunDir

REPO = Path(__file__).resolve().parents[1]
REWARDS = ["brightness", "colourfulness", "jpeg_compressibility"]


@pytest.mark.slow
def test_tiny_sd3_two_cycles_locally_end_to_end(tmp_path, tiny_sd3_dir):
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.mapreduce", "--model", "tiny-sd3", "--cycles", "2", "--executor", "local",
         "--out-root", str(out), "--set", "train.steps=2", "--set", "train.checkpoint_every=1"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = RunDir.find(out, "tiny-sd3")
    state = run.scan(REWARDS)
    assert state.last_complete_cycle == 2
    for cycle in (1, 2):
        for reward in REWARDS:
            done = run.expert_done(cycle, reward)
            assert done is not None and done["steps"] == 2
            lines = run.metrics_path(cycle, reward).read_text().splitlines()
            assert [json.loads(line)["step"] for line in lines] == [1, 2]
        update = json.loads((run.merged_dir(cycle) / "update.json").read_text())
        assert update["exact"] is True
    assert not run.lease_path.exists()  # released when the chain finished
    # what a person reads at the end: per-expert reward trend and how to compare the merged cycles
    assert "reward mean of each expert, first step -> last step" in proc.stdout
    assert "python -m eval.run --checkpoint" in proc.stdout
    status = subprocess.run([sys.executable, "-m", "launch.status", run.run_ts, "--out-root", str(out),
                             "--no-slurm"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert status.returncode == 0 and "cycles merged: 2/2" in status.stdout, status.stdout + status.stderr
