"""Layer spaces: an insertion bit per layer and a size per module (AutoPEFT's space)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from peftlab.core.spec import Spec
from peftlab.errors import SpecError
from peftlab.modules import Settings
from peftlab.space.backbone import Backbone
from peftlab.space.base import Dimension, SearchSpace, depth, describe
from peftlab.space.design import selectors
from peftlab.space.parse import json_object
from peftlab.space.strategies import Strategy


def log2_choices(hidden: int) -> tuple[int, ...]:
    """AutoPEFT's binary log scale: 0 (module off) and every power of two up to ``hidden``."""
    return (0, *(2**k for k in range(hidden.bit_length()) if 2**k <= hidden))


@dataclass(frozen=True)
class LayerModule:
    """A module of a layer space: a strategy and its size choices (0: off)."""

    strategy: Strategy
    choices: tuple[int, ...]

    def __post_init__(self) -> None:
        where = f"module '{self.strategy.name}'"
        c = self.choices
        if not c or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in c):
            raise SpecError(f"{where}: choices must be a non-empty list of integers >= 0, got {list(c)!r}")
        if list(c) != sorted(set(c)):
            raise SpecError(f"{where}: choices must be increasing without repeats, got {list(c)}")
        if self.strategy.size is None and not set(c) <= {0, 1}:
            raise SpecError(f"{where}: a '{self.strategy.kind}' module has no size; its choices are 0 (off) and 1 (on)")
        for v in c:
            if v and self.strategy.size:
                self.strategy.make(v)

    @property
    def name(self) -> str:
        return self.strategy.name

    def settings(self, value: int) -> Settings:
        return self.strategy.make(value if self.strategy.size else None)

    def to_dict(self) -> dict[str, Any]:
        return self.strategy.to_dict() | {"choices": list(self.choices)}


@dataclass
class LayerSpace(SearchSpace):
    """AutoPEFT-style space: an insertion bit per searchable layer and a size per module, shared by the
    inserted layers (dimensions ``layer_<i>`` then the module names)."""

    num_layers: int
    modules: tuple[LayerModule, ...]
    layers: tuple[int, ...] | None = None
    type: ClassVar[str] = "layers"

    def __post_init__(self) -> None:
        self.modules = tuple(self.modules)
        if self.layers is None:
            self.layers = tuple(range(self.num_layers))
        self.layers = tuple(self.layers)
        bad = [i for i in self.layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_layers]
        if bad or not self.layers:
            raise SpecError(f"layers must be indices in 0-{self.num_layers - 1}, got {list(self.layers)!r}")
        if len(set(self.layers)) != len(self.layers):
            raise SpecError(f"layers must not repeat, got {list(self.layers)}")
        if not self.modules:
            raise SpecError("a layer space needs at least one module")
        names = [m.name for m in self.modules]
        taken: dict[str, str] = {}
        for m in self.modules:
            if names.count(m.name) > 1:
                raise SpecError(f"module name '{m.name}' is used twice")
            for site in m.strategy.sites:
                if site in taken:
                    raise SpecError(f"modules '{taken[site]}' and '{m.name}' both sit at '{site}'")
                taken[site] = m.name

    @classmethod
    def autopeft(cls, num_layers: int, hidden: int) -> LayerSpace:
        """The AutoPEFT space (Zhou et al. 2024): serial adapter, parallel adapter, prefix; log2 sizes."""
        choices = log2_choices(hidden)
        return cls(
            num_layers=num_layers,
            modules=(
                LayerModule(Strategy("serial", "adapter", ("after_ffn",), "size"), choices),
                LayerModule(Strategy("parallel", "adapter", ("beside_ffn",), "size", {"scaling": 4.0}), choices),
                LayerModule(Strategy("prefix", "prefix", ("attn",), "length"), choices),
            ),
        )

    def dimensions(self) -> list[Dimension]:
        bits = [Dimension(f"layer_{i}", "bool", (0, 1)) for i in self.layers]
        return bits + [Dimension(m.name, "ordinal", m.choices) for m in self.modules]

    def decode(self, vector: Sequence[float]) -> Spec:
        idx = self._indices(vector)
        bits, values = idx[: len(self.layers)], idx[len(self.layers) :]
        on = [i for i, k in zip(self.layers, bits, strict=True) if k]
        sites: dict[str, Settings] = {}
        for m, k in zip(self.modules, values, strict=True):
            if m.choices[k]:
                sites |= dict.fromkeys(m.strategy.sites, m.settings(m.choices[k]))
        return Spec(layers=selectors(dict.fromkeys(on, sites) if sites else {}))

    def encode(self, point: Spec | Mapping[str, Any]) -> list[float]:
        """The point of a spec (one this space can produce) or of a configuration {dimension: value}."""
        if not isinstance(point, Spec):
            return self._encode_config(point)
        stacks = ["layers"] * self.num_layers
        try:
            resolved = point.resolve(self.num_layers, stacks)
        except SpecError as e:
            raise SpecError(f"spec is not in this space: {e}") from None
        on = [i for i, sites in resolved.items() if sites]
        config: dict[str, Any] = {f"layer_{i}": int(i in on) for i in self.layers}
        for m in self.modules:
            found = [resolved[i][s] for i in on for s in m.strategy.sites if s in resolved[i]]
            config[m.name] = 0 if not found else (getattr(found[0], m.strategy.size, None) if m.strategy.size else 1)
        try:
            vector = self._encode_config(config)
        except SpecError as e:
            raise SpecError(f"spec is not in this space: {e}") from None
        back = self.decode(vector)
        near = back.resolve(self.num_layers, stacks)
        mismatch = next((i for i in range(self.num_layers) if near[i] != resolved[i]), None)
        if mismatch is not None:
            raise SpecError(
                f"spec is not in this space: layer {mismatch} holds {describe(resolved[mismatch])}; "
                f"the nearest point holds {describe(near[mismatch])}"
            )
        globals_ = ("model", "train_head", "train_embeddings", "full", "gates")
        if any(getattr(point, g) != getattr(back, g) for g in globals_):
            raise SpecError(
                "spec is not in this space: it sets model-level modules, full tuning, gates, "
                "embeddings or the head, which a layer space does not"
            )
        return vector

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "num_layers": self.num_layers,
            "layers": list(self.layers),
            "modules": [m.to_dict() for m in self.modules],
        }

    @classmethod
    def _parse(cls, data: dict[str, Any], model: str | nn.Module | Backbone | None) -> LayerSpace:
        data = json_object(data, "space", {"type", "num_layers", "layers", "modules"})
        num_layers = depth(data, None if model is None else Backbone.of(model))
        layers = data.get("layers", "all")
        if layers == "all":
            layers = None
        elif not isinstance(layers, list):
            raise SpecError(f'layers must be "all" or a list of layer indices, got {layers!r}')
        modules_in = data.get("modules")
        if not isinstance(modules_in, list) or not modules_in:
            raise SpecError("'modules' must be a non-empty list of modules")
        modules = []
        for k, m in enumerate(modules_in):
            where = f"modules[{k}]"
            m = json_object(m, where, {"name", "kind", "sites", "size", "settings", "step", "choices"})
            if "choices" not in m:
                raise SpecError(f"{where}: missing choices (a list of sizes, 0 for off)")
            choices = m.pop("choices")
            if not isinstance(choices, list):
                raise SpecError(f"{where}: choices must be a list of integers, got {choices!r}")
            modules.append(LayerModule(Strategy.from_dict(m, where), tuple(choices)))
        return cls(num_layers=num_layers, modules=tuple(modules), layers=None if layers is None else tuple(layers))
