"""S4 design spaces: grouping, allocation, tuned groups and per-group strategies, refined stage by stage."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from torch import nn

from peftlab.core.spec import Spec
from peftlab.errors import SpecError
from peftlab.space.backbone import Backbone
from peftlab.space.base import Dimension, SearchSpace, depth
from peftlab.space.design import DesignChoice, design_spec
from peftlab.space.parse import json_object
from peftlab.space.patterns import ALLOCATIONS, allocation_weights, feasible_groupings, group_sizes
from peftlab.space.strategies import S4_STRATEGIES, STRATEGIES, Strategy, builtin_strategy, disjoint

STAGE_FIELDS = {"grouping": "groupings", "allocation": "allocations", "tuned": "tuned"}


def _subsets(items: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [c for k in range(1, len(items) + 1) for c in itertools.combinations(items, k)]


def _names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split("+"))
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SpecError(f"{where}: a strategy set is a list of names or 'a+b', got {value!r}")


@dataclass
class DesignSpace(SearchSpace):
    """An S4 design space (see the module docstring). ``groupings`` defaults to the patterns that fit the
    depth, ``tuned`` to every non-empty set of groups, ``assignments`` (per group, the candidate strategy
    sets) to every non-empty set of ``strategies`` whose sites do not collide. Specs need ``backbone``."""

    num_layers: int
    groups: int = 4
    budget: float = 0.005
    groupings: tuple[str, ...] | None = None
    allocations: tuple[str, ...] = ALLOCATIONS
    tuned: tuple[tuple[int, ...], ...] | None = None
    strategies: tuple[Strategy, ...] = tuple(STRATEGIES[n] for n in S4_STRATEGIES)
    assignments: tuple[tuple[tuple[str, ...], ...], ...] | None = None
    backbone: Backbone | None = field(default=None, compare=False, repr=False)
    type: ClassVar[str] = "s4"

    def __post_init__(self) -> None:
        g = self.groups
        if not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= self.num_layers:
            raise SpecError(f"groups must be an integer in 1-{self.num_layers} (the depth), got {g!r}")
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget < 1:
            raise SpecError(f"budget is a fraction of the backbone's parameters in (0, 1), got {self.budget!r}")
        if self.backbone is not None and self.backbone.num_layers != self.num_layers:
            raise SpecError(f"the space is for {self.num_layers} layers but the model has {self.backbone.num_layers}")
        fits = feasible_groupings(self.num_layers, g)
        self.groupings = tuple(fits if self.groupings is None else self.groupings)
        for p in self.groupings:
            group_sizes(self.num_layers, p, g)
        if not self.groupings:
            raise SpecError(f"no grouping pattern fits {self.num_layers} layers in {g} groups")
        self.allocations = tuple(self.allocations)
        for p in self.allocations:
            allocation_weights(self.num_layers, p)
        tuned = _subsets(range(1, g + 1)) if self.tuned is None else list(self.tuned)
        for t in tuned:
            ok = isinstance(t, (list, tuple)) and t and len(set(t)) == len(t)
            if not ok or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= g for k in t):
                raise SpecError(f"a tuned set is a non-empty list of distinct group numbers 1-{g}, got {t!r}")
        self.tuned = tuple(tuple(sorted(t)) for t in tuned)
        self.strategies = tuple(self.strategies)
        by_name = {s.name: s for s in self.strategies}
        if len(by_name) != len(self.strategies):
            raise SpecError("strategy names must be unique")
        if self.backbone is not None:
            for s in self.strategies:
                try:
                    self.backbone.strategy_cost(0, s, s.step if s.size else None)
                except SpecError as e:
                    raise SpecError(f"strategy '{s.name}' cannot go on this model: {e}") from None
        if self.assignments is None:
            fit = [c for c in _subsets([s.name for s in self.strategies]) if disjoint(c, by_name)]
            self.assignments = (tuple(fit),) * g
        if len(self.assignments) != g or not all(self.assignments):
            raise SpecError(f"assignments needs {g} non-empty lists of strategy sets, one per group")
        self.assignments = tuple(tuple(self._ordered(c, "assignments") for c in group) for group in self.assignments)
        for group in self.assignments:
            for c in group:
                if not disjoint(c, by_name):
                    raise SpecError(f"strategies {'+'.join(c)} share a site")

    def _ordered(self, names: Any, where: str) -> tuple[str, ...]:
        """A strategy set in the order of ``strategies`` (so 'lora+adapter' is 'adapter+lora')."""
        order = [s.name for s in self.strategies]
        names = _names(names, where)
        unknown = [n for n in names if n not in order]
        if unknown or not names or len(set(names)) != len(names):
            raise SpecError(
                f"{where}: {'+'.join(names)!r} is not a set of strategies; strategies are: {', '.join(order)}"
            )
        return tuple(sorted(names, key=order.index))

    @classmethod
    def for_model(cls, model: str | nn.Module | Backbone, **kwargs: Any) -> DesignSpace:
        """The S4 space of a model. Without ``strategies``: S4's four, less those the model cannot take
        (BitFit on bias-free Llama and T5)."""
        backbone = Backbone.of(model)
        if "strategies" not in kwargs:
            fits = []
            for name in S4_STRATEGIES:
                try:
                    backbone.strategy_cost(0, STRATEGIES[name], 1 if STRATEGIES[name].size else None)
                except SpecError:
                    continue
                fits.append(STRATEGIES[name])
            kwargs["strategies"] = tuple(fits)
        return cls(num_layers=backbone.num_layers, backbone=backbone, **kwargs)

    def dimensions(self) -> list[Dimension]:
        return [
            Dimension("grouping", "categorical", self.groupings),
            Dimension("allocation", "categorical", self.allocations),
            Dimension("tuned", "categorical", self.tuned),
            *(Dimension(f"strategies_g{k + 1}", "categorical", a) for k, a in enumerate(self.assignments)),
        ]

    def choice(self, vector: Sequence[float]) -> DesignChoice:
        """The design choice at a point."""
        idx = self._indices(vector)
        dims = self.dimensions()
        values = [d.choices[k] for d, k in zip(dims, idx, strict=True)]
        return DesignChoice(values[0], values[1], values[2], tuple(values[3:]))

    def spec(self, choice: DesignChoice) -> Spec:
        """The spec of one design choice, sized to this space's budget on its backbone."""
        if self.backbone is None:
            raise SpecError("this S4 space has no model to size its modules for; load it with a model")
        return design_spec(choice, self.backbone, self.budget, {s.name: s for s in self.strategies})

    def decode(self, vector: Sequence[float]) -> Spec:
        return self.spec(self.choice(vector))

    def encode(self, point: DesignChoice | Mapping[str, Any]) -> list[float]:
        """The point of a design choice or of a configuration {dimension: value}. (Specs are not encoded:
        many choices size to similar specs.)"""
        if isinstance(point, Spec):
            raise SpecError("an S4 space encodes design choices, not specs")
        if isinstance(point, DesignChoice):
            point = {
                "grouping": point.grouping,
                "allocation": point.allocation,
                "tuned": point.tuned,
                **{f"strategies_g{k + 1}": s for k, s in enumerate(point.strategies)},
            }
        config = dict(point)
        for k in range(self.groups):
            name = f"strategies_g{k + 1}"
            if name in config:
                config[name] = self._ordered(config[name], name)
        if isinstance(config.get("tuned"), (list, tuple)):
            config["tuned"] = sorted(config["tuned"])
        return self._encode_config(config)

    def stages(self) -> list[str]:
        """S4's progressive-refinement stages, in order: the dimensions."""
        return [d.name for d in self.dimensions()]

    def candidates(self, stage: str) -> list[DesignSpace]:
        """The sub-spaces a stage chooses between: ``stage`` fixed to each of its values, the rest as is."""
        dims = {d.name: d for d in self.dimensions()}
        if stage not in dims:
            raise SpecError(f"unknown stage '{stage}'; stages are: {', '.join(dims)}")
        out = []
        for value in dims[stage].choices:
            if stage.startswith("strategies_g"):
                k = int(stage.removeprefix("strategies_g")) - 1
                out.append(replace(self, assignments=(*self.assignments[:k], (value,), *self.assignments[k + 1 :])))
            else:
                out.append(replace(self, **{STAGE_FIELDS[stage]: (value,)}))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "num_layers": self.num_layers,
            "groups": self.groups,
            "budget": self.budget,
            "groupings": list(self.groupings),
            "allocations": list(self.allocations),
            "tuned": [list(t) for t in self.tuned],
            "strategies": [s.name if STRATEGIES.get(s.name) == s else s.to_dict() for s in self.strategies],
            "assignments": [["+".join(c) for c in group] for group in self.assignments],
        }

    @classmethod
    def _parse(cls, data: dict[str, Any], model: str | nn.Module | Backbone | None) -> DesignSpace:
        allowed = {
            "type",
            "num_layers",
            "groups",
            "budget",
            "groupings",
            "allocations",
            "tuned",
            "strategies",
            "assignments",
        }
        data = json_object(data, "space", allowed)
        data.pop("type", None)
        backbone = None if model is None else Backbone.of(model)
        data["num_layers"] = depth(data, backbone)
        for key in ("groupings", "allocations", "tuned", "strategies", "assignments"):
            if key in data and not isinstance(data[key], list):
                raise SpecError(f"'{key}' must be a list, got {data[key]!r}")
        if "strategies" in data:
            data["strategies"] = tuple(
                builtin_strategy(s) if isinstance(s, str) else Strategy.from_dict(s, f"strategies[{k}]")
                for k, s in enumerate(data["strategies"])
            )
        if "tuned" in data:
            data["tuned"] = tuple(tuple(t) if isinstance(t, list) else t for t in data["tuned"])
        if "assignments" in data:
            data["assignments"] = tuple(
                tuple(_names(c, f"assignments[{k}]") for c in g) if isinstance(g, list) else g
                for k, g in enumerate(data["assignments"])
            )
        if "strategies" not in data and backbone is not None:
            return cls.for_model(backbone, **{k: v for k, v in data.items() if k != "num_layers"})
        return cls(backbone=backbone, **data)
