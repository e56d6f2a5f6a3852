"""The same prompt and the same noise across checkpoints: which (prompt, sample) images the report's grid shows.

Why this view: an eval gives image (p, k) the seed ``eval.plan.sample_seed(seed, p, k)`` whatever the checkpoint,
so the base, the experts, the merged cycles and the RaTE mixes all start from identical noise for that image;
side by side, any difference is the model's. The columns are the prompts where the checkpoints differ most
(the largest spread of any reward across checkpoints, in units of that reward's standard deviation over all
images shown, one sample per prompt) plus a fixed random sample of the other prompts (seed ``RANDOM_SEED``, so
the same prompt set gives the same random columns in every report), as a check that the extremes are not the
whole story.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.report_compare import SAME_NOISE
from eval.report_stats import rows_key

RANDOM_SEED = 0


@dataclass(frozen=True)
class GridColumn:
    """One (prompt, sample) image shown for every checkpoint, and why it was chosen."""

    prompt_index: int
    sample_index: int
    prompt: str
    why: str


def same_noise_members(inputs: list, reference) -> tuple[list, list]:
    """(inputs whose images share ``reference``'s noise, the others): same prompt set, seed and resolution, and
    the same per-image seeds on the rows they share."""
    ref_settings = reference.summary.get("settings", {})
    ref_seeds = dict(
        zip(
            rows_key(reference.results.prompt_index, reference.results.sample_index).tolist(),
            reference.results.seed.tolist(),
        )
    )
    members, others = [], []
    for inp in inputs:
        settings = inp.summary.get("settings", {})
        same = all(settings.get(k) == ref_settings.get(k) for k in SAME_NOISE)
        if same:
            keys = rows_key(inp.results.prompt_index, inp.results.sample_index).tolist()
            same = all(ref_seeds.get(k, s) == s for k, s in zip(keys, inp.results.seed.tolist()))
        (members if same else others).append(inp)
    return members, others


def _score_matrix(members: list, keys: list[int], reward: str) -> np.ndarray:
    """(checkpoints, keys) scores of ``reward``, NaN where a checkpoint has no score."""
    out = np.full((len(members), len(keys)), np.nan)
    col = {k: j for j, k in enumerate(keys)}
    for i, inp in enumerate(members):
        res = inp.results
        for key, value in zip(rows_key(res.prompt_index, res.sample_index).tolist(), res.scores[reward].tolist()):
            if key in col:
                out[i, col[key]] = value
    return out


def choose_columns(members: list, rewards: list[str], top: int, random_count: int) -> list[GridColumn]:
    """``top`` prompts where the checkpoints differ most, then ``random_count`` random other prompts."""
    if not members:
        return []
    key_sets = [set(rows_key(i.results.prompt_index, i.results.sample_index).tolist()) for i in members]
    keys = sorted(set.intersection(*key_sets))
    first = members[0].results
    where = {k: j for j, k in enumerate(rows_key(first.prompt_index, first.sample_index).tolist())}
    prompt_of = {
        k: (int(first.prompt_index[where[k]]), int(first.sample_index[where[k]]), first.prompt[where[k]]) for k in keys
    }
    spread = np.zeros(len(keys))
    driver = [""] * len(keys)
    if len(members) >= 2:
        for reward in rewards:
            if not all(reward in i.results.scores for i in members):
                continue
            scores = _score_matrix(members, keys, reward)
            std = float(np.nanstd(scores)) if np.isfinite(scores).any() else 0.0
            if std <= 0:
                continue
            with np.errstate(all="ignore"):
                s = (np.nanmax(scores, axis=0) - np.nanmin(scores, axis=0)) / std
            s = np.nan_to_num(s, nan=0.0)
            for j in np.flatnonzero(s > spread):
                spread[j], driver[j] = s[j], reward
    columns: list[GridColumn] = []
    used: set[int] = set()
    for j in np.argsort(-spread, kind="stable"):
        if len(columns) >= top or spread[j] <= 0:
            break
        p, k, text = prompt_of[keys[j]]
        if p in used:
            continue
        used.add(p)
        columns.append(GridColumn(p, k, text, f"differs most in {driver[j]} (spread {spread[j]:.2g} std)"))
    rng = np.random.default_rng(RANDOM_SEED)
    picked = 0
    for j in rng.permutation(len(keys)):
        if picked >= random_count:
            break
        p, k, text = prompt_of[keys[int(j)]]
        if p in used:
            continue
        used.add(p)
        picked += 1
        columns.append(GridColumn(p, k, text, f"random (fixed seed {RANDOM_SEED})"))
    return columns


def cell_rows(inp, columns: list[GridColumn]) -> list[int]:
    """Row index in ``inp.results`` of each column's image."""
    res = inp.results
    where = {k: j for j, k in enumerate(rows_key(res.prompt_index, res.sample_index).tolist())}
    return [where[int(rows_key(c.prompt_index, c.sample_index))] for c in columns]
