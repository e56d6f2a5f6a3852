"""The metrics the report tabulates, computed from each eval's per-sample rows with intervals (eval.report_stats).

Why from the rows and not from summary.json: an interval and a paired change need the per-image scores, and
reading them from ``results.h5`` works for every eval ever aggregated. The means equal summary.json's
(``eval.summary``: the same definitions, NaN left out), which a test checks.

Whether higher is better has one home, the reward itself (``rewards.base.Reward.higher_is_better``); each eval
records it per reward in results.h5 and summary.json, and the report reads it from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.report_stats import Delta, MeanCI, delta, mean_ci, mean_of_means, rows_key


@dataclass(frozen=True)
class Metric:
    """One column: a reward's mean score, or a per-image detail's mean (optionally the mean over GenEval tags)."""

    title: str
    reward: str
    higher_is_better: bool
    detail: str | None = None  # None: the reward's score; else a numeric detail column (correct, exact, ...)
    by_tag: bool = False  # the unweighted mean over tags of the per-tag means (GenEval overall)


def metrics_for(inputs: list, rewards: list[str]) -> list[Metric]:
    """Each reward's score, then GenEval overall / strict overall and OCR exact match where an eval has them."""
    out = []
    for r in rewards:
        higher = next(
            (bool(i.summary["rewards"][r].get("higher_is_better", True)) for i in inputs if r in i.summary["rewards"]),
            True,
        )
        out.append(Metric(r, r, higher))
    for r in rewards:
        details = [set(i.results.details.get(r, {})) for i in inputs]
        if any("correct" in d for d in details):
            out.append(Metric(f"{r} overall", r, True, "correct", by_tag=True))
        if any("strict_correct" in d for d in details):
            out.append(Metric(f"{r} strict overall", r, True, "strict_correct", by_tag=True))
        if any("exact" in d for d in details):
            out.append(Metric(f"{r} exact match", r, True, "exact"))
    return out


def _values(inp, m: Metric) -> np.ndarray | None:
    res = inp.results
    if m.reward not in res.scores:
        return None
    if m.detail is None:
        return np.asarray(res.scores[m.reward], np.float64)
    col = res.details.get(m.reward, {}).get(m.detail)
    return None if col is None or col.dtype == object else np.asarray(col, np.float64)


def _parts(inp, m: Metric) -> dict[str, tuple] | None:
    """Tag -> (keys, seeds, prompt indices, values) of its rows; one part "" unless the metric is by tag."""
    values = _values(inp, m)
    if values is None:
        return None
    res = inp.results
    keys = rows_key(res.prompt_index, res.sample_index)
    if not m.by_tag:
        return {"": (keys, res.seed, res.prompt_index, values)}
    tags = np.asarray([t or "(untagged)" for t in res.tag], dtype=object)
    out = {}
    for tag in sorted(set(tags.tolist())):
        mask = tags == tag
        if np.isfinite(values[mask]).any():
            out[tag] = (keys[mask], res.seed[mask], res.prompt_index[mask], values[mask])
    return out


def value(inp, m: Metric) -> MeanCI:
    """The metric of one eval with its interval (mean None when the eval lacks it)."""
    parts = _parts(inp, m)
    if not parts:
        return MeanCI(None, None, 0, 0)
    cis = [mean_ci(v, p) for _, _, p, v in parts.values()]
    return mean_of_means(cis) if m.by_tag else cis[0]


def tag_value(inp, reward: str, tag: str, detail: str = "correct") -> MeanCI:
    """One GenEval tag's accuracy with its interval."""
    parts = _parts(inp, Metric(reward, reward, True, detail, by_tag=True)) or {}
    if tag not in parts:
        return MeanCI(None, None, 0, 0)
    _, _, p, v = parts[tag]
    return mean_ci(v, p)


def change(base, inp, m: Metric) -> Delta | None:
    """``inp - base`` for the metric, paired per image where both hold the same rows and seeds."""
    a, b = _parts(base, m), _parts(inp, m)
    if not a or not b:
        return None
    common = [t for t in a if t in b]
    parts = []
    for t in common:
        parts.append(delta(a[t], b[t], mean_ci(a[t][3], a[t][2]), mean_ci(b[t][3], b[t][2])))
    parts = [d for d in parts if d is not None]
    if not parts:
        return None
    if not m.by_tag:
        return parts[0]
    half = (
        float(np.sqrt(sum(d.half**2 for d in parts))) / len(parts) if all(d.half is not None for d in parts) else None
    )
    return Delta(float(np.mean([d.value for d in parts])), half, all(d.paired for d in parts))
