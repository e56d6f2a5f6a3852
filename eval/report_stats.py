"""Means with 95% confidence intervals, and paired changes vs the base eval, for the report's tables.

Why prompts are the independent units: an eval draws ``samples`` images per prompt, and images of one prompt
share it (a hard prompt is hard for all its samples), so treating every image as independent would make the
interval too narrow. The interval is the cluster-robust one, with prompts as clusters:

    mean = sum(y) / M                     (M images with a finite score, P prompts among them)
    SE^2 = P / (P - 1) * sum_p (S_p - mean * m_p)^2 / M^2      (S_p, m_p: sum and count of prompt p's images)
    95% CI = mean +- t(0.975, P - 1) * SE

With the same number of images per prompt this is exactly the t-interval over the per-prompt means; with one
sample per prompt it is the usual t-interval over the images. A GenEval tag's accuracy is the same mean over
its images' 0/1 verdicts; the overall score (the mean of the tag accuracies) gets the half-width
sqrt(sum of squared tag half-widths) / tags (tags hold disjoint prompts).

A change vs the base is *paired* when both evals hold the same (prompt, sample) rows with the same seeds
(``eval.plan.sample_seed``: the same noise): the interval is the one above over the per-image differences,
much tighter than comparing two independent intervals. Otherwise it is unpaired, with half-width
sqrt(h_a^2 + h_b^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CI_METHOD = (
    "± is the half-width of a 95% confidence interval, cluster-robust over prompts (prompts are the independent "
    "units: the samples of one prompt share it), with Student's t quantile at prompts − 1 degrees of freedom; "
    "n counts the images with a score. A GenEval tag's ± is the same interval over its images' 0/1 verdicts; the "
    "overall ± combines the tag half-widths (root of the sum of squares, divided by the number of tags). "
    "Δ vs base is paired (per-image differences under identical noise, same interval) when both evals hold the "
    "same prompts and seeds, otherwise unpaired (marked so). ± 0 means every prompt gave the same value: the "
    'interval is then uninformative, not exact. "no CI": fewer than 2 prompts (for an overall: in some tag).'
)


@dataclass(frozen=True)
class MeanCI:
    """A mean over images, the half-width of its 95% CI (None with fewer than 2 prompts) and its counts."""

    mean: float | None
    half: float | None
    n: int
    prompts: int


def mean_ci(values, clusters) -> MeanCI:
    """The cluster-robust 95% CI of the mean of ``values`` (NaN left out), clusters = prompt indices."""
    from scipy import stats

    y = np.asarray(values, dtype=np.float64)
    c = np.asarray(clusters)
    keep = np.isfinite(y)
    y, c = y[keep], c[keep]
    if y.size == 0:
        return MeanCI(None, None, 0, 0)
    mean = float(y.mean())
    ids, inverse = np.unique(c, return_inverse=True)
    p = ids.size
    if p < 2:
        return MeanCI(mean, None, int(y.size), int(p))
    sums = np.bincount(inverse, weights=y, minlength=p)
    counts = np.bincount(inverse, minlength=p)
    se = math.sqrt(p / (p - 1) * float(np.sum((sums - mean * counts) ** 2))) / y.size
    return MeanCI(mean, float(stats.t.ppf(0.975, p - 1) * se), int(y.size), int(p))


def mean_of_means(parts: list[MeanCI]) -> MeanCI:
    """The unweighted mean of independent means (GenEval overall over tags) and its combined half-width."""
    parts = [m for m in parts if m.mean is not None]
    if not parts:
        return MeanCI(None, None, 0, 0)
    mean = float(np.mean([m.mean for m in parts]))
    half = math.sqrt(sum(m.half**2 for m in parts)) / len(parts) if all(m.half is not None for m in parts) else None
    return MeanCI(mean, half, sum(m.n for m in parts), sum(m.prompts for m in parts))


@dataclass(frozen=True)
class Delta:
    """A checkpoint's change vs the base: value, 95% CI half-width, and whether it was computed per image."""

    value: float
    half: float | None
    paired: bool


def rows_key(prompt_index, sample_index) -> np.ndarray:
    """One int per (prompt, sample) row, so two evals' rows can be matched."""
    return np.asarray(prompt_index, np.int64) * (1 << 20) + np.asarray(sample_index, np.int64)


def delta(base: tuple, other: tuple, base_ci: MeanCI, other_ci: MeanCI) -> Delta | None:
    """``other - base``; each of ``base`` / ``other`` is (keys, seeds, prompt indices, values) of its rows."""
    if base_ci.mean is None or other_ci.mean is None:
        return None
    bk, bs, bp, bv = base
    ok, os_, _, ov = other
    if bk.shape == ok.shape and np.array_equal(bk, ok) and np.array_equal(bs, os_):
        ci = mean_ci(np.asarray(ov, np.float64) - np.asarray(bv, np.float64), bp)
        if ci.mean is not None:
            return Delta(ci.mean, ci.half, True)
    half = math.hypot(base_ci.half, other_ci.half) if base_ci.half is not None and other_ci.half is not None else None
    return Delta(other_ci.mean - base_ci.mean, half, False)


def decimals_for(half: float | None) -> int:
    """Decimals that show a half-width with two significant digits (4 without an interval), between 2 and 6."""
    if half is None or half <= 0 or not math.isfinite(half):
        return 4
    return int(min(6, max(2, 1 - math.floor(math.log10(half)))))


def format_ci(ci: MeanCI, with_n: bool = False) -> str:
    """``0.512 ± 0.021`` (``(n=6)`` appended when asked); ``-`` when nothing was scored."""
    if ci.mean is None:
        return "-"
    d = decimals_for(ci.half)
    text = f"{ci.mean:.{d}f} ± {ci.half:.{d}f}" if ci.half is not None else f"{ci.mean:.{d}f} (no CI)"
    return f"{text} (n={ci.n})" if with_n else text


def arrow(value: float, higher_is_better: bool) -> tuple[str, str]:
    """The arrow of a change and whether it is an improvement: ("▲", "better"), ("▼", "worse") or ("=", "same")."""
    if value == 0:
        return "=", "same"
    up = value > 0
    return ("▲" if up else "▼"), ("better" if up == higher_is_better else "worse")


def format_delta(d: Delta | None, higher_is_better: bool) -> str:
    """``▲ +0.013 ± 0.004`` (``unpaired`` appended when not per image); ``-`` without a base."""
    if d is None:
        return "-"
    mark, _ = arrow(d.value, higher_is_better)
    if d.value == 0 and d.paired and (d.half is None or d.half == 0):
        return "= 0 (identical)"
    dec = decimals_for(d.half)
    text = f"{mark} {d.value:+.{dec}f}" + (f" ± {d.half:.{dec}f}" if d.half is not None else "")
    return text + ("" if d.paired else " unpaired")
