"""The space interface: dimensions, points as index vectors, decode / encode / sample, and JSON helpers."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftlab import optional
from peftlab.core.spec import Spec
from peftlab.errors import SpecError
from peftlab.modules import Settings
from peftlab.reading import parse_json, read_text
from peftlab.space.backbone import Backbone


@dataclass(frozen=True)
class Dimension:
    """One coordinate of a space. ``type``: 'bool' (an insertion bit), 'ordinal' (ordered sizes) or
    'categorical'; a point holds the index of its value in ``choices``."""

    name: str
    type: str
    choices: tuple[Any, ...]

    def labels(self) -> list[str]:
        return [_label(c) for c in self.choices]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "choices": [_jsonable(c) for c in self.choices]}


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (tuple, list)):
        return "+".join(_label(v) for v in value)
    return str(value)


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _rng(rng: random.Random | int | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


class SearchSpace:
    """Base of the space kinds: dimensions, size, encode / decode, sampling, JSON."""

    #: the ``type`` a JSON space names the kind by
    type: ClassVar[str]
    #: every kind by its ``type``: a kind registers by subclassing
    types: ClassVar[dict[str, type[SearchSpace]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SearchSpace.types[cls.type] = cls

    def dimensions(self) -> list[Dimension]:
        raise NotImplementedError

    def decode(self, vector: Sequence[float]) -> Spec:
        raise NotImplementedError

    def encode(self, point: Any) -> list[float]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def size(self) -> int:
        """Number of points: the product of the dimensions' cardinalities."""
        return math.prod(len(d.choices) for d in self.dimensions())

    def random_vector(self, rng: random.Random | int | None = None) -> list[float]:
        r = _rng(rng)
        return [float(r.randrange(len(d.choices))) for d in self.dimensions()]

    def sample(self, n: int, rng: random.Random | int | None = None) -> list[Spec]:
        """``n`` specs drawn uniformly per dimension; points that place no module at all are drawn again."""
        r = _rng(rng)
        out: list[Spec] = []
        draws = 0
        while len(out) < n:
            draws += 1
            if draws > 100 * n + 100:
                raise SpecError("this space hardly ever places a module; check its choices")
            spec = self.decode(self.random_vector(r))
            if spec.layers:
                out.append(spec)
        return out

    def _indices(self, vector: Sequence[float]) -> list[int]:
        dims = self.dimensions()
        if len(vector) != len(dims):
            raise SpecError(f"a point of this space has {len(dims)} values, got {len(vector)}")
        out = []
        for v, d in zip(vector, dims, strict=True):
            try:
                k = round(float(v))
            except (TypeError, ValueError, OverflowError):
                raise SpecError(f"{d.name}: {v!r} is not an index") from None
            if not 0 <= k < len(d.choices):
                raise SpecError(f"{d.name}: index {v!r} is outside 0-{len(d.choices) - 1}")
            out.append(k)
        return out

    def _encode_config(self, config: Mapping[str, Any]) -> list[float]:
        dims = self.dimensions()
        names = [d.name for d in dims]
        unknown = sorted(set(config) - set(names))
        missing = [n for n in names if n not in config]
        if unknown or missing:
            raise SpecError(
                f"a configuration names every dimension once; unknown: {', '.join(unknown) or '-'}, "
                f"missing: {', '.join(missing) or '-'}"
            )
        out = []
        for d in dims:
            labels = d.labels()
            value = _label(config[d.name])
            if value not in labels:
                raise SpecError(f"{d.name}: {config[d.name]!r} is not a choice; choices: {', '.join(labels)}")
            out.append(float(labels.index(value)))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, model: str | nn.Module | Backbone | None = None) -> SearchSpace:
        """A space from its JSON object (``type`` 'layers', the default, or 's4'); ``model`` fills in the
        depth (and, for S4, gives the module costs)."""
        if not isinstance(data, dict):
            raise SpecError(f"a space must be a JSON object, got {type(data).__name__}")
        kinds = SearchSpace.types
        kind = data.get("type", "layers")
        if not isinstance(kind, str) or kind not in kinds:
            raise SpecError(f"unknown space type {kind!r}; types are: {', '.join(kinds)}")
        return kinds[kind]._parse(data, model)

    @classmethod
    def _parse(cls, data: dict[str, Any], model: str | nn.Module | Backbone | None) -> SearchSpace:
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str | Path, model: str | nn.Module | Backbone | None = None) -> SearchSpace:
        """A space from a JSON file (YAML for .yaml / .yml when PyYAML is installed)."""
        p = Path(path)
        text = read_text(p, "space file")
        try:
            if p.suffix in (".yaml", ".yml"):
                yaml = optional.require("yaml", f"space file '{p}': reading YAML (or write the space as JSON)")
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    raise SpecError(f"not valid YAML: {' '.join(str(e).split())}") from None
            else:
                data = parse_json(text, "it", SpecError)
            return cls.from_dict(data, model)
        except SpecError as e:
            msg = str(e)
            raise SpecError(msg if msg.startswith("space file") else f"space file '{p}': {msg}") from None


def depth(data: dict[str, Any], backbone: Backbone | None) -> int:
    """``num_layers`` from the file, the model, or both when they agree."""
    n = data.get("num_layers")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise SpecError(f"num_layers must be a positive integer, got {n!r}")
    if backbone is None:
        if n is None:
            raise SpecError("num_layers is missing; give it in the space or give a model")
        return n
    if n is not None and n != backbone.num_layers:
        raise SpecError(f"the space is for {n} layers but the model has {backbone.num_layers}")
    return backbone.num_layers


def describe(sites: Mapping[str, Settings]) -> str:
    return ", ".join(f"{s}={v.kind}" for s, v in sites.items()) or "nothing"
