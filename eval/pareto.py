"""Pareto front and hypervolume over checkpoints in reward space (all objectives maximised).

Why: MapReduce LoRA's claim is that merged experts push the whole front outwards instead of trading one reward
for another. The front says which checkpoints are not beaten on every reward at once; the hypervolume (the
volume dominated by the front above a reference point) turns "the front moved out" into one number.

Rewards where lower is better are negated by the caller before they reach these functions.
"""

from __future__ import annotations

from typing import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """True when ``a`` is at least as good as ``b`` everywhere and strictly better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume of the region dominated by ``points`` and dominating ``reference`` (exact, any dimension).

    Recursive slicing on the last objective: cost grows like n^d, fine for the tens of checkpoints a report
    compares. Points not strictly better than the reference in every objective contribute nothing.
    """
    pts = [tuple(float(x) for x in p) for p in points if all(x > r for x, r in zip(p, reference))]
    if not pts:
        return 0.0
    pts = [pts[i] for i in pareto_front(pts)]  # dominated points add no volume; dropping them keeps 80 points fast
    d = len(reference)
    if d == 1:
        return max(p[0] for p in pts) - float(reference[0])
    levels = sorted({p[-1] for p in pts}, reverse=True)
    volume = 0.0
    for k, level in enumerate(levels):
        lower = levels[k + 1] if k + 1 < len(levels) else float(reference[-1])
        slab = [p[:-1] for p in pts if p[-1] >= level]
        volume += hypervolume(slab, reference[:-1]) * (level - lower)
    return volume
