"""Generate, save and score one shard of an eval; the shard's ``DONE.json`` is written last.

Why per-shard files: array tasks must never write the same file with different content. Images go to their
own paths in the shared GenEval layout (written atomically), the per-sample rows go to the shard's own
``results.h5``, and the marker makes the shard count as finished, so a rerun skips it and a killed task's
leftovers are wiped before the shard is redone.

With a RaTE token mix (``settings.rate``) only the pipeline's prompts carry the tokens; the rewards, the
``metadata.jsonl`` files and the HDF5 rows get the original prompts (eval.rate).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from eval.model import generate
from eval.plan import EvalDir, Shard, plan_batches, shard_batches
from eval.prompts import EvalPrompt
from eval.rate import mixed_prompts
from eval.results import Results, details_columns, write_results
from eval.settings import EvalSettings
from mrlora.runstore import DONE_MARKER, atomic_file, atomic_write_text, reset_incomplete_dir, write_marker

log = logging.getLogger(__name__)


def save_png(image: Any, path) -> None:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def run_shard(
    out: EvalDir, shard: Shard, settings: EvalSettings, prompts: list[EvalPrompt], pipe: Any, rewards: dict[str, Any]
) -> dict:
    """Compute ``shard`` and return its marker. ``rewards`` are built Reward objects keyed by name.

    With ``settings.rate`` the mix's tokens must already be installed in ``pipe`` (``eval.rate.install_mix``).
    """
    shard_dir = reset_incomplete_dir(out.shard_dir(shard), DONE_MARKER)
    batches = shard_batches(plan_batches(len(prompts), settings.samples, settings.batch_size, settings.seed), shard)
    total = sum(len(b) for b in batches)
    log.info("shard %s: %d images in %d batches", shard, total, len(batches))
    cols: dict[str, list] = {
        k: [] for k in ("prompt_index", "sample_index", "seed", "prompt", "tag", "metadata", "image")
    }
    scores: dict[str, list[np.ndarray]] = {r: [] for r in rewards}
    details: dict[str, list[dict[str, np.ndarray]]] = {r: [] for r in rewards}
    written_metadata: set[int] = set()
    done, t0 = 0, time.monotonic()
    for batch in batches:
        texts = [prompts[w.prompt_index].prompt for w in batch]
        metas = [prompts[w.prompt_index].metadata for w in batch]
        generated = mixed_prompts(pipe, settings.rate["spec"], texts) if settings.rate is not None else texts
        images = generate(
            pipe,
            generated,
            [w.seed for w in batch],
            settings.steps,
            settings.guidance_scale,
            settings.resolution,
            settings.max_sequence_length,
        )
        for w, image in zip(batch, images):
            save_png(image, out.image_path(w.prompt_index, w.sample_index))
            item = prompts[w.prompt_index]
            line = item.metadata_line()
            if w.prompt_index not in written_metadata:
                atomic_write_text(out.prompt_dir(w.prompt_index) / "metadata.jsonl", line + "\n")
                written_metadata.add(w.prompt_index)
            cols["prompt_index"].append(w.prompt_index)
            cols["sample_index"].append(w.sample_index)
            cols["seed"].append(w.seed)
            cols["prompt"].append(item.prompt)
            cols["tag"].append(item.tag)
            cols["metadata"].append(line)
            cols["image"].append(out.image_relpath(w.prompt_index, w.sample_index))
        for name, reward in rewards.items():
            result = reward(images, texts, metas)
            scores[name].append(result.scores)
            details[name].append(details_columns(result.details))
        done += len(batch)
        log.info("shard %s: %d/%d images (%.1f s)", shard, done, total, time.monotonic() - t0)

    res = Results(
        np.asarray(cols["prompt_index"], np.int64),
        np.asarray(cols["sample_index"], np.int64),
        np.asarray(cols["seed"], np.int64),
        cols["prompt"],
        cols["tag"],
        cols["metadata"],
        cols["image"],
        {r: np.concatenate(v).astype(np.float32) if v else np.zeros(0, np.float32) for r, v in scores.items()},
        {r: _stack_details(v) for r, v in details.items()},
        {r: bool(getattr(reward, "higher_is_better", True)) for r, reward in rewards.items()},
        settings.to_dict(),
        settings.checkpoint,
    )
    write_results(shard_dir / "results.h5", res)
    return write_marker(
        shard_dir, DONE_MARKER, extra={"shard": str(shard), "images": total, "settings": settings.to_dict()}
    )


def _stack_details(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ValueError(f"a reward returned different detail keys across batches: {sorted(keys)} vs {sorted(p)}")
    return {k: np.concatenate([p[k] for p in parts]) for k in sorted(keys)}
