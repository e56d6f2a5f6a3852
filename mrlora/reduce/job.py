"""Running a merge: validate everything, then write the update directory with its marker last.

Two callers: the CLI (``python -m mrlora.merge --experts ... --out DIR``) and the merge job of a run
(``merge_cycle_in_run``, submitted with afterok on the cycle's expert array). Both validate every input before
the output directory is touched, so a bad weight or a foreign adapter leaves nothing on disk. The job is
idempotent: a complete merge is returned as is, a killed one (directory without ``MERGE_DONE.json``) is
cleared and redone from scratch, which is cheap (seconds) and simpler than resuming half a file.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from mrlora.reduce.adapters import read_expert_adapter, save_expert_adapter
from mrlora.reduce.base import BaseTransformer, open_base, resolve_base
from mrlora.reduce.errors import OutputExistsError, ReduceError
from mrlora.reduce.exact import MODES, check_experts, check_weights, reduce_experts
from mrlora.reduce.store import FORMAT_VERSION, UPDATE_WEIGHTS, write_update
from mrlora.runstore import (
    CONTINUE_ADAPTER,
    MERGE_MARKER,
    UPDATE_JSON,
    DamagedFileError,
    RunDir,
    continues_reference_merge,
    damaged_files,
    quarantine,
    read_marker,
    reset_incomplete_dir,
    write_marker,
)

log = logging.getLogger("mrlora.reduce")

_OUR_FILES = {UPDATE_WEIGHTS, UPDATE_JSON, CONTINUE_ADAPTER, MERGE_MARKER}


def _check_output(out: Path) -> None:
    """Refuse to clear anything that is not a (killed or damaged) merge output of ours.

    A merge whose marker exists but whose files no longer match it (a truncated update) is damaged, not
    complete: ``reset_incomplete_dir`` moves it aside and the merge is redone.
    """
    if read_marker(out, MERGE_MARKER, verify="none") is not None and not damaged_files(out, MERGE_MARKER):
        raise OutputExistsError(f"{out} already holds a complete merge; choose another --out or delete it first")
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; choose another --out")
        foreign = [p.name for p in out.iterdir() if p.name not in _OUR_FILES and not p.name.startswith(".tmp-")]
        if foreign:
            raise OutputExistsError(
                f"{out} exists and holds files that are not a merge output ({', '.join(sorted(foreign)[:5])}); "
                "choose an empty or new --out directory"
            )


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops on one thread: a merge is hundreds of small ops (LoRA factors of a few hundred KB), where
    thread hand-offs cost more than the work, and on a shared node with more runnable threads than cores each
    hand-off waits for a time slice (measured: 400 isfinite checks took 9 s on 2 threads, 0.16 s on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def merge_experts(
    expert_dirs: Sequence[Path | str],
    weights: Sequence[float],
    out: Path | str,
    base: Path | str | BaseTransformer | None = None,
    mode: str = "exact",
    allow_negative_weights: bool = False,
    arch: str | None = None,
    base_id: str | None = None,
    extra_info: dict | None = None,
) -> dict:
    """Merge expert adapters into a reduced-update directory ``out``; return its marker.

    ``weights`` are normalised (``mrlora.config.normalised_weights``). ``base`` (a model directory or any
    ``model.pretrained`` spec: hub id, ``tiny:<arch>``) enables the
    architecture and shape checks against the model; ``arch`` checks the experts' ``mrlora.json`` arch.
    Adapters inside a run are checked against their markers (``read_expert_adapter``).
    Raises a ReduceError subclass, with nothing written, for every invalid input.
    """
    with single_threaded():
        return _merge_experts(expert_dirs, weights, out, base, mode, allow_negative_weights, arch, base_id, extra_info)


def _merge_experts(expert_dirs, weights, out, base, mode, allow_negative_weights, arch, base_id, extra_info) -> dict:
    started = time.monotonic()
    out = Path(out)
    if mode not in MODES:
        raise ReduceError(f"unknown merge mode {mode!r}; choose one of {', '.join(MODES)}")
    if not expert_dirs:
        raise ReduceError("no experts given; pass at least one adapter directory")
    norm = check_weights(list(weights), len(expert_dirs), allow_negative_weights)
    # verified (one streamed read each), but no factor kept: the update is computed module by module below
    experts = [read_expert_adapter(d, load=False) for d in expert_dirs]
    base_info = open_base(resolve_base(str(base))) if isinstance(base, (str, Path)) else base
    arch = check_experts(experts, base_info, arch)
    _check_output(out)

    update, averaged = reduce_experts(experts, norm, mode)
    info = {
        "mode": mode,
        "exact": update.exact,
        "arch": arch,
        "base": base_id or (str(base_info.root or base_info.transformer_dir) if base_info else None),
        "weights_given": [float(w) for w in weights],
        "weights": norm,
        "allow_negative_weights": allow_negative_weights,
        "experts": [dict(e.summary(), weight=w) for e, w in zip(experts, norm)],
        "modules": len(update.shapes),
        "rank_total": update.rank_total,
        "missing_modules": update.missing,
        **(extra_info or {}),
    }
    if not update.exact:
        info["warning"] = (
            "inexact: A and B were averaged separately (public reference code); the update is not "
            "the weighted average of the experts' updates"
        )

    reset_incomplete_dir(out, MERGE_MARKER)
    digests = write_update(out, update, info)
    if averaged is not None:
        first = experts[0]
        save_expert_adapter(
            {f"{m}.lora_{f}.weight": t for m, (A, B) in averaged.items() for f, t in (("A", A), ("B", B))},
            out / CONTINUE_ADAPTER,
            arch=arch or "",
            lora_config=first.config,
            base=info["base"] or "",
            reward="reference-merge",
        )
    marker = write_marker(
        out,
        MERGE_MARKER,
        extra={"mode": mode, "exact": update.exact, "format_version": FORMAT_VERSION},
        digests=digests,
    )
    log.info(
        "merged %d experts (%s, weights %s) into %s: %d modules, rank %d, %.2f s",
        len(experts),
        mode,
        [round(w, 4) for w in norm],
        out,
        info["modules"],
        info["rank_total"],
        time.monotonic() - started,
    )
    return marker


def merge_cycle_in_run(run_root: str, cycle: int) -> dict:
    """The merge job of ``cycle``: merge the DONE experts' adapters with the run's weights and merge mode, then
    materialise the model when due (``materialise.materialise_if_due``) and apply the retention policy
    (``retention.prune_after_merge``).

    Idempotent: returns the existing ``MERGE_DONE.json`` content if the merge is complete (finishing a
    materialisation a kill interrupted); a killed merge, or one whose files no longer match their marker, is
    redone from scratch. Raises ReduceError if an expert of the cycle is not DONE, DamagedFileError (after
    moving the damaged expert or merge aside, so ``--resume`` redoes it) if an input fails its checksum.
    """
    from mrlora.config import config_from_dict

    run = RunDir(run_root)
    cfg = config_from_dict(run.read_run_json()["config"])
    done = run.merge_done(cycle)
    if done is not None:
        log.info("cycle %d of %s is already merged", cycle, run.root)
    else:
        done = _merge_cycle(run, cycle, cfg)
    _after_merge(run, cycle, cfg)
    return done


def _after_merge(run: RunDir, cycle: int, cfg) -> None:
    from mrlora.reduce.materialise import materialise_if_due
    from mrlora.reduce.retention import prune_after_merge

    try:
        materialise_if_due(run.root, cycle, cfg)
    except DamagedFileError as exc:
        raise quarantine(exc, "resume the run to redo that merge") from None
    prune_after_merge(run, cycle, cfg)


def _merge_cycle(run: RunDir, cycle: int, cfg) -> dict:
    rewards = list(cfg.rewards)
    not_done = [r for r in rewards if run.expert_done(cycle, r) is None]
    if not_done:
        raise ReduceError(
            f"cannot merge cycle {cycle} of {run.root}: expert(s) {', '.join(not_done)} have no valid DONE.json; "
            "resume the run to finish them"
        )
    mode = cfg.mapreduce.merge_mode
    # reference mode: the experts continued the previous reference merge's LoRA (store.map_start), so this
    # update contains that one and replaces it in the chain of updates
    supersedes = continues_reference_merge(run, mode, cycle)
    base_dir = resolve_base(cfg.model.pretrained)
    try:
        return merge_experts(
            [run.adapter_dir(cycle, r) for r in rewards],
            list(cfg.weights),
            run.merged_dir(cycle),
            base=base_dir,
            mode=mode,
            allow_negative_weights=bool(cfg.mapreduce.allow_negative_weights),
            arch=cfg.model.arch,
            base_id=cfg.model.pretrained,
            extra_info={"cycle": cycle, "rewards": rewards, "run": str(run.root), "supersedes_previous": supersedes},
        )
    except DamagedFileError as exc:
        raise quarantine(exc, "resume the run to retrain that expert") from None
