"""Pareto fronts and hypervolume of (score, cost) results: score is maximised, cost minimised.

Everything here works on plain ``(score, cost)`` pairs so the same code serves an Optuna study, a
re-training table and a synthetic test problem. The hypervolume is the area dominated by the front and
bounded by a reference point ``(ref_score, ref_cost)`` (a score worse than anything wanted, a cost higher
than anything allowed); points that do not dominate the reference point add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence


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


def hypervolume_history(points: Sequence[Sequence[float] | None], ref: Sequence[float]) -> list[float]:
    """Hypervolume after each trial (``None`` for a trial without values: failed, pruned)."""
    seen: list[Sequence[float]] = []
    out = []
    for p in points:
        if p is not None:
            seen.append(p)
        out.append(hypervolume(seen, ref))
    return out
