"""A checkpoint whose bytes changed after its marker was written is never resumed from."""

import logging

from mrlora.train import train_expert_standalone
from mrlora.training.checkpoint import load_latest


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tiny_sd3_dir, tmp_path, caplog):
    out = tmp_path / "expert"
    train_expert_standalone(
        "tiny-sd3",
        "brightness",
        tiny_sd3_dir,
        str(out),
        steps=4,
        overrides=["sample.resolution=32", "train.checkpoint_every=2"],
        progress=False,
    )
    assert load_latest(out).step == 4
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum notices
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mrlora.training.checkpoint"):
        restored = load_latest(out)
    assert restored.step == 2
    assert "checkpoint-4 fails its checksums" in caplog.text


def test_resume_skips_and_replaces_a_corrupted_checkpoint(tiny_sd3_dir, tmp_path, caplog):
    from mrlora.runstore import CHECKPOINT_MARKER, read_marker

    out = tmp_path / "expert"
    kw = dict(overrides=["sample.resolution=32", "train.checkpoint_every=2"], progress=False)
    train_expert_standalone("tiny-sd3", "brightness", tiny_sd3_dir, str(out), steps=4, **kw)
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (out / "DONE.json").unlink()  # as if the job had been killed right after checkpoint-4
    with caplog.at_level(logging.WARNING, logger="mrlora.training.checkpoint"):
        done = train_expert_standalone("tiny-sd3", "brightness", tiny_sd3_dir, str(out), steps=4, **kw)
    assert "checkpoint-4 fails its checksums" in caplog.text
    assert done["steps"] == 4
    # resumed from step 2 and wrote step 4 again, instead of keeping the corrupted directory
    assert read_marker(out / "checkpoint-4", CHECKPOINT_MARKER, verify="sha256") is not None
    assert load_latest(out).step == 4
