"""Expert training end to end on tiny models: it learns, it resumes bit-identically after SIGKILL, it
checkpoints and stops on SIGUSR2, and two gloo processes keep identical LoRA weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import kill_after_checkpoint
from train_helpers import read_metrics as _metrics
from train_helpers import subprocess_env as _env

from mrlora.train import Preempted, train_expert_standalone

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

# 32 px keeps a step well under a second on an idle core.
SMALL = ["sample.resolution=32", "train.lr=3e-2"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# FLUX's last of 4 steps (sigma ~0.35 -> 0) shapes the image most: the preset trains on every step; groups of 8
# keep its first steps from wandering.
LEARN = {
    "sd3": (8, SMALL),
    "flux": (8, SMALL + ["sample.group_size=8", "sample.batch_size=16", "train.micro_batch=16"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_brightness_expert_raises_mean_brightness(arch, tmp_path, request):
    base = request.getfixturevalue(f"tiny_{arch}_dir")
    out = tmp_path / "expert"
    steps, overrides = LEARN[arch]
    done = train_expert_standalone(
        f"tiny-{arch}", "brightness", base, str(out), steps=steps, overrides=overrides, progress=False
    )
    rec = _metrics(out)
    assert [r["step"] for r in rec] == list(range(1, steps + 1))
    first = sum(r["reward_mean"] for r in rec[:3]) / 3
    last = sum(r["reward_mean"] for r in rec[-3:]) / 3
    # measured (last 3 vs first 3 steps; seeds 42, 1, 2): sd3 +0.20..+0.22, flux +0.27..+0.30; a step's mean
    # alone moves ~0.02-0.08
    assert last - first > 0.1, f"mean brightness {first:.4f} -> {last:.4f}: the expert did not learn"
    # on-policy: the first inner step recomputes exactly the sampled log-probs (ratio 1, nothing clipped)
    assert rec[0]["ratio_mean"] == 1.0 and rec[0]["ratio_max_dev"] == 0.0 and rec[0]["clip_fraction"] == 0.0
    assert {"reward_std", "kl", "loss", "lr", "samples_per_s", "grad_norm"} <= set(rec[0])
    assert done["steps"] == steps and done["weights"] == "ema"
    from mrlora.reduce import read_expert_adapter

    adapter = read_expert_adapter(out / "adapter")
    assert adapter.arch == arch and adapter.reward == "brightness"
    ema = _tensors(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in ema.items())
    # re-running a finished expert returns its DONE marker without training
    again = train_expert_standalone(
        f"tiny-{arch}", "brightness", base, str(out), steps=steps, overrides=overrides, progress=False
    )
    assert again == done


def _cli(base: str, out: Path, steps: int, *extra: str) -> list[str]:
    sets = [x for s in SMALL + ["train.checkpoint_every=2", *extra] for x in ("--set", s)]
    return [
        sys.executable,
        "-m",
        "mrlora.train",
        "--config",
        "tiny-sd3",
        "--reward",
        "brightness",
        "--base",
        base,
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--no-progress",
        *sets,
    ]


@pytest.mark.slow
def test_killed_run_restarted_ends_bit_identical(tiny_sd3_dir, tmp_path):
    steps = 4
    reference = tmp_path / "reference"
    train_expert_standalone(
        "tiny-sd3",
        "brightness",
        tiny_sd3_dir,
        str(reference),
        steps=steps,
        overrides=SMALL + ["train.checkpoint_every=2"],
        progress=False,
    )

    out = tmp_path / "killed"
    kill_after_checkpoint(_cli(tiny_sd3_dir, out, steps), out)

    train_expert_standalone(
        "tiny-sd3",
        "brightness",
        tiny_sd3_dir,
        str(out),
        steps=steps,
        overrides=SMALL + ["train.checkpoint_every=2"],
        progress=False,
    )
    for rel in (
        "adapter/adapter_model.safetensors",
        f"checkpoint-{steps}/adapter_model.safetensors",
        f"checkpoint-{steps}/ema.safetensors",
    ):
        a, b = _tensors(reference / rel), _tensors(out / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{rel} differs after resume"
    ref_m, res_m = _metrics(reference), _metrics(out)
    assert [r["step"] for r in res_m] == list(range(1, steps + 1))
    assert [r["reward_mean"] for r in res_m] == [r["reward_mean"] for r in ref_m]


def test_sigusr2_checkpoints_at_the_next_step_and_raises_preempted(tiny_sd3_dir, tmp_path):
    out = tmp_path / "expert"

    def signal_after_first_step():
        while not (out / "metrics.jsonl").exists():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.getsignal(signal.SIGUSR2)
    threading.Thread(target=signal_after_first_step, daemon=True).start()
    with pytest.raises(Preempted) as info:
        train_expert_standalone(
            "tiny-sd3",
            "brightness",
            tiny_sd3_dir,
            str(out),
            steps=50,
            overrides=SMALL + ["train.checkpoint_every=100"],
            progress=False,
        )
    step = info.value.step
    assert 1 <= step < 50
    ckpt = out / f"checkpoint-{step}"
    assert (ckpt / "COMPLETE.json").exists() and Path(info.value.checkpoint) == ckpt
    state = torch.load(ckpt / "training_state.pt", weights_only=False)
    assert state["step"] == step
    assert [r["step"] for r in _metrics(out)] == list(range(1, step + 1))
    assert not (out / "DONE.json").exists()
    assert signal.getsignal(signal.SIGUSR2) is previous  # our handler is gone once training stops


def test_two_gloo_processes_keep_identical_lora_weights(tiny_sd3_dir, tmp_path):
    out = tmp_path / "expert"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29631",
        *_cli(tiny_sd3_dir, out, 2, "train.checkpoint_every=1")[1:],
    ]
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (1, 2):
        state = torch.load(out / f"checkpoint-{step}" / "training_state.pt", weights_only=False)
        assert state["world_size"] == 2 and len(state["rank_digests"]) == 2
        assert state["rank_digests"][0] == state["rank_digests"][1]
    live = _tensors(out / "checkpoint-2" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in live.items())  # weights did move
    rec = _metrics(out)
    assert [r["processes"] for r in rec] == [2, 2]
