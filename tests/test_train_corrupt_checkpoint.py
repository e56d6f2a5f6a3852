"""A checkpoint whose bytes changed after its marker was written is never resumed from."""

import logging

from mrlora.train import train_expert_standalone
from mrlora.training.checkpoint import load_latest


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tiny_sd3_dir, tmp_path, caplog):
    out = tmp_path / "expert"
    train_expert_standalone("tiny-sd3", "brightness", tiny_sd3_dir, str(out), steps=4,
                            overrides=["sample.resolution=32", "train.checkpoint_every=2"], progress=False)
    assert load_latest(out).step == 4
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum notices
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mrlora.training.checkpoint"):
        restored = load_latest(out)
    assert restored.step == 2
    assert "checkpoint-4 fails its checksums" in caplog.text
