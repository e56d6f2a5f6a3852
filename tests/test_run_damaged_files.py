"""A damaged file in a run directory is never used: it is named, moved aside, and resuming redoes that unit.

Files are damaged the way a bad disk or a crash damages them: tensor bytes overwritten in place (same size,
so only the checksum notices) and truncation. The run is built with the real formats on the tiny SD3 model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_reduce_model_after import finish_cycle, make_run, shapes_of

from eval.checkpoint import resolve_checkpoint
from eval.errors import EvalError
from eval.model import build_pipeline
from mrlora.config import config_from_dict
from mrlora.reduce import merge_cycle_in_run
from mrlora.reduce.safetensors_io import read_header
from mrlora.runstore import (
    CHECKPOINT_MARKER,
    DamagedFileError,
    RunDir,
    damaged_files,
    reset_incomplete_dir,
    write_marker,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def overwrite_tensor_bytes(path: Path) -> None:
    """Flip the bytes of the first tensor in place: size and header unchanged, content wrong."""
    header = read_header(path)
    first = header.in_file_order()[0]
    with open(path, "r+b") as fh:
        fh.seek(header.data_start + first.begin)
        data = fh.read(64)
        fh.seek(header.data_start + first.begin)
        fh.write(bytes(b ^ 0x5A for b in data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def asides(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.damaged-*"))


@pytest.fixture
def unmaterialised_run(tiny_sd3_dir, tmp_path) -> RunDir:
    """Two merged cycles, no materialised bases: the model after cycle 2 is base_0 + both stored updates."""
    run = make_run(tmp_path, tiny_sd3_dir, "mapreduce.materialise_every=0")
    shapes = shapes_of(tiny_sd3_dir)
    for cycle in (1, 2):
        finish_cycle(run, cycle, shapes)
    return run


def eval_weights(run: RunDir, cycle: int) -> dict[str, torch.Tensor]:
    ckpt = resolve_checkpoint(f"{run.root}:{cycle}")
    return build_pipeline(ckpt, config_from_dict(ckpt.config), device="cpu").transformer.state_dict()


def test_eval_refuses_an_overwritten_update_and_resume_redoes_that_merge(unmaterialised_run):
    run = unmaterialised_run
    good = eval_weights(run, 2)
    update = run.merged_dir(1) / "update.safetensors"
    original = update.read_bytes()
    overwrite_tensor_bytes(update)

    with pytest.raises(EvalError, match=r"cycle_0001/merged/update.safetensors is damaged") as err:
        eval_weights(run, 2)
    moved = asides(run.merged_dir(1))
    assert len(moved) == 1, str(err.value)
    assert str(moved[0]) in str(err.value) and "resume the run" in str(err.value)
    assert (moved[0] / "update.safetensors").read_bytes() != original  # kept for inspection, not deleted
    assert run.scan(["brightness"]).last_complete_cycle == 0  # resume sees the merge as not done

    merge_cycle_in_run(str(run.root), 1)  # what --resume submits: exactly that merge, redone
    assert update.read_bytes() == original
    redone = eval_weights(run, 2)
    assert all(torch.equal(good[k], v) for k, v in redone.items())


def test_truncated_update_is_redone_by_the_merge_instead_of_blocking_it(unmaterialised_run):
    """Once this got the run stuck: '.../merged already holds a complete merge'."""
    run = unmaterialised_run
    update = run.merged_dir(2) / "update.safetensors"
    original = update.read_bytes()
    truncate(update)
    assert run.merge_done(2) is None
    with pytest.raises(EvalError, match="cycle 2 .*no complete merge.*resume the run"):
        resolve_checkpoint(f"{run.root}:2")

    merge_cycle_in_run(str(run.root), 2)
    assert update.read_bytes() == original and run.merge_done(2) is not None
    [moved] = asides(run.merged_dir(2))
    assert (moved / "update.safetensors").stat().st_size == len(original) // 2


def test_merge_refuses_an_overwritten_expert_adapter_and_moves_the_expert_aside(tiny_sd3_dir, tmp_path):
    run = make_run(tmp_path, tiny_sd3_dir)
    finish_cycle(run, 1, shapes_of(tiny_sd3_dir))
    shutil.rmtree(run.merged_dir(1))
    shutil.rmtree(run.base_dir(1))
    adapter = run.adapter_dir(1, "brightness") / "adapter_model.safetensors"
    overwrite_tensor_bytes(adapter)

    ckpt = resolve_checkpoint(str(run.expert_dir(1, "brightness")))
    with pytest.raises(EvalError, match=r"adapter_model.safetensors is damaged.*cannot be evaluated"):
        build_pipeline(ckpt, config_from_dict(ckpt.config), device="cpu")
    assert not asides(run.expert_dir(1, "brightness"))  # eval only reads
    with pytest.raises(DamagedFileError, match=r"brightness/adapter/adapter_model.safetensors is damaged.*retrain"):
        merge_cycle_in_run(str(run.root), 1)
    assert run.expert_done(1, "brightness") is None and not run.merged_dir(1).exists()
    assert len(asides(run.expert_dir(1, "brightness"))) == 1  # resume retrains exactly that expert


def test_damaged_materialised_base_is_moved_aside_and_rebuilt_from_the_updates(tiny_sd3_dir, tmp_path):
    run = make_run(tmp_path, tiny_sd3_dir)
    shapes = shapes_of(tiny_sd3_dir)
    finish_cycle(run, 1, shapes)
    good = eval_weights(run, 1)
    shard = run.base_dir(1) / "transformer" / "diffusion_pytorch_model.safetensors"
    overwrite_tensor_bytes(shard)

    with pytest.raises(EvalError, match=r"cycle_0001/base/transformer/diffusion_pytorch_model.safetensors"):
        eval_weights(run, 1)
    assert len(asides(run.base_dir(1))) == 1
    again = eval_weights(run, 1)  # base_0 + the stored update: the same model
    assert all(torch.equal(good[k], v) for k, v in again.items())
    merge_cycle_in_run(str(run.root), 1)  # the merge job (resume) materialises it again
    assert run.base_dir(1).is_dir() and not damaged_files(run.base_dir(1), "BASE_DONE.json", verify="sha256")


def test_rate_resumes_from_an_older_checkpoint_when_the_newest_is_damaged(tmp_path):
    from mrlora.rate.distill import latest_checkpoint

    out = tmp_path / "rate" / "brightness"
    for step in (2, 4):
        ckpt = reset_incomplete_dir(out / f"checkpoint-{step}", CHECKPOINT_MARKER)
        (ckpt / "token.safetensors").write_bytes(bytes(range(200)))
        write_marker(ckpt, CHECKPOINT_MARKER, extra={"step": step})
    assert latest_checkpoint(out) == (4, out / "checkpoint-4")
    with open(out / "checkpoint-4" / "token.safetensors", "r+b") as fh:
        fh.write(b"\xff" * 16)
    assert latest_checkpoint(out) == (2, out / "checkpoint-2")
