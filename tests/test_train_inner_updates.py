"""Several optimizer steps per sampling round (train.updates_per_round): the first step of a round is on-policy
(ratio exactly 1), the later ones are off-policy so the PPO clip acts; checkpoints and preemption stops fall on
round ends, and a run killed mid-way resumes bit-identically; configs whose step counts are not whole rounds are
rejected with the keys named."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import kill_after_checkpoint
from train_helpers import read_metrics as _metrics

from mrlora.config import ConfigError, load_config
from mrlora.train import Preempted, train_expert_standalone
from mrlora.training.loop import round_chunks

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TWO = ["sample.resolution=32", "train.lr=3e-2", "train.updates_per_round=2", "train.checkpoint_every=2"]


def _train(base: str, out: Path, steps: int, *extra: str) -> dict:
    return train_expert_standalone(
        "tiny-sd3", "brightness", base, str(out), steps=steps, overrides=TWO + list(extra), progress=False
    )


def test_second_update_of_a_round_is_off_policy(tiny_sd3_dir, tmp_path):
    out = tmp_path / "expert"
    _train(tiny_sd3_dir, out, 2)
    first, second = _metrics(out)
    assert (first["step"], first["round"], first["update"]) == (1, 1, 1)
    assert (second["step"], second["round"], second["update"]) == (2, 1, 2)
    # one round: both steps train on the same scored samples
    assert first["reward_mean"] == second["reward_mean"]
    # the first step recomputes the sampled log-probs with the sampling weights: exactly on-policy (bit-exact
    # because the tiny preset's micro-batch has the sampler's batch size, so the kernels see the same shapes)
    assert first["ratio_mean"] == 1.0 and first["ratio_max"] == 1.0 and first["ratio_max_dev"] == 0.0
    assert first["clip_fraction"] == 0.0
    # the second sees weights moved by the first step
    assert second["ratio_max_dev"] > 0 and second["ratio_mean"] != 1.0
    assert second["ratio_max"] >= second["ratio_mean"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_tiny_clip_range_clips_the_off_policy_update(tiny_sd3_dir, tmp_path):
    out = tmp_path / "expert"
    _train(tiny_sd3_dir, out, 2, "train.clip_range=1e-6")
    first, second = _metrics(out)
    assert first["clip_fraction"] == 0.0
    assert second["clip_fraction"] > 0, "an off-policy step with a 1e-6 clip range clipped nothing"


def test_round_chunks_are_a_seeded_partition():
    chunks = round_chunks(12, 3, seed=42, salt=7, round_=5, rank=0)
    assert [len(c) for c in chunks] == [4, 4, 4]
    assert sorted(torch.cat(chunks).tolist()) == list(range(12))
    again = round_chunks(12, 3, seed=42, salt=7, round_=5, rank=0)
    assert all(torch.equal(a, b) for a, b in zip(chunks, again))
    other_round = round_chunks(12, 3, seed=42, salt=7, round_=6, rank=0)
    assert not all(torch.equal(a, b) for a, b in zip(chunks, other_round))
    assert torch.equal(round_chunks(8, 1, 42, 7, 5, 0)[0], torch.arange(8))  # one step: sampled order


def test_preemption_waits_for_the_end_of_the_round(tiny_sd3_dir, tmp_path):
    out = tmp_path / "expert"

    def signal_after_first_step():
        while not (out / "metrics.jsonl").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=signal_after_first_step, daemon=True).start()
    with pytest.raises(Preempted) as info:
        _train(tiny_sd3_dir, out, 40, "train.checkpoint_every=100")
    step = info.value.step
    assert step % 2 == 0 and 2 <= step < 40, f"stopped at step {step}, inside a round"
    assert (out / f"checkpoint-{step}" / "COMPLETE.json").exists()
    assert [r["step"] for r in _metrics(out)] == list(range(1, step + 1))


@pytest.mark.slow
def test_killed_run_with_two_updates_per_round_resumes_bit_identical(tiny_sd3_dir, tmp_path):
    steps = 4
    reference = tmp_path / "reference"
    _train(tiny_sd3_dir, reference, steps)

    out = tmp_path / "killed"
    sets = [x for s in TWO for x in ("--set", s)]
    cmd = [
        sys.executable,
        "-m",
        "mrlora.train",
        "--config",
        "tiny-sd3",
        "--reward",
        "brightness",
        "--base",
        tiny_sd3_dir,
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--no-progress",
        *sets,
    ]
    kill_after_checkpoint(cmd, out)

    _train(tiny_sd3_dir, out, steps)
    for rel in (
        "adapter/adapter_model.safetensors",
        f"checkpoint-{steps}/adapter_model.safetensors",
        f"checkpoint-{steps}/ema.safetensors",
    ):
        a, b = load_file(str(reference / rel)), load_file(str(out / rel))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{rel} differs after resume"
    ref_m, res_m = _metrics(reference), _metrics(out)
    assert [r["step"] for r in res_m] == list(range(1, steps + 1))
    for key in ("reward_mean", "ratio_mean", "clip_fraction", "loss"):
        assert [r[key] for r in res_m] == [r[key] for r in ref_m], key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.updates_per_round=0"], r"train.updates_per_round: must be >= 1"),
        (
            ["train.updates_per_round=2", "train.steps=5", "train.checkpoint_every=2"],
            r"train.steps=5 is not a multiple of train.updates_per_round=2",
        ),
        (
            ["train.updates_per_round=2", "train.steps=6", "train.checkpoint_every=3"],
            r"train.checkpoint_every=3 is not a multiple of train.updates_per_round=2",
        ),
        (
            [
                "train.updates_per_round=2",
                "train.steps=6",
                "train.checkpoint_every=2",
                "per_reward.brightness.train.steps=7",
            ],
            r"per_reward.brightness gives train.steps=7 is not a multiple",
        ),
    ],
)
def test_step_counts_must_be_whole_rounds(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-sd3", overrides)


def test_published_presets_take_two_updates_per_round_and_tiny_ones_one():
    assert load_config("sd35m").train.updates_per_round == 2
    assert load_config("flux").train.updates_per_round == 2
    assert load_config("tiny-sd3").train.updates_per_round == 1
    assert load_config("tiny-flux").train.updates_per_round == 1
