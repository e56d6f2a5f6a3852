"""Step checkpoints of an expert: write through the run store, find and restore the newest complete one.

``checkpoint-<step>/`` holds the live adapter (expert format), ``ema.safetensors``, ``training_state.pt``
(optimizer, step, EMA update count, data position, RNG states of every rank) and ``COMPLETE.json`` last
(docs/internals.md). A directory without its marker is the leftover of a killed writer: it is ignored by resume
and replaced when that step is written again. Only the newest ``KEEP`` complete checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mrlora.runstore import (
    CHECKPOINT_MARKER,
    atomic_file,
    complete_checkpoints,
    read_marker,
    reset_incomplete_dir,
    write_marker,
)
from mrlora.training.errors import TrainError
from mrlora.training.lora import read_adapter_weights, write_expert_adapter

log = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
KEEP = 2


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the adapter tensors (sorted keys): equal on every rank iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Restored:
    step: int
    path: Path
    adapter: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict


def checkpoint_path(expert_dir: Path, step: int) -> Path:
    return Path(expert_dir) / f"checkpoint-{step}"


def save_checkpoint(
    expert_dir: Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    state: dict,
    cfg,
    base: str,
    reward: str,
    keep_existing: bool = False,
) -> Path:
    """Write ``checkpoint-<step>`` (rank 0): adapter, EMA, training state, then the marker; prune old ones.

    ``keep_existing``: the directory was prepared with
    :func:`prepare_dir` and already holds files other ranks wrote (DeepSpeed's sharded optimizer state).
    """
    from safetensors.torch import save_file

    path = checkpoint_path(expert_dir, step)
    if read_marker(path, CHECKPOINT_MARKER) is not None:
        return path  # this exact step was already saved (e.g. preempted right after a periodic checkpoint)
    if not keep_existing:
        reset_incomplete_dir(path, CHECKPOINT_MARKER)
    write_expert_adapter(path, adapter, cfg, base, reward)
    if ema is not None:
        with atomic_file(path / EMA_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp))
    with atomic_file(path / STATE_FILE) as tmp:
        torch.save(state, tmp)
    write_marker(path, CHECKPOINT_MARKER, {"step": int(step)})
    for _step, old in complete_checkpoints(expert_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def prepare_dir(path: Path) -> None:
    """Empty an incomplete checkpoint directory before several ranks write into it (no-op if complete)."""
    if read_marker(path, CHECKPOINT_MARKER) is None:
        reset_incomplete_dir(path, CHECKPOINT_MARKER)


def load_latest(expert_dir: Path) -> Restored | None:
    """The newest complete checkpoint of ``expert_dir`` (checksums verified), or None."""
    for step, path in reversed(complete_checkpoints(expert_dir)):
        if read_marker(path, CHECKPOINT_MARKER, verify="sha256") is None:
            # listed files changed after the marker: not trustworthy, fall back to an older one
            log.warning("checkpoint %s fails its checksums (corrupted after it was written); skipping it", path)
            continue
        return load_step(path, step)
    return None


def load_step(path: Path, step: int) -> Restored:
    """Read checkpoint ``path`` of step ``step`` (already known complete: no checksum pass)."""
    from safetensors.torch import load_file

    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable state means this checkpoint is unusable
        raise TrainError(
            f"{path / STATE_FILE} is complete but unreadable ({exc}); delete {path} to resume "
            "from the previous checkpoint"
        ) from None
    if int(state.get("step", -1)) != step:
        raise TrainError(f"{path} holds step {state.get('step')} but is named for step {step}; delete it")
    ema_path = path / EMA_FILE
    return Restored(
        step, path, read_adapter_weights(path), load_file(str(ema_path)) if ema_path.is_file() else None, state
    )
