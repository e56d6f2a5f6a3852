"""Materialise a full diffusers model (the model after cycle c, ``model_after``) for release and inference.

The export streams: every file outside the transformer's weights is copied as is (text encoders, VAE,
scheduler, tokenizers, configs, the shard index), and each transformer shard is rewritten tensor by tensor in
the base's own layout: an adapted weight is read alone, the updates are added in fp32 and it is cast back to
its dtype; every other tensor is copied byte for byte inside the kernel. Peak memory is therefore about the
largest adapted weight (in fp32) plus the updates, whatever the model size, and the time is close to a plain
file copy.

The output is built in a hidden sibling directory, completed with ``EXPORT_DONE.json`` (sizes of every file),
then renamed into place: ``--out`` either does not exist or is a complete export. A killed export leaves only
the hidden directory, which the next export to the same place removes.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Sequence

import torch

from mrlora.reduce.base import BaseTransformer, open_base, resolve_base
from mrlora.reduce.card import CARD_NAME, model_card
from mrlora.reduce.errors import ArchMismatchError, OutputExistsError, ShapeMismatchError
from mrlora.reduce.load_model import BASE_TRANSFORMER
from mrlora.reduce.safetensors_io import DTYPES, OutEntry, StreamingWriter, TensorReader
from mrlora.reduce.store import load_update, read_update_info
from mrlora.runstore import (
    BASE_MARKER,
    RunDir,
    atomic_file,
    atomic_write_text,
    damaged_files,
    fsync_dir,
    model_after,
    pid_alive,
    read_marker,
    replace_file,
    set_aside_damaged,
    write_marker,
)

log = logging.getLogger("mrlora.reduce")

EXPORT_MARKER = "EXPORT_DONE.json"
_PARTIAL = ".tmp-export-"


def _collect_updates(
    base: BaseTransformer, update_dirs: Sequence[Path]
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for d in update_dirs:
        info = read_update_info(d)
        if info.get("arch") and info["arch"] != base.arch:
            raise ArchMismatchError(f"{d} is an update for {info['arch']} but the base is {base.arch}")
        for module, (A, B) in load_update(d).items():
            w = base.weight(module)
            if w is None:
                raise ArchMismatchError(f"{d} updates {module}, which the base {base.transformer_dir} does not have")
            if tuple(w.shape) != (B.shape[0], A.shape[1]):
                raise ShapeMismatchError(
                    f"{d}: {module} update is {B.shape[0]}x{A.shape[1]}, base weight is {list(w.shape)}"
                )
            per_module.setdefault(module, []).append((A, B))
    return per_module


def _remove_stale_partials(out: Path) -> None:
    """Remove hidden build directories of earlier exports to ``out`` whose process is gone."""
    host = socket.gethostname()
    for p in out.parent.glob(f"{_PARTIAL}{out.name}.*"):
        parts = p.name[len(f"{_PARTIAL}{out.name}.") :].split(".")
        if len(parts) >= 3 and parts[-3] == host and parts[-2].isdigit() and not pid_alive(int(parts[-2])):
            shutil.rmtree(p, ignore_errors=True)


def _copy_tree(src: Path, dst: Path, skip: set[Path]) -> int:
    """Copy every file under ``src`` (following symlinks, as hub caches use them) except ``skip``."""
    copied = 0
    for path in sorted(src.rglob("*")):
        if path in skip or path.is_dir() or path.name.startswith(".tmp-") or path.name == EXPORT_MARKER:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:
            shutil.copyfile(path, tmp)
        copied += target.stat().st_size
    return copied


def _export_shard(reader: TensorReader, out_path: Path, updates: dict) -> int:
    header = reader.header
    order = header.in_file_order()
    entries = [OutEntry(t.name, t.dtype, t.shape) for t in order]
    with atomic_file(out_path) as tmp:
        with StreamingWriter(tmp, entries, header.metadata) as writer:
            for t in order:
                module = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
                if module in updates:
                    w32 = reader.get(t.name).to(torch.float32)
                    for A, B in updates[module]:
                        w32.addmm_(B, A)
                    writer.write(t.name, w32.to(DTYPES[t.dtype]))
                    del w32
                else:
                    writer.copy_from(t.name, reader.fd, header.data_start + t.begin)
            written = writer.bytes_written
    return written


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def export_with_updates(
    base_dir: Path | str,
    update_dirs: Sequence[Path | str],
    out: Path | str,
    marker_extra: dict | None = None,
    transformer_dir: Path | str | None = None,
    card: str | None = None,
) -> Path:
    """Write ``out``: the model at ``base_dir`` with ``update_dirs`` folded into its transformer.

    ``transformer_dir`` (a run's materialised ``cycle_XXXX/base/transformer``) replaces the transformer of
    ``base_dir``; every other component still comes from ``base_dir``. ``card`` (``mrlora.reduce.card``)
    replaces the base's README.md; given for a complete export of the same updates, only the card is rewritten.
    """
    started = time.monotonic()
    out = Path(out).absolute()
    update_dirs = [Path(d) for d in update_dirs]
    pipeline = open_base(base_dir)
    base = pipeline if transformer_dir is None else open_base(transformer_dir)
    extra = {"base": str(base_dir), "updates": [str(d) for d in update_dirs], **(marker_extra or {})}
    if transformer_dir is not None:
        extra["transformer"] = str(transformer_dir)
    existing = read_marker(out, EXPORT_MARKER)
    if existing is not None:
        same = {k: existing.get(k) for k in extra} == extra
        if same:
            log.info("%s is already a complete export of the same updates", out)
            if card is not None and _read_text(out / CARD_NAME) != card:
                replace_file(out, EXPORT_MARKER, CARD_NAME, card.encode("utf-8"))
                log.info("wrote the model card %s", out / CARD_NAME)
            return out
        raise OutputExistsError(
            f"{out} is a complete export of something else ({existing.get('updates')}); choose another --out"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not empty; choose a new --out directory")
    updates = _collect_updates(base, update_dirs)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    build = out.parent / f"{_PARTIAL}{out.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    build.mkdir()
    try:
        src_root = pipeline.root or pipeline.transformer_dir
        t_rel = pipeline.transformer_dir.relative_to(src_root)
        shard_paths = {s.path for s in pipeline.shards}
        moved = _copy_tree(src_root, build, skip=shard_paths)
        for shard in base.shards:
            with TensorReader(shard.path, shard) as reader:
                moved += _export_shard(reader, build / t_rel / shard.path.name, updates)
        if card is not None:
            atomic_write_text(build / CARD_NAME, card)
        write_marker(build, EXPORT_MARKER, extra=extra, checksums=False)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(build, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    elapsed = time.monotonic() - started
    log.info("exported %s (%d updated modules, %.2f GB written) in %.1f s", out, len(updates), moved / 1e9, elapsed)
    return out


def export_model(run_root: str, cycle: int, out: str, with_card: bool = False) -> str:
    """A full diffusers model dir of ``run_root`` after ``cycle``: ``model_after`` (a materialised base plus
    the updates after it, or base_0 plus cycles 1..cycle), the same weights Map and eval use. ``with_card``:
    README.md is the model card of the run (config and eval summary) instead of the base's."""
    from mrlora.config import config_from_dict

    run = RunDir(run_root)
    cfg = config_from_dict(run.read_run_json()["config"])
    if cycle < 0:
        raise ValueError(f"cycle must be >= 0 (0 exports base_0), got {cycle}")
    model = model_after(run.root, cycle)
    transformer_dir = None
    if model.base_dir is not None:
        # the shards are copied in the kernel below, so check them here (a damaged base is moved aside and the
        # export is retried from an older base or base_0, which gives the same model)
        bad = damaged_files(model.base_dir, BASE_MARKER, verify="sha256")
        if bad:
            set_aside_damaged(model.base_dir)
            return export_model(run_root, cycle, out, with_card=with_card)
        transformer_dir = model.base_dir / BASE_TRANSFORMER
    base_dir = resolve_base(cfg.model.pretrained)
    card = None
    if with_card:
        card = model_card(
            base_dir,
            cfg.model.pretrained,
            cfg.model.arch,
            run_cfg=cfg,
            run_root=run.root,
            cycle=cycle,
            title=f"{cfg.model.name or cfg.model.arch} MapReduce LoRA, cycle {cycle} of run {run.run_ts}",
        )
    path = export_with_updates(
        base_dir,
        list(model.update_dirs),
        out,
        transformer_dir=transformer_dir,
        marker_extra={"run": str(run.root), "cycle": cycle, "base_id": cfg.model.pretrained},
        card=card,
    )
    return str(path)
