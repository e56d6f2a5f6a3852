"""Build the pipeline of "the model after cycle c" (``runstore.model_after``): Map, eval, RaTE load it here.

``load_pipeline_after`` (``load_transformer_after`` for the transformer alone) reads the materialised
transformer (``cycle_XXXX/base/transformer``, written by the merge job, ``mrlora.reduce.materialise``) in place
of base_0's, once, front to back, every byte hashed and checked against ``BASE_DONE.json``, then folds the
remaining updates in fp32 and rounds once (``store.apply_updates``). Its weights are read exactly once: the pipeline never loads base_0's transformer
as well, so a Map start reads the same bytes at cycle 80 as at cycle 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mrlora.runstore import BASE_MARKER, ModelAfter, RunStoreError, read_json, read_marker

log = logging.getLogger("mrlora.reduce")

BASE_TRANSFORMER = "transformer"  # cycle_XXXX/base/transformer/: the model dtype, loadable like base_0's
BASE_MASTER = "master.safetensors"  # cycle_XXXX/base/master.safetensors: fp32 adapted weights (merge job only)


# ------------------------------------------------------------------------------------------------- loading


def base_files(base_dir: Path) -> dict[str, dict]:
    """``{relative path: marker entry}`` of an intact materialised base (RunStoreError when it is not)."""
    marker = read_marker(base_dir, BASE_MARKER)
    if marker is None:
        raise RunStoreError(f"{base_dir} is not a complete materialised base (no valid {BASE_MARKER})")
    return marker["files"]


def load_base_transformer(base_dir: Path | str, arch: str, dtype: Any) -> Any:
    """The materialised transformer of ``base_dir`` in ``dtype``, every shard read once and checked against
    ``BASE_DONE.json`` (sizes and sha256, hashed during the read; DamagedFileError names a damaged shard)."""
    import diffusers
    import torch
    from accelerate import init_empty_weights

    from mrlora.models.loading import torch_dtype
    from mrlora.reduce.base import ARCH_BY_CLASS, INDEX_NAME, WEIGHTS_NAME
    from mrlora.reduce.safetensors_io import iter_verified

    base_dir = Path(base_dir)
    files = base_files(base_dir)
    tdir = base_dir / BASE_TRANSFORMER
    config = read_json(tdir / "config.json")
    classes = {a: c for c, a in ARCH_BY_CLASS.items()}
    if config.get("_class_name") != classes.get(arch):
        raise RunStoreError(f"{tdir} holds a {config.get('_class_name')}, not the {arch} transformer of this run")
    cls = getattr(diffusers, classes[arch])
    index = tdir / INDEX_NAME
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_NAME]
    dtype = torch_dtype(dtype)
    # every tensor, buffers included, comes from the checkpoint: building buffers here would only recompute
    # SD3's 384x384 sin-cos position table (seconds) to throw it away
    with init_empty_weights(include_buffers=True):
        model = cls.from_config(config)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        rel = f"{BASE_TRANSFORMER}/{shard}"
        for name, tensor in iter_verified(tdir / shard, files.get(rel, {"size": -1}), unit=base_dir):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=True, assign=True)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise RunStoreError(f"{tdir} does not hold {', '.join(missing[:5])}; it is not a complete transformer")
    # buffers (built by from_config in fp32) follow the dtype like from_pretrained(dtype=...) casts them;
    # nn.Module.to, because diffusers' own .to warns about fp32-kept modules these models do not have
    return torch.nn.Module.to(model, dtype).eval()


def load_transformer_after(model: ModelAfter, spec: str, arch: str, dtype: Any) -> Any:
    """The transformer of ``model`` in ``dtype`` on the CPU: its materialised base (or base_0 ``spec``'s
    transformer) with the remaining updates folded in fp32 and rounded once.

    A damaged file (a checksum or size that differs from its marker) is moved aside with its unit
    (``runstore.quarantine``: a materialised base, or a cycle's merge) and DamagedFileError is raised, so the
    next attempt or ``--resume`` redoes exactly that unit; a partly loaded model is never returned.
    """
    import diffusers

    from mrlora.models.loading import resolve_model, torch_dtype
    from mrlora.reduce.base import ARCH_BY_CLASS
    from mrlora.reduce.store import apply_updates
    from mrlora.runstore import DamagedFileError, quarantine

    try:
        if model.base_dir is not None:
            transformer = load_base_transformer(model.base_dir, arch, dtype)
        else:
            cls = getattr(diffusers, {a: c for c, a in ARCH_BY_CLASS.items()}[arch])
            transformer = cls.from_pretrained(Path(resolve_model(spec)) / BASE_TRANSFORMER, dtype=torch_dtype(dtype))
        if model.update_dirs:
            apply_updates(transformer, list(model.update_dirs), torch_dtype(dtype), arch=arch)
    except DamagedFileError as exc:
        raise quarantine(
            exc,
            "run the same command again (a materialised base is rebuilt from the updates) or "
            "resume the run (a merge is redone)",
        ) from None
    log.info("model after cycle %d: %s", model.cycle, model.describe())
    return transformer


def load_pipeline_after(model: ModelAfter, spec: str, arch: str, dtype: Any, device: Any = "cpu") -> Any:
    """The diffusers pipeline of ``model``: ``load_transformer_after``, everything else from base_0 ``spec``."""
    from mrlora.models.loading import load_pipeline

    transformer = load_transformer_after(model, spec, arch, dtype)
    return load_pipeline(spec, arch=arch, dtype=dtype, device=device, transformer=transformer)
