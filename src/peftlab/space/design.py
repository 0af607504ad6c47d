"""One S4 design (grouping, allocation, tuned groups, strategies) turned into a spec under a parameter budget."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from peftlab.core.spec import Spec
from peftlab.errors import SpecError
from peftlab.modules import Settings
from peftlab.space.backbone import Backbone
from peftlab.space.patterns import allocation_weights, group_layers
from peftlab.space.strategies import STRATEGIES, Strategy, disjoint


@dataclass(frozen=True)
class DesignChoice:
    """One point of an S4 design space: grouping and allocation patterns, the tuned groups (1-based) and
    each group's strategies (by name; ignored for groups that are not tuned)."""

    grouping: str
    allocation: str
    tuned: tuple[int, ...]
    strategies: tuple[tuple[str, ...], ...]


#: The configuration S4 found on T5-base (Chen et al. 2023): G1 adapter + LoRA, G2 adapter + prefix,
#: G3 adapter + prefix + BitFit, G4 prefix + BitFit + LoRA; spindle groups, uniform allocation, all tuned.
S4_CHOICE = DesignChoice(
    "spindle",
    "uniform",
    (1, 2, 3, 4),
    (
        ("adapter", "lora"),
        ("adapter", "prefix"),
        ("adapter", "prefix", "bitfit"),
        ("prefix", "bitfit", "lora"),
    ),
)


def allocate(
    choice: DesignChoice, backbone: Backbone, budget: float = 0.005, strategies: Mapping[str, Strategy] = STRATEGIES
) -> dict[int, dict[str, Settings]]:
    """Per-layer module settings of a design choice, sized to ``budget`` of the backbone's parameters."""
    groups = group_layers(backbone.num_layers, choice.grouping, len(choice.strategies))
    weights = allocation_weights(backbone.num_layers, choice.allocation)
    if not choice.tuned or not set(choice.tuned) <= set(range(1, len(groups) + 1)):
        raise SpecError(f"tuned groups must be a non-empty set of 1-{len(groups)}, got {list(choice.tuned)}")
    for g in choice.tuned:
        unknown = [n for n in choice.strategies[g - 1] if n not in strategies]
        if unknown:
            raise SpecError(f"unknown strategy {', '.join(unknown)}; strategies are: {', '.join(strategies)}")
        if not disjoint(choice.strategies[g - 1], strategies):
            raise SpecError(f"G{g}: strategies {'+'.join(choice.strategies[g - 1])} share a site")
    plan = [(i, [strategies[n] for n in choice.strategies[g - 1]]) for g in sorted(choice.tuned) for i in groups[g - 1]]
    fixed = sum(backbone.strategy_cost(i, s, None) for i, ss in plan for s in ss if s.size is None)
    sized_budget = budget * backbone.params - fixed
    total_weight = sum(weights[i] for i, ss in plan if any(s.size for s in ss))
    out: dict[int, dict[str, Settings]] = {}
    carry = dict.fromkeys(strategies, 0.0)  # per strategy: budget not yet spent by rounding
    for i, layer_strategies in plan:
        sized = [s for s in layer_strategies if s.size]
        share = sized_budget * weights[i] / total_weight / len(sized) if sized else 0.0
        sites: dict[str, Settings] = {}
        for s in layer_strategies:
            size = None
            if s.size:
                c1 = backbone.strategy_cost(i, s, s.step)
                unit = backbone.strategy_cost(i, s, 2 * s.step) - c1
                target = share + carry[s.name]
                steps = max(1, round((target - c1 + unit) / unit)) if unit > 0 else 1
                size = steps * s.step
                carry[s.name] = target - (c1 + (steps - 1) * unit)
            sites |= dict.fromkeys(s.sites, s.make(size))
        out[i] = sites
    return out


def design_spec(
    choice: DesignChoice, backbone: Backbone, budget: float = 0.005, strategies: Mapping[str, Strategy] = STRATEGIES
) -> Spec:
    """The spec of one design choice on this backbone, with explicit layer selectors ("0-1", "2-5" ...)."""
    return Spec(layers=selectors(allocate(choice, backbone, budget, strategies)))


def selectors(per_layer: Mapping[int, Mapping[str, Settings]]) -> dict[str, dict[str, Settings | None]]:
    """Runs of consecutive layers with the same site map, as range selectors."""
    out: dict[str, dict[str, Settings | None]] = {}
    layers = sorted(i for i, sites in per_layer.items() if sites)
    start = 0
    for k, i in enumerate(layers):
        last = k + 1 == len(layers) or layers[k + 1] != i + 1 or per_layer[layers[k + 1]] != per_layer[i]
        if last:
            lo = layers[start]
            out[str(lo) if lo == i else f"{lo}-{i}"] = dict(per_layer[i])
            start = k + 1
    return out
