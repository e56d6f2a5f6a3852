"""Materialise the model after a cycle, so reading it never costs more as the run gets longer.

Folding c stored updates into base_0 at every Map start is linear in c (80 cycles of FLUX updates are ~240 GB
per process), so the merge job of cycle c writes ``cycle_XXXX/base/`` whenever the model after c would
otherwise need ``mapreduce.materialise_every`` (K) or more updates on top of the newest materialised base. Then
every reader folds fewer than K updates (none with the default K = 1).

Numerical policy (no drift over 80 cycles):

* ``master.safetensors`` holds the adapted weights in fp32: base_0 cast to the model dtype and back (the
  weights every Map step starts from), plus every update of the chain, summed in fp32 in cycle order. The next
  materialisation continues from this fp32 master, never from a rounded copy, so rounding never accumulates.
* ``transformer/`` is a full diffusers transformer in the model dtype (base_0's layout and shard names): the
  adapted weights are the master rounded once; every other tensor is base_0's bytes. Map, eval, export and
  RaTE read only this (the same bytes as base_0's transformer, not the 2x larger master).
* A reader that folds j > 0 further updates on top adds them in fp32 to the rounded weights and rounds again:
  within one unit in the last place of the model dtype of the round-once value (exactly it in fp32 runs, and
  whenever j = 0, i.e. always with K = 1).

Streaming: every input is read once, front to back, one tensor at a time, and hashed on the way
(``safetensors_io.iter_verified``); outputs are hashed as they are written (``StreamingWriter(hash_output=True)``),
so ``BASE_DONE.json`` (written last) costs no second pass. Peak memory is about one fp32 weight plus one
module's factors of the updates being folded, whatever the model size.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import torch

from mrlora.reduce.base import INDEX_NAME, open_base, resolve_base
from mrlora.reduce.errors import ReduceError
from mrlora.reduce.load_model import BASE_MASTER, BASE_TRANSFORMER, base_files
from mrlora.reduce.safetensors_io import (
    DTYPE_NAMES,
    OutEntry,
    StreamingWriter,
    TensorReader,
    iter_verified,
    read_header,
)
from mrlora.reduce.store import UPDATE_WEIGHTS, update_files
from mrlora.runstore import (
    BASE_MARKER,
    DamagedFileError,
    ModelAfter,
    RunDir,
    atomic_file,
    atomic_write_json,
    model_after,
    reset_incomplete_dir,
    set_aside_damaged,
    write_marker,
)

log = logging.getLogger("mrlora.reduce")


def materialise_every(cfg) -> int:
    """K: materialise when the model would need K or more updates on its newest base (0: never)."""
    return int(cfg.mapreduce.get("materialise_every", 1))


def materialise_if_due(run_root: Path | str, cycle: int, cfg) -> dict | None:
    """Write ``cycle_XXXX/base/`` if the model after ``cycle`` needs K or more updates on its newest base;
    return the new ``BASE_DONE.json`` content, or None when nothing was due.

    Reference merge mode is never materialised: each of its updates replaces the previous one, so its model is
    always base_0 plus a single update. A damaged input base is moved aside and the work redone from the next
    older base (or base_0), which gives the same model.
    """
    k = materialise_every(cfg)
    if k <= 0 or cfg.mapreduce.merge_mode == "reference":
        return None
    run = RunDir(run_root)
    for _ in range(3):
        model = model_after(run.root, cycle)
        if len(model.update_dirs) < k:
            return None
        try:
            return materialise(run, model, cfg)
        except DamagedFileError as exc:
            if exc.unit is None or exc.unit.parent.parent != run.root or exc.unit.name != "base":
                raise  # a damaged update: its merge must be redone (the caller says so)
            set_aside_damaged(exc.unit)
    raise ReduceError(f"could not materialise the model after cycle {cycle}: its bases keep failing their checks")


class _ModuleStream:
    """One of our safetensors files (an update or a master), read front to back in module order."""

    def __init__(self, path: Path, expect: dict, unit: Path):
        self.path = path
        names = [t.name for t in read_header(path).in_file_order()]
        self.modules = list(dict.fromkeys(_module_of(n) for n in names))
        if self.modules != sorted(self.modules):
            raise ReduceError(f"{path}: tensors are not stored in module order; it was not written by mrlora")
        self._present = set(self.modules)
        self._it: Iterator = iter_verified(path, expect, unit)
        self._pending: tuple[str, torch.Tensor] | None = None

    def __contains__(self, module: str) -> bool:
        return module in self._present

    def take(self, module: str) -> dict[str, torch.Tensor]:
        """The tensors of ``module`` (the next ones in the file)."""
        out = {}
        while True:
            if self._pending is None:
                self._pending = next(self._it, None)
            if self._pending is None or _module_of(self._pending[0]) != module:
                return out
            name, tensor = self._pending
            out[name[len(module) + 1 :]] = tensor
            self._pending = None

    def finish(self) -> None:
        """Read to the end, which checks the file's size and sha256 against its marker."""
        for name, _ in self._it:
            raise ReduceError(f"{self.path}: tensor {name!r} was not folded")


def _module_of(name: str) -> str:
    for suffix in (".lora_A", ".lora_B", ".weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ReduceError(f"unexpected tensor {name!r} in a stored update or master")


def materialise(run: RunDir, model: ModelAfter, cfg) -> dict:
    """Write ``cycle_XXXX/base/`` for ``model`` (see the module docstring); return its marker."""
    from mrlora.models.loading import torch_dtype

    started = time.monotonic()
    cycle = model.cycle
    dtype = torch_dtype(cfg.model.dtype)
    base0 = open_base(resolve_base(cfg.model.pretrained))
    out = reset_incomplete_dir(run.base_dir(cycle), BASE_MARKER)
    sources: list[_ModuleStream] = []
    previous = None
    if model.base_dir is not None:
        previous = _ModuleStream(
            model.base_dir / BASE_MASTER, base_files(model.base_dir).get(BASE_MASTER, {"size": -1}), model.base_dir
        )
    for d in model.update_dirs:
        sources.append(_ModuleStream(d / UPDATE_WEIGHTS, update_files(d).get(UPDATE_WEIGHTS, {"size": -1}), d))
    modules = sorted(set().union(*(s.modules for s in sources), previous.modules if previous else ()))
    for m in modules:
        if base0.weight(m) is None:
            raise ReduceError(f"an update of {run.root} changes {m}, which the base {base0.transformer_dir} lacks")

    digests: dict[str, str] = {}
    readers = {s.path: TensorReader(s.path, s) for s in base0.shards}
    try:
        entries = [OutEntry(f"{m}.weight", "F32", tuple(base0.weight(m).shape)) for m in modules]
        with atomic_file(out / BASE_MASTER) as tmp:
            with StreamingWriter(
                tmp, entries, {"format": "mrlora-master", "cycle": str(cycle)}, hash_output=True
            ) as writer:
                for m in modules:
                    if previous is not None and m in previous:
                        w32 = previous.take(m)["weight"]
                    else:
                        shard, _ = base0.locate(f"{m}.weight")
                        w32 = readers[shard.path].get(f"{m}.weight").to(dtype).to(torch.float32)
                    for s in sources:
                        if m in s:
                            f = s.take(m)
                            w32.addmm_(f["lora_B"], f["lora_A"])
                    writer.write(f"{m}.weight", w32)
            digests[BASE_MASTER] = writer.sha256
            for s in ([previous] if previous is not None else []) + sources:
                s.finish()  # every input checked before anything is marked complete
        _write_transformer(base0, readers, out, set(modules), dtype, digests)
    finally:
        for r in readers.values():
            r.close()
    marker = write_marker(
        out,
        BASE_MARKER,
        digests=digests,
        extra={
            "cycle": cycle,
            "chain": [int(Path(d).parent.name.split("_")[1]) for d in model.chain],
            "from_base_cycle": model.base_cycle,
            "updates_folded": len(model.update_dirs),
            "dtype": str(cfg.model.dtype),
            "base_id": cfg.model.pretrained,
            "policy": "fp32 master; transformer/ = master rounded once to dtype",
        },
    )
    log.info(
        "materialised the model after cycle %d (%s) into %s in %.1f s",
        cycle,
        model.describe(),
        out,
        time.monotonic() - started,
    )
    return marker


def _write_transformer(
    base0, readers: dict, out: Path, adapted: set[str], dtype: torch.dtype, digests: dict[str, str]
) -> None:
    """``out/transformer/``: base_0's transformer layout, adapted weights = the master rounded once."""
    tdir = out / BASE_TRANSFORMER
    tdir.mkdir()
    config = (base0.transformer_dir / "config.json").read_bytes()
    with atomic_file(tdir / "config.json") as tmp:
        tmp.write_bytes(config)
    dtype_name = DTYPE_NAMES[dtype]
    total = 0

    def is_adapted(name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in adapted

    with TensorReader(out / BASE_MASTER) as master:
        for shard in base0.shards:
            order = shard.in_file_order()
            entries = [OutEntry(t.name, dtype_name if is_adapted(t.name) else t.dtype, t.shape) for t in order]
            with atomic_file(tdir / shard.path.name) as tmp:
                with StreamingWriter(tmp, entries, shard.metadata, hash_output=True) as writer:
                    for t in order:
                        if is_adapted(t.name):
                            writer.write(t.name, master.get(t.name).to(dtype))
                        else:
                            writer.copy_from(t.name, readers[shard.path].fd, shard.data_start + t.begin)
                    total += writer.bytes_written
                digests[f"{BASE_TRANSFORMER}/{shard.path.name}"] = writer.sha256
    index = base0.transformer_dir / INDEX_NAME
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = total
        atomic_write_json(tdir / INDEX_NAME, data)
