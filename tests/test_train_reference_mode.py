"""Reference merge mode inside a run (the public code's inexact behaviour, for ablations): cycle 2's experts
continue training the LoRA averaged by cycle 1's merge, on base_0 without that merge's update, and the next
merge supersedes it in the chain of updates."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_run

from mrlora.runstore import RunDir
from mrlora.train import train_expert_in_run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

REWARDS = ["brightness", "colourfulness"]


def _run(tmp_path, base: str) -> RunDir:
    return tiny_run(
        tmp_path,
        base,
        [
            f"rewards={REWARDS}",
            "weights=[1.0, 3.0]",
            "mapreduce.merge_mode=reference",
            "sample.resolution=32",
            "train.steps=2",
            "train.lr=3e-2",
        ],
    )


def test_cycle_two_continues_the_averaged_lora_of_cycle_one(tiny_sd3_dir, tmp_path):
    from mrlora.models.loading import load_pipeline
    from mrlora.reduce import merge_cycle_in_run, read_expert_adapter, updates_after
    from mrlora.training import loop
    from mrlora.training.lora import lora_state

    run = _run(tmp_path, tiny_sd3_dir)
    for reward in REWARDS:
        first = train_expert_in_run(str(run.root), 1, reward)
        assert "init_adapter" not in first  # cycle 1 starts a fresh LoRA
    merge_cycle_in_run(str(run.root), 1)
    merged = read_expert_adapter(run.merged_dir(1) / "adapter")

    seen: dict = {}
    original_init, original_base = loop._load_initial_adapter, loop._load_start_pipeline

    def spy_init(params, path, cfg):
        original_init(params, path, cfg)
        seen.setdefault("lora", []).append(lora_state(params))

    def spy_base(job, device):
        pipe = original_base(job, device)
        seen.setdefault("base", []).append({k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()})
        return pipe

    loop._load_initial_adapter, loop._load_start_pipeline = spy_init, spy_base
    try:
        second = train_expert_in_run(str(run.root), 2, REWARDS[0])
    finally:
        loop._load_initial_adapter, loop._load_start_pipeline = original_init, original_base

    assert second["init_adapter"] == "cycle_0001/merged/adapter"
    (initial,) = seen["lora"]
    assert merged.modules and set(initial) == {f"{m}.lora_{f}.weight" for m in merged.modules for f in "AB"}
    for module, pair in merged.modules.items():
        assert torch.equal(initial[f"{module}.lora_A.weight"], pair.A.float()), module
        assert torch.equal(initial[f"{module}.lora_B.weight"], pair.B.float()), module
    assert any(pair.B.abs().max() > 0 for pair in merged.modules.values())  # a trained LoRA, not a fresh one
    # the continued LoRA carries cycle 1's update, so the base is base_0 itself (not base_0 + that update)
    base0 = load_pipeline(tiny_sd3_dir, "sd3", "fp32", "cpu").transformer.state_dict()
    (base,) = seen["base"]
    assert all(torch.equal(base[k], v) for k, v in base0.items())

    # RaTE of that expert: its teacher is the expert on the base it trained from, base_0 (not base_0 + cycle 1's
    # update, which its continued LoRA already carries: that would count the update twice)
    from mrlora.rate.job import distill_in_run, rate_dir
    from mrlora.rate.token_file import load_token

    done = distill_in_run(
        str(run.root),
        2,
        REWARDS[0],
        overrides={"steps": 1, "teacher_steps": 2, "batch_size": 2, "checkpoint_every": 0, "max_sequence_length": 32},
    )
    token = load_token(rate_dir(run.root, 2, REWARDS[0]) / "token.safetensors")
    assert done["steps"] == 1 and token.info["base_updates"] == []

    # cycle 2's merge contains cycle 1's update, so it replaces it in the chain
    train_expert_in_run(str(run.root), 2, REWARDS[1])
    merge_cycle_in_run(str(run.root), 2)
    assert updates_after(run.root, 2) == [run.merged_dir(2)]
