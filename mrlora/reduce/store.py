"""The stored form of a cycle's reduced update, and folding updates into a model.

``cycle_XXXX/merged/update.safetensors`` holds, per adapted module, ``<module>.lora_A`` (R x in) and
``<module>.lora_B`` (out x R) in fp32 with ``dW = lora_B @ lora_A`` exactly (weights and alpha/r folded into B).
At rank R = sum of the experts' ranks it is lossless and a few hundred MB at most, where a full checkpoint
per cycle would be 5-24 GB. ``update.json`` records how it was made; ``MERGE_DONE.json`` (runstore marker,
written last) makes it count.

The model after cycle c is base_0 plus every update of cycles 1..c (in reference mode a cycle that continued
the previous averaged LoRA replaces that update instead, see ``runstore.updates_after``);
``runstore.model_after`` answers with a materialised base plus the few updates after it. ``apply_updates``
folds updates into a loaded transformer in fp32 (all updates summed onto the fp32 weight, one rounding at the
end) and casts to the training dtype, so 80 cycles of bf16 training do not accumulate 80 bf16 roundings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch

from mrlora.reduce.errors import ArchMismatchError, ReduceError, ShapeMismatchError
from mrlora.reduce.safetensors_io import OutEntry, StreamingWriter, read_tensors
from mrlora.runstore import MERGE_MARKER, UPDATE_JSON, atomic_file, atomic_write_json, read_json, read_marker

if TYPE_CHECKING:
    from mrlora.reduce.exact import ReducedUpdate

log = logging.getLogger("mrlora.reduce")

UPDATE_WEIGHTS = "update.safetensors"
FORMAT_VERSION = 1


def write_update(
    out_dir: Path | str,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | ReducedUpdate,
    info: dict,
) -> dict[str, str]:
    """Write ``update.safetensors`` then ``update.json`` (atomically; the caller writes the marker last).

    ``factors`` is a reduced update (its modules computed and written one at a time, so a FLUX-size update
    never sits in memory whole) or a ``{module: (A, B)}`` dict. Returns ``{file: sha256}`` of what was
    streamed out, for ``write_marker(digests=...)`` (no second read of the file to hash it).
    """
    out_dir = Path(out_dir)
    if isinstance(factors, Mapping):
        table = dict(factors)
        shapes = {m: (int(A.shape[0]), int(A.shape[1]), int(B.shape[0])) for m, (A, B) in table.items()}
        compute = table.__getitem__
    else:
        shapes, compute = factors.shapes, factors.module_factors
    modules = sorted(shapes)
    entries = []
    for m in modules:
        rank, fan_in, fan_out = shapes[m]
        entries += [OutEntry(f"{m}.lora_A", "F32", (rank, fan_in)), OutEntry(f"{m}.lora_B", "F32", (fan_out, rank))]
    metadata = {"format": "mrlora-update", "version": str(FORMAT_VERSION)}
    with atomic_file(out_dir / UPDATE_WEIGHTS) as tmp:
        with StreamingWriter(tmp, entries, metadata, hash_output=True) as writer:
            for m in modules:
                A, B = compute(m)
                writer.write(f"{m}.lora_A", A.to(torch.float32).contiguous())
                writer.write(f"{m}.lora_B", B.to(torch.float32).contiguous())
    atomic_write_json(out_dir / UPDATE_JSON, {"format_version": FORMAT_VERSION, **info})
    return {UPDATE_WEIGHTS: str(writer.sha256)}


def read_update_info(update_dir: Path | str) -> dict:
    path = Path(update_dir) / UPDATE_JSON
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        raise ReduceError(f"cannot read {path} ({exc}); redo that cycle's merge") from None


def update_files(update_dir: Path | str) -> dict[str, dict]:
    """The marker entries (size, sha256) of a complete update directory; ReduceError when it is not complete."""
    update_dir = Path(update_dir)
    marker = read_marker(update_dir, MERGE_MARKER)
    if marker is None:
        raise ReduceError(
            f"{update_dir} is not a complete merge (no valid {MERGE_MARKER}); rerun the merge of that cycle"
        )
    return marker.get("files", {})


def load_update(update_dir: Path | str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of a complete update directory, its file checked against ``MERGE_DONE.json``
    (size and sha256, hashed during the one read; DamagedFileError names the file)."""
    update_dir = Path(update_dir)
    expect = update_files(update_dir).get(UPDATE_WEIGHTS, {"size": -1})
    tensors = read_tensors(update_dir / UPDATE_WEIGHTS, expect=expect, unit=update_dir)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        module, _, factor = key.rpartition(".lora_")
        if factor not in ("A", "B") or not module:
            raise ReduceError(f"{update_dir / UPDATE_WEIGHTS}: unexpected tensor {key!r}")
        if factor == "A":
            B = tensors.get(f"{module}.lora_B")
            A = tensors[key]
            if B is None or A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise ShapeMismatchError(
                    f"{update_dir / UPDATE_WEIGHTS}: factors of {module} are missing or do not fit"
                )
            factors[module] = (A, B)
    return factors


def apply_updates(
    transformer: torch.nn.Module,
    update_dirs: Iterable[Path | str],
    dtype: torch.dtype | None = None,
    arch: str | None = None,
) -> list[str]:
    """Fold reduced updates into ``transformer``'s weights in fp32, then cast them to ``dtype``.

    Works on a plain diffusers transformer or one that already carries peft LoRA layers (the base layer is
    updated). Every module named by an update must exist with the right shape, otherwise nothing is changed
    and ShapeMismatchError/ArchMismatchError says which. Returns the folded module names.
    """
    update_dirs = [Path(d) for d in update_dirs]
    named = dict(transformer.named_modules())
    updates = []
    for d in update_dirs:
        info = read_update_info(d)
        if arch and info.get("arch") and info["arch"] != arch:
            raise ArchMismatchError(f"{d} is an update for {info['arch']}, not {arch}")
        updates.append((d, load_update(d)))

    targets: dict[str, torch.nn.Parameter] = {}
    for d, factors in updates:
        for module, (A, B) in factors.items():
            layer = named.get(module)
            layer = getattr(layer, "base_layer", layer)
            weight = getattr(layer, "weight", None)
            if weight is None:
                raise ArchMismatchError(f"{d} updates {module}, which this transformer does not have")
            if tuple(weight.shape) != (B.shape[0], A.shape[1]):
                raise ShapeMismatchError(
                    f"{d}: {module} update is {B.shape[0]}x{A.shape[1]}, the weight is {list(weight.shape)}"
                )
            targets[module] = weight

    with torch.no_grad():
        for module, weight in targets.items():
            w32 = weight.detach().to(torch.float32, copy=True)
            for _, factors in updates:
                if module in factors:
                    A, B = factors[module]
                    w32.addmm_(B.to(w32.device), A.to(w32.device))
            weight.data = w32.to(dtype or weight.dtype)
        if dtype is not None:
            transformer.to(dtype=dtype)
    log.info("folded %d update(s) into %d module(s)", len(updates), len(targets))
    return sorted(targets)
