"""S4's layer grouping and parameter allocation patterns: how L layers split into groups, and how a budget
weighs the layers."""

from __future__ import annotations

import itertools

from peftlab.errors import SpecError

GROUPINGS = ("increasing", "uniform", "decreasing", "spindle", "bottleneck")


ALLOCATIONS = ("increasing", "uniform", "decreasing")


_PATTERN_TEXT = {
    "increasing": "N1 < N2 < ... < NG",
    "uniform": "sizes within one of each other",
    "decreasing": "N1 > N2 > ... > NG",
    "spindle": "N1 < N2 = ... = N(G-1) > NG",
    "bottleneck": "N1 > N2 = ... = N(G-1) < NG",
}


def group_sizes(num_layers: int, pattern: str, groups: int = 4) -> list[int]:
    """Sizes of ``groups`` consecutive layer groups following ``pattern`` (rules in the module docstring)."""
    if pattern not in GROUPINGS:
        raise SpecError(f"unknown grouping pattern '{pattern}'; patterns are: {', '.join(GROUPINGS)}")
    if not isinstance(groups, int) or groups < 1 or num_layers < groups:
        raise SpecError(f"cannot split {num_layers} layers into {groups} non-empty groups")
    if pattern in ("spindle", "bottleneck") and groups < 3:
        raise SpecError(f"grouping '{pattern}' needs at least 3 groups (two ends and a middle), got {groups}")
    sizes = _sizes(num_layers, pattern, groups)
    if sizes is None:
        raise SpecError(
            f"no split of {num_layers} layers into {groups} groups is '{pattern}' ({_PATTERN_TEXT[pattern]}); "
            f"patterns that fit: {', '.join(feasible_groupings(num_layers, groups)) or '(none)'}"
        )
    return sizes


def _sizes(n: int, pattern: str, g: int) -> list[int] | None:
    """The split of ``n`` layers into ``g >= 1`` groups for a pattern, or None where none exists."""
    if g > n or (pattern in ("spindle", "bottleneck") and g < 3):
        return None
    if pattern == "uniform":
        q, r = divmod(n, g)
        return [q + (i >= g - r) for i in range(g)]
    if pattern in ("increasing", "decreasing"):
        a, r = divmod(n - g * (g - 1) // 2, g)
        sizes = [a + i + (i >= g - r) for i in range(g)]
        return None if a < 1 else sizes if pattern == "increasing" else sizes[::-1]
    middle = -(-(n + 2) // g) if pattern == "spindle" else (n - 2) // g
    ends = n - (g - 2) * middle
    return None if middle < 1 or ends < 2 else [ends // 2, *[middle] * (g - 2), ends - ends // 2]


def feasible_groupings(num_layers: int, groups: int = 4) -> list[str]:
    """The grouping patterns some split of ``num_layers`` layers into ``groups`` groups satisfies."""
    return [p for p in GROUPINGS if _sizes(num_layers, p, groups) is not None]


def group_layers(num_layers: int, pattern: str, groups: int = 4) -> list[range]:
    """The layer indices of each group."""
    bounds = [0, *itertools.accumulate(group_sizes(num_layers, pattern, groups))]
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def allocation_weights(num_layers: int, pattern: str) -> list[int]:
    """Relative budget of each layer: increasing i+1, decreasing L-i, uniform 1."""
    if pattern not in ALLOCATIONS:
        raise SpecError(f"unknown allocation pattern '{pattern}'; patterns are: {', '.join(ALLOCATIONS)}")
    if pattern == "uniform":
        return [1] * num_layers
    return [i + 1 if pattern == "increasing" else num_layers - i for i in range(num_layers)]
