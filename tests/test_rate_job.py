"""``distill_in_run``: the launcher's RaTE job inside a run directory (cycle 1 and a later cycle)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mrlora.config import ConfigError, config_to_dict, load_config
from mrlora.rate.errors import RateError
from mrlora.rate.job import distill_in_run, rate_dir
from mrlora.rate.token_file import load_token
from mrlora.runstore import DONE_MARKER, MERGE_MARKER, RunDir, read_marker, write_marker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rate_distill import make_expert  # noqa: E402

OVERRIDES = {"steps": 2, "teacher_steps": 2, "batch_size": 2, "checkpoint_every": 1, "max_sequence_length": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_run(tmp_path: Path) -> RunDir:
    cfg = load_config("tiny-sd3")
    run = RunDir.create(tmp_path, "tiny-sd3", run_ts="20261123_120000")
    run.write_run_json({"run_ts": run.run_ts, "model": "tiny-sd3", "config": config_to_dict(cfg), "history": []})
    return run


def finish_expert(run: RunDir, cycle: int, reward: str) -> None:
    make_expert(run.adapter_dir(cycle, reward), "sd3")
    write_marker(run.expert_dir(cycle, reward), DONE_MARKER, extra={"status": "ok"})


def test_distill_in_run_writes_a_token_and_is_idempotent(tmp_path, mrlora_cache):
    run = make_run(tmp_path)
    with pytest.raises(RateError, match="not finished"):
        distill_in_run(str(run.root), 1, "brightness", overrides=OVERRIDES)
    with pytest.raises(ConfigError, match="not one of this run's rewards"):
        distill_in_run(str(run.root), 1, "ocr", overrides=OVERRIDES)
    finish_expert(run, 1, "brightness")
    done = distill_in_run(str(run.root), 1, "brightness", overrides=OVERRIDES)
    out = rate_dir(run.root, 1, "brightness")
    assert out == run.root / "cycle_0001" / "rate" / "brightness"
    assert done["token"] == "<brightness>" and done["steps"] == 2
    assert read_marker(out, DONE_MARKER, verify="sha256") is not None
    assert read_marker(out / "checkpoint-1", "COMPLETE.json") is not None
    token = load_token(out / "token.safetensors")
    assert token.base == "tiny:sd3" and token.reward == "brightness" and token.info["cycle"] == 1
    assert distill_in_run(str(run.root), 1, "brightness", overrides=OVERRIDES) == done
    # the expert's own DONE marker still verifies (RaTE writes outside the expert directory)
    assert run.expert_done(1, "brightness") is not None


def test_later_cycle_distils_on_the_effective_base(tmp_path, mrlora_cache):
    from mrlora.reduce.store import write_update

    run = make_run(tmp_path)
    merged = run.merged_dir(1)
    g = torch.Generator().manual_seed(1)
    write_update(
        merged,
        {"transformer_blocks.0.attn.to_q": (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g))},
        {"arch": "sd3", "experts": [], "weights": []},
    )
    write_marker(merged, MERGE_MARKER)
    finish_expert(run, 2, "jpeg_compressibility")
    done = distill_in_run(str(run.root), 2, "jpeg_compressibility", token="<colour>", overrides=OVERRIDES)
    token = load_token(rate_dir(run.root, 2, "jpeg_compressibility") / "token.safetensors")
    assert done["token"] == token.token == "<colour>"
    assert token.info["base_updates"] == [str(merged)]
