"""Finding model weights for rewards, offline-first.

Compute nodes are often offline, so every reward resolves its models through :func:`resolve_model`: a local
directory is used as is; a hub id is looked up in the Hugging Face cache when ``HF_HUB_OFFLINE=1`` (and
fails fast, naming the missing model and the prefetch command to run on the login node), and otherwise handed
to ``from_pretrained`` which downloads it. Torch-free: prefetch and config validation import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rewards.base import MissingModelError


@dataclass(frozen=True)
class ModelRef:
    """A model a reward loads: a hub id (or local path) and what the reward uses it for."""

    repo_id: str
    purpose: str
    weights: bool = True  # False: only configs/tokenizer files are needed (e.g. a processor)


def hub_offline() -> bool:
    """True when huggingface_hub is told not to touch the network (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def prefetch_command(reward: str, cache_dir: str | None = None) -> str:
    cmd = f"python -m rewards.prefetch --rewards {reward}"
    return cmd + (f" --cache {cache_dir}" if cache_dir else "")


def _looks_like_path(ref: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a filesystem path."""
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve_model(ref: str, *, reward: str, purpose: str, cache_dir: str | None = None) -> str:
    """Return what to pass to ``from_pretrained`` for ``ref`` (a local directory or a hub id).

    Raises :class:`MissingModelError` when ``ref`` is a path that does not exist, or a hub id missing from
    the cache while offline.
    """
    ref = str(ref)
    expanded = os.path.expanduser(ref)
    if os.path.isdir(expanded):
        return expanded
    if _looks_like_path(ref):
        raise MissingModelError(
            f"reward {reward!r}: {purpose} directory {ref!r} does not exist. Point reward_models.{reward} at a "
            f"saved model directory or a hub id."
        )
    if not hub_offline():
        return ref
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(ref, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:
        where = cache_dir or os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "the default HF cache"
        raise MissingModelError(
            f"reward {reward!r}: {purpose} {ref!r} is not in {where} and HF_HUB_OFFLINE=1 forbids downloading "
            f"it. On a node with internet (the login node) run: {prefetch_command(reward, cache_dir)} "
            f"(and point HF_HOME/HF_HUB_CACHE of the job at the same cache). [{type(exc).__name__}]"
        ) from None


def resolve_device(device: str | None) -> str:
    """The job's device: ``device`` if given, else the current CUDA device when there is one, else CPU."""
    if device:
        return str(device)
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"
