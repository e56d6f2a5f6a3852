"""RaTE under torchrun with 2 CPU processes (gloo): the all-reduced token gradients give the same token as
one process training on the whole batch, because rank r takes slice r of each step's global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrlora.rate.cli import main as rate_main
from mrlora.rate.token_file import load_token
from mrlora.runstore import DONE_MARKER, read_marker

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rate_distill import make_expert  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_match_one_process_with_the_whole_batch(tmp_path, tiny_sd3_dir):
    expert = make_expert(tmp_path / "expert", "sd3")
    common = [
        "distill",
        "--base",
        tiny_sd3_dir,
        "--teacher",
        str(expert),
        "--token",
        "<bright>",
        "--steps",
        "3",
        "--lr",
        "0.1",
        "--teacher-steps",
        "2",
        "--resolution",
        "64",
        "--max-sequence-length",
        "32",
        "--prompts",
        "gen:simple:8",
        "--checkpoint-every",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [
            "torchrun",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "mrlora.rate",
            *common,
            "--batch-size",
            "1",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = read_marker(tmp_path / "two", DONE_MARKER)
    assert done is not None and done["world_size"] == 2
    assert (tmp_path / "two" / "checkpoint-2" / "COMPLETE.json").is_file()

    torch.set_num_threads(1)
    assert rate_main([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    two, one = load_token(tmp_path / "two" / "token.safetensors"), load_token(tmp_path / "one" / "token.safetensors")
    for name in one.vectors:
        assert not torch.equal(one.vectors[name], torch.zeros_like(one.vectors[name]))
        torch.testing.assert_close(two.vectors[name], one.vectors[name], rtol=1e-4, atol=1e-5)
    losses_two = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    losses_one = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
