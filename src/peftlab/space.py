"""Design spaces (S4) and search spaces (AutoPEFT): generators of specs, as data.

A space is a set of specs with coordinates. Each space lists its :class:`Dimension` s; a point is a vector
holding, per dimension, the *index* of the chosen value in that dimension's choices (an insertion bit is
0/1, a size on a binary log scale is its position on that scale). ``decode(vector)`` turns a point into a
:class:`~peftlab.spec.Spec`, ``encode`` goes back, ``size`` is the number of points (the product of the
dimensions' cardinalities, the way AutoPEFT counts its space, so points that build the same model are
counted separately). Spaces are JSON (YAML when PyYAML is installed) and two kinds exist:

**Layer spaces** (``type: "layers"``; the built-in ``autopeft``, Zhou et al. 2024). An insertion bit per
searchable layer, and per module a size choice shared by every inserted layer; size 0 turns the module off.
``autopeft`` is the paper's space: a serial adapter after the FFN, a parallel adapter beside it (scaled by
4, as AdapterHub's) and prefix tuning, each sized on ``{0} ∪ {2^k ≤ hidden}`` (0, 1, 2, ..., 512 on
BERT-base: 11 values, 2^12·11^3 = 5,451,776 configurations, the paper's count). A user file names the
modules (kind, sites, the setting the size sets, its choices, fixed settings) and the layers::

    {"type": "layers", "num_layers": 12, "layers": [4, 5, 6, 7, 8, 9, 10, 11],
     "modules": [{"name": "lora", "kind": "lora", "sites": ["q", "v"], "size": "r", "choices": [0, 4, 8, 16]},
                 {"name": "bitfit", "kind": "bitfit", "sites": ["bias"], "choices": [0, 1]}]}

A module without ``size`` (BitFit, LN, (IA)3) is switched by choices ``[0, 1]``. ``num_layers`` may be left
out when a model is given; ``layers`` defaults to every layer.

**S4 design spaces** (``type: "s4"``; the built-in ``s4``, Chen et al. 2023) have four components:

- *layer grouping*: the L blocks (numbered as in specs: T5's encoder, then its decoder) split into G
  consecutive groups (default 4) of sizes N1..NG, by :func:`group_sizes`:

  - ``uniform``: N = L // G each, the L mod G extra layers one each to the last groups (equal when G | L);
  - ``increasing`` (N1 < N2 < ... < NG): the gentlest such split, a + i for group i (a = (L - G(G-1)/2) // G),
    the remainder one each to the last groups; needs L >= G(G+1)/2 (10 for G = 4). ``decreasing``: reversed;
  - ``spindle`` (N1 < N2 = ... = N(G-1) > NG): middle groups of M = ceil((L+2)/G), the smallest M whose ends
    fit below it, and the rest E = L - (G-2)M split over the ends as E//2 and E - E//2 (L = 12: 2,4,4,2;
    L = 24: 5,7,7,5);
  - ``bottleneck`` (N1 > N2 = ... = N(G-1) < NG): middle groups of M = (L-2) // G, the largest M whose ends
    fit above it, ends as for spindle (L = 12: 4,2,2,4).

  A pattern that no split of L satisfies (spindle at L = 7, increasing at L < 10) raises a ``SpecError``
  naming the patterns that do fit; spindle and bottleneck need G >= 3.
- *parameter allocation* under a trainable budget (a fraction of the backbone's parameters, default
  0.5%). Fixed-size modules (BitFit, LN, (IA)3) cost what they cost; the rest of the budget goes to the
  layers of the tuned groups by weight (``increasing``: layer i weighs i+1, ``decreasing``: L-i,
  ``uniform``: 1), and within a layer equally to its sized modules. A size comes from the module's exact
  cost at that layer, measured by building it on the meta device (cost = a·size + c): adapter bottleneck,
  LoRA rank, prefix length. Rounding is error-diffused along the layers, per strategy (so sizes within a
  uniform group differ by at most one), and the total lands within half a size unit per strategy of the
  budget (a few thousand parameters on BERT-base: under 1% of a 0.5% budget). Where even size 1
  exceeds a module's share (tiny models), it gets size 1 and the budget is exceeded. Shared parameters
  (Compacter's rules, a reparameterised prefix's shared MLP input) are outside the allocation; S4's prefix
  strategy stores key/values directly (``reparam=False``): the MLP alone costs 2·kv·hidden per layer,
  more than a 0.5% budget holds.
- *tuned groups*: which groups get modules (a non-empty set of group numbers, 1-based as G1..G4);
- *strategy assignment*: per group a set of strategies (:data:`STRATEGIES`: ``adapter`` = serial
  adapter after the FFN, ``prefix``, ``bitfit``, ``lora`` on q and v, and ``parallel``, ``ln``, ``ia3``;
  any other kind as a :class:`Strategy`), sets whose strategies share a site excluded.

Progressive refinement (the search itself comes later): S4's stages are the dimensions, in the order of
:meth:`DesignSpace.stages` (grouping, allocation, tuned, then the strategies of G1, G2, ...). A stage's
candidates (:meth:`DesignSpace.candidates`) are the sub-spaces that fix that dimension to each of its
values, every other dimension left as it is (random when sampled). The greedy step samples on the order of
100 specs from each candidate, trains them briefly, and keeps the best candidate as the next space.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.anatomy import SITE_ROLES, anatomy_for, find_blocks, find_head
from peftlab.errors import PeftlabError, SpecError
from peftlab.hooks import HookRegistry
from peftlab.modules import KINDS, BuildContext, Dims, Settings
from peftlab.peft_model import PeftModel, apply
from peftlab.spec import Spec

GROUPINGS = ("increasing", "uniform", "decreasing", "spindle", "bottleneck")
ALLOCATIONS = ("increasing", "uniform", "decreasing")
_PATTERN_TEXT = {
    "increasing": "N1 < N2 < ... < NG",
    "uniform": "sizes within one of each other",
    "decreasing": "N1 > N2 > ... > NG",
    "spindle": "N1 < N2 = ... = N(G-1) > NG",
    "bottleneck": "N1 > N2 = ... = N(G-1) < NG",
}


# -- S4 components ---------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Strategy:
    """A module kind placed at some sites of a layer; ``size`` names the setting a budget or a size choice
    sets (None: a fixed-size module), ``settings`` fixes the others, sizes are multiples of ``step``."""

    name: str
    kind: str
    sites: tuple[str, ...]
    size: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    step: int = 1

    def __post_init__(self) -> None:
        where = f"strategy '{self.name}'"
        if not isinstance(self.name, str) or not self.name or "+" in self.name:
            raise SpecError(f"strategy name {self.name!r} must be a non-empty string without '+'")
        if self.kind not in KINDS:
            raise SpecError(f"{where}: unknown module kind {self.kind!r}; known kinds: {', '.join(sorted(KINDS))}")
        cls = KINDS[self.kind]
        if not self.sites or isinstance(self.sites, str):
            raise SpecError(f"{where}: 'sites' must be a non-empty list of site names")
        for site in self.sites:
            if site not in SITE_ROLES:
                raise SpecError(f"{where}: unknown site '{site}'; sites are: {', '.join(SITE_ROLES)}")
            if SITE_ROLES[site] not in cls.roles:
                fits = sorted(s for s, r in SITE_ROLES.items() if r in cls.roles)
                raise SpecError(
                    f"{where}: a '{self.kind}' module cannot sit at '{site}'; it fits at: {', '.join(fits)}"
                )
        ints = [f.name for f in fields(cls) if f.type in ("int", int)]
        if self.size is not None and self.size not in ints:
            raise SpecError(
                f"{where}: '{self.kind}' has no integer setting '{self.size}'; it has: {', '.join(ints) or '(none)'}"
            )
        if not isinstance(self.settings, dict) or "kind" in self.settings:
            raise SpecError(f"{where}: 'settings' must be an object of the kind's settings (without 'kind')")
        if not isinstance(self.step, int) or self.step < 1:
            raise SpecError(f"{where}: step must be an integer >= 1, got {self.step!r}")
        self.make(self.step if self.size else None)  # the fixed settings are valid

    def make(self, size: int | None) -> Settings:
        """The module settings at this size."""
        data = {"kind": self.kind, **self.settings, **({self.size: size} if self.size else {})}
        return Settings.from_dict(data, f"strategy '{self.name}'")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "kind": self.kind,
            "sites": list(self.sites),
            "size": self.size,
            "settings": dict(self.settings),
        }
        return out | ({"step": self.step} if self.step != 1 else {})

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Strategy:
        data = _object(data, where, {"name", "kind", "sites", "size", "settings", "step"})
        missing = [k for k in ("name", "kind", "sites") if k not in data]
        if missing:
            raise SpecError(f"{where}: missing {', '.join(missing)}")
        sites = data.pop("sites")
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise SpecError(f"{where}: 'sites' must be a list of site names")
        return cls(sites=tuple(sites), **data)


#: Built-in strategies. S4's four are adapter (serial, after the FFN), prefix, bitfit and lora (q and v).
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("adapter", "adapter", ("after_ffn",), "size"),
        Strategy("prefix", "prefix", ("attn",), "length", {"reparam": False}),
        Strategy("bitfit", "bitfit", ("bias",)),
        Strategy("lora", "lora", ("q", "v"), "r"),
        Strategy("parallel", "adapter", ("beside_ffn",), "size", {"scaling": 4.0}),
        Strategy("ln", "ln", ("norm",)),
        Strategy("ia3", "ia3", ("k", "v", "ffn_out")),
    )
}
S4_STRATEGIES = ("adapter", "prefix", "bitfit", "lora")


class Backbone:
    """What a space (and a search) needs from a model: its depth, its size, and the exact cost of any module at
    any layer (built on the meta device and counted, never attached) and of any spec (attached to the meta model,
    counted, removed). The one owner of costs: the spaces size their points with it, the search counts its trials."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        anatomy = anatomy_for(model.config.model_type)
        self.blocks = find_blocks(model, anatomy)
        self.dims = Dims.of(model.config, len(self.blocks))
        head = find_head(model, anatomy)
        head_ids = {id(p) for p in head[1].parameters()} if head else set()
        self.params = sum(p.numel() for p in model.parameters() if id(p) not in head_ids)
        self._costs: dict[tuple[str, str, str], int] = {}
        self._percents: dict[str, dict[str, float]] = {}

    @classmethod
    def of(cls, model: str | nn.Module | Backbone) -> Backbone:
        """A model name (built on the meta device), a model, or a Backbone."""
        if isinstance(model, Backbone):
            return model
        if isinstance(model, str):
            from peftlab.zoo import load_model

            model = load_model(model, meta=True)
        return cls(model)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden(self) -> int:
        return self.dims.hidden

    def cost(self, layer: int, site: str, settings: Settings) -> int:
        """Trainable parameters of ``settings`` at one site of one layer (0 where the block lacks the site)."""
        block = self.blocks[layer]
        if not block.has_site(site):
            return 0
        key = (block.stack.path, site, json.dumps(settings.to_dict(), sort_keys=True))
        if key not in self._costs:
            ctx = BuildContext(
                site=site,
                adapter_name="cost",
                dims=self.dims,
                hooks=HookRegistry(),
                shared=nn.ModuleDict(),
                gated=False,
                device=torch.device("meta"),
                dtype=torch.float32,
                block=block,
                linear=block.linear(site),
                model=self.model,
                kind=settings.kind,
                plan=type(settings).plan([settings]),
            )
            self._costs[key] = settings.build(ctx).own_numel()
        return self._costs[key]

    def strategy_cost(self, layer: int, strategy: Strategy, size: int | None) -> int:
        settings = strategy.make(size)
        return sum(self.cost(layer, site, settings) for site in strategy.sites)

    @functools.cached_property
    def _peft(self) -> PeftModel:
        return apply(self.model, Spec())

    def percents(self, spec: Spec) -> dict[str, float]:
        """``{"trainable": %, "stored": %}`` of a whole spec (head included) as % of the backbone's parameters."""
        key = spec.to_json()
        if key not in self._percents:
            name = f"cost{len(self._percents)}"
            self._peft.add_adapter(name, spec)
            try:
                counts = self._peft.counts(name)
            finally:
                self._peft.delete_adapter(name)
            total = counts.backbone_params
            self._percents[key] = {
                "trainable": 100 * counts.total.trainable / total,
                "stored": 100 * counts.total.stored / total,
            }
        return self._percents[key]

    def stored(self, spec: Spec) -> float:
        return self.percents(spec)["stored"]


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
        if not _disjoint(choice.strategies[g - 1], strategies):
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
    return Spec(layers=_selectors(allocate(choice, backbone, budget, strategies)))


def _selectors(per_layer: Mapping[int, Mapping[str, Settings]]) -> dict[str, dict[str, Settings | None]]:
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


# -- spaces ------------------------------------------------------------------------------------------------
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

    type: ClassVar[str]

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
        kinds: dict[str, type[SearchSpace]] = {"layers": LayerSpace, "s4": DesignSpace}
        kind = data.get("type", "layers")
        if kind not in kinds:
            raise SpecError(f"unknown space type {kind!r}; types are: {', '.join(kinds)}")
        return kinds[kind]._parse(data, model)

    @classmethod
    def _parse(cls, data: dict[str, Any], model: str | nn.Module | Backbone | None) -> SearchSpace:
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str | Path, model: str | nn.Module | Backbone | None = None) -> SearchSpace:
        """A space from a JSON file (YAML for .yaml / .yml when PyYAML is installed)."""
        p = Path(path)
        if not p.is_file():
            raise PeftlabError(f"space file '{p}' does not exist")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                try:
                    import yaml
                except ImportError:
                    raise PeftlabError(
                        f"space file '{p}': reading YAML needs PyYAML (pip install pyyaml); or write the space as JSON"
                    ) from None
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    raise SpecError(f"not valid YAML: {' '.join(str(e).split())}") from None
            else:
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:
                    raise SpecError(f"not valid JSON: {e}") from None
            return cls.from_dict(data, model)
        except SpecError as e:
            msg = str(e)
            raise SpecError(msg if msg.startswith("space file") else f"space file '{p}': {msg}") from None


def _object(data: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be an object, got {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; fields are: {', '.join(sorted(allowed))}")
    return dict(data)


def _depth(data: dict[str, Any], backbone: Backbone | None) -> int:
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
        return Spec(layers=_selectors(dict.fromkeys(on, sites) if sites else {}))

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
                f"spec is not in this space: layer {mismatch} holds {_describe(resolved[mismatch])}; "
                f"the nearest point holds {_describe(near[mismatch])}"
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
        data = _object(data, "space", {"type", "num_layers", "layers", "modules"})
        num_layers = _depth(data, None if model is None else Backbone.of(model))
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
            m = _object(m, where, {"name", "kind", "sites", "size", "settings", "step", "choices"})
            if "choices" not in m:
                raise SpecError(f"{where}: missing choices (a list of sizes, 0 for off)")
            choices = m.pop("choices")
            if not isinstance(choices, list):
                raise SpecError(f"{where}: choices must be a list of integers, got {choices!r}")
            modules.append(LayerModule(Strategy.from_dict(m, where), tuple(choices)))
        return cls(num_layers=num_layers, modules=tuple(modules), layers=None if layers is None else tuple(layers))


def _describe(sites: Mapping[str, Settings]) -> str:
    return ", ".join(f"{s}={v.kind}" for s, v in sites.items()) or "nothing"


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
            fit = [c for c in _subsets([s.name for s in self.strategies]) if _disjoint(c, by_name)]
            self.assignments = (tuple(fit),) * g
        if len(self.assignments) != g or not all(self.assignments):
            raise SpecError(f"assignments needs {g} non-empty lists of strategy sets, one per group")
        self.assignments = tuple(tuple(self._ordered(c, "assignments") for c in group) for group in self.assignments)
        for group in self.assignments:
            for c in group:
                if not _disjoint(c, by_name):
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
                out.append(replace(self, **{_STAGE_FIELDS[stage]: (value,)}))
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
        data = _object(data, "space", allowed)
        data.pop("type", None)
        backbone = None if model is None else Backbone.of(model)
        data["num_layers"] = _depth(data, backbone)
        for key in ("groupings", "allocations", "tuned", "strategies", "assignments"):
            if key in data and not isinstance(data[key], list):
                raise SpecError(f"'{key}' must be a list, got {data[key]!r}")
        if "strategies" in data:
            data["strategies"] = tuple(
                _builtin_strategy(s) if isinstance(s, str) else Strategy.from_dict(s, f"strategies[{k}]")
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


_STAGE_FIELDS = {"grouping": "groupings", "allocation": "allocations", "tuned": "tuned"}


def _builtin_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SpecError(
            f"unknown strategy '{name}'; built-in strategies: {', '.join(STRATEGIES)} "
            "(or define one as an object with name, kind, sites, size)"
        )
    return STRATEGIES[name]


def _disjoint(names: Sequence[str], by_name: Mapping[str, Strategy]) -> bool:
    sites = [site for n in names if n in by_name for site in by_name[n].sites]
    return len(sites) == len(set(sites))


#: Built-in spaces by name; both depend on the model (its depth and hidden size, its module costs).
BUILTIN_SPACES = ("autopeft", "s4")


def load_space(name_or_path: str | Path, model: str | nn.Module | Backbone | None = None) -> SearchSpace:
    """A built-in space (``autopeft``, ``s4``) for a model, or a space file."""
    name = str(name_or_path)
    if name in BUILTIN_SPACES:
        if model is None:
            raise PeftlabError(f"the built-in space '{name}' depends on the model; give a model")
        backbone = Backbone.of(model)
        if name == "autopeft":
            return LayerSpace.autopeft(backbone.num_layers, backbone.hidden)
        return DesignSpace.for_model(backbone)
    path = Path(name_or_path)
    if not path.is_file():
        raise PeftlabError(
            f"no space '{name_or_path}': built-in spaces are {', '.join(BUILTIN_SPACES)}, "
            "else give a JSON (or YAML) file"
        )
    return SearchSpace.from_file(path, model)
