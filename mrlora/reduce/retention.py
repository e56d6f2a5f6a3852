"""What a run keeps on disk, so its size stays bounded over 80 cycles (applied by each merge job).

| what | kept | rebuilt from | config |
|---|---|---|---|
| ``cycle_XXXX/merged/`` (updates, ~0.3 GB SD3.5-M, ~3 GB FLUX) | always | the cycle's expert adapters | - |
| ``cycle_XXXX/<reward>/adapter/`` + ``DONE.json`` | always | (the expert's training) | - |
| ``cycle_XXXX/base/`` (materialised model) | the newest ``mapreduce.keep_bases`` | base_0 + the updates | ``keep_bases`` (>= 1) |
| ``cycle_XXXX/<reward>/checkpoint-*`` | until the cycle is merged | not needed after DONE | ``keep_step_checkpoints`` |

Why this is safe: an older materialised base is never needed (the newest one plus the updates after it gives
every later model, and an older cycle's model is base_0 plus its updates); a finished expert is never resumed,
so its step checkpoints only serve ``eval --checkpoint .../checkpoint-<step>``. Removing step checkpoints
rewrites the expert's ``DONE.json`` without them (``runstore.forget_files``), so the expert stays verifiably
complete.
"""

from __future__ import annotations

import logging
import shutil

from mrlora.runstore import BASE_MARKER, DONE_MARKER, RunDir, forget_files, read_marker

log = logging.getLogger("mrlora.reduce")


def prune_after_merge(run: RunDir, cycle: int, cfg) -> list[str]:
    """Apply the retention policy after the merge of ``cycle``; return what was removed (relative paths)."""
    removed = prune_bases(run, cycle, int(cfg.mapreduce.get("keep_bases", 1)))
    if not bool(cfg.mapreduce.get("keep_step_checkpoints", False)):
        removed += prune_step_checkpoints(run, cycle, list(cfg.rewards))
    if removed:
        log.info("retention after cycle %d: removed %s", cycle, ", ".join(removed))
    return removed


def prune_bases(run: RunDir, cycle: int, keep: int) -> list[str]:
    """Remove complete materialised bases of cycles <= ``cycle`` except the newest ``keep`` (at least 1)."""
    complete = [c for c in run.cycles_present() if c <= cycle and read_marker(run.base_dir(c), BASE_MARKER)]
    removed = []
    for c in complete[: -max(1, keep)]:
        shutil.rmtree(run.base_dir(c))
        removed.append(run.base_dir(c).relative_to(run.root).as_posix())
    return removed


def prune_step_checkpoints(run: RunDir, cycle: int, rewards: list[str]) -> list[str]:
    """Remove the step checkpoints of the DONE experts of a merged ``cycle`` (they are never resumed)."""
    removed = []
    if run.merge_done(cycle) is None:
        return removed
    for reward in rewards:
        expert = run.expert_dir(cycle, reward)
        if run.expert_done(cycle, reward) is None:
            continue
        dirs = sorted(p for p in expert.glob("checkpoint-*") if p.is_dir())
        if not dirs:
            continue
        forget_files(expert, DONE_MARKER, [p.name for p in dirs])
        for p in dirs:
            shutil.rmtree(p)
            removed.append(p.relative_to(run.root).as_posix())
    return removed
