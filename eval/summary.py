"""The numbers a person compares: per-reward means, GenEval's official overall score, OCR's exact-match rate.

Why these definitions: they are the ones the papers report, so our eval can be checked against them.

* GenEval overall = the mean over tags of the per-tag accuracy, where a tag's accuracy is the fraction of its
  images judged ``correct`` (official ``summary_scores.py``); ``strict_overall`` uses ``strict_correct``.
* OCR: the mean reward (1 - normalised edit distance) and the exact-match rate (the target text found verbatim,
  the reward's ``exact`` detail).
* PickScore: the mean score.
Any other reward contributes its mean, std, min and max and the means of its numeric sub-scores.

An eval with a RaTE token mix adds a ``rate`` block: the spec, the token files (path, sha256, token, reward), the
label the report uses (``base + <ocr> 2``) and, when the mix was applied to something other than a base model,
a ``note`` saying so.
"""

from __future__ import annotations

import numpy as np

from eval import rate as rate_mix
from eval.results import Results


def _mean(values) -> float | None:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else None


def geneval_block(tags: list[str], correct: np.ndarray, strict: np.ndarray | None) -> dict:
    """Per-tag accuracy and the mean over tags (images whose verdict is NaN are left out)."""
    per_tag = {}
    for tag in sorted(set(tags)):
        mask = np.array([t == tag for t in tags])
        acc = _mean(correct[mask])
        if acc is None:
            continue
        per_tag[tag or "(untagged)"] = {
            "accuracy": acc,
            "strict_accuracy": _mean(strict[mask]) if strict is not None else None,
            "images": int(mask.sum()),
        }
    overall = float(np.mean([v["accuracy"] for v in per_tag.values()])) if per_tag else None
    stricts = [v["strict_accuracy"] for v in per_tag.values() if v["strict_accuracy"] is not None]
    return {
        "overall": overall,
        "strict_overall": float(np.mean(stricts)) if stricts and len(stricts) == len(per_tag) else None,
        "per_tag": per_tag,
    }


def reward_block(res: Results, reward: str) -> dict:
    scores = np.asarray(res.scores[reward], dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    details = res.details.get(reward, {})
    block = {
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "images": int(scores.size),
        "higher_is_better": bool(res.higher_is_better.get(reward, True)),
        "details": {k: _mean(v) for k, v in sorted(details.items()) if v.dtype != object},
    }
    if "correct" in details:
        block["geneval"] = geneval_block(res.tag, details["correct"], details.get("strict_correct"))
    if "exact" in details:
        block["exact_match_rate"] = _mean(details["exact"])
    return block


def summarize(res: Results) -> dict:
    """The summary JSON of one eval (see the module docstring)."""
    rewards = {r: reward_block(res, r) for r in sorted(res.scores)}
    headline: dict[str, float | None] = {}
    for name, block in rewards.items():
        headline[name] = block["mean"]
        if "geneval" in block:
            headline[f"{name}_overall"] = block["geneval"]["overall"]
        if "exact_match_rate" in block:
            headline[f"{name}_exact_match"] = block["exact_match_rate"]
    out = {
        "checkpoint": res.checkpoint,
        "settings": res.settings,
        "prompts": int(len(set(res.prompt_index.tolist()))),
        "images": len(res),
        "rewards": rewards,
        "headline": headline,
    }
    mix = res.settings.get("rate")
    if mix is not None:
        out["rate"] = {
            **mix,
            "label": rate_mix.label(res.checkpoint.get("label") or "?", mix),
            "note": rate_mix.checkpoint_note(res.checkpoint),
        }
    return out
