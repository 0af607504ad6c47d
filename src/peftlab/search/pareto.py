"""Pareto fronts and hypervolume of (score, cost) results: score is maximised, cost minimised.

Everything here works on plain ``(score, cost)`` pairs so the same code serves an Optuna study, a
re-training table and a synthetic test problem. The hypervolume is the area dominated by the front and
bounded by a reference point ``(ref_score, ref_cost)`` (a score worse than anything wanted, a cost higher
than anything allowed); points that do not dominate the reference point add nothing.

The cost axis is linear or log10 (``scale``). Costs span orders of magnitude (0.01% to 10% stored), and on a linear
axis up to a far reference cost the single best-scoring point holds most of the area, so the front's cheap end
barely counts; on a log axis every decade of cost weighs the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: how the cost axis is measured for hypervolume (and by the autopeft sampler's acquisition)
COST_SCALES = ("linear", "log")
#: the cost a log axis gives a point that costs nothing (log10 of 0 is not a number): 1e-6 % stored
LOG_FLOOR = 1e-6


def scaled_cost(cost: float, scale: str = "linear") -> float:
    """A cost on the ``scale``'s axis."""
    return math.log10(max(cost, LOG_FLOOR)) if scale == "log" else cost


def pareto_indices(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, by increasing cost (ties in both: the first one only)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][0] > best:
            front.append(i)
            best = points[i][0]
    return front


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Area dominated by ``points`` within the reference point ``ref = (score, cost)``."""
    inside = [p for p in points if p[0] > ref[0] and p[1] < ref[1]]
    front = [inside[i] for i in pareto_indices(inside)]
    area = 0.0
    for k, (score, cost) in enumerate(front):  # by increasing cost and score: slabs up to the next cost
        next_cost = front[k + 1][1] if k + 1 < len(front) else ref[1]
        area += (next_cost - cost) * (score - ref[0])
    return area


def hypervolume_history(
    points: Sequence[Sequence[float] | None], ref: Sequence[float], scale: str = "linear"
) -> list[float]:
    """Hypervolume after each trial (``None`` for a trial without values: failed, pruned), the cost axis (points'
    and reference point's) on ``scale``."""
    axis = (ref[0], scaled_cost(ref[1], scale))
    seen: list[Sequence[float]] = []
    out = []
    for p in points:
        if p is not None:
            seen.append((p[0], scaled_cost(p[1], scale)))
        out.append(hypervolume(seen, axis))
    return out
