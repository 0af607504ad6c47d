"""The spec: a declarative, JSON-serialisable description of which module sits at which site of which layer.

Per-layer settings are keyed by *layer selectors* so that a spec need not know the model's depth:
``"*"`` (every layer), ``"encoder"`` / ``"decoder"`` (every layer of that stack), ``"3"`` (layer 3) and
``"2-5"`` (layers 2 to 5, inclusive). They are resolved in that order, later ones overriding earlier
ones site by site; a site set to ``None`` removes what an earlier selector put there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.atomic import write_text
from peftlab.backbone.anatomy import MODEL_SITE_ROLES, SITE_ROLES
from peftlab.errors import SpecError
from peftlab.modules import KINDS, Settings
from peftlab.modules.base import Gate, TrainingLoss
from peftlab.modules.whole import HeadSettings, whole_model_parts
from peftlab.reading import parse_json, read_text

SPEC_VERSION = 1
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_STACK_SELECTORS = ("encoder", "decoder")

SiteMap = dict[str, Settings | None]


def _selector_rank(key: str) -> int:
    if key == "*":
        return 0
    if key in _STACK_SELECTORS:
        return 1
    return 2 if _RANGE.match(key) else 3


def _check_selector(key: str) -> None:
    if key == "*" or key in _STACK_SELECTORS or key.isdigit() or _RANGE.match(key):
        return
    raise SpecError(
        f"layer selector '{key}' is not valid; use '*', 'encoder', 'decoder', an index like '3' or a range like '2-5'"
    )


def _check_site(site: str, settings: Settings | None, roles: dict[str, str], where: str) -> None:
    if site not in roles:
        raise SpecError(f"{where}: unknown site '{site}'; sites are: {', '.join(roles)}")
    if settings is not None and roles[site] not in settings.roles:
        fits = sorted(s for s, r in roles.items() if r in settings.roles)
        raise SpecError(
            f"{where}: a '{settings.kind}' module cannot sit at site '{site}'; it fits at: {', '.join(fits)}"
        )


@dataclass
class Spec:
    """Which module sits where, plus the global parts (trained head / embeddings, gates, full tuning)."""

    layers: dict[str, SiteMap] = field(default_factory=dict)
    model: dict[str, Settings] = field(default_factory=dict)
    train_head: bool = True
    train_embeddings: bool = False
    full: bool = False
    gates: bool = False
    method: str | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Model-independent validation; :meth:`resolve` adds the checks that need the model."""
        for key, sites in self.layers.items():
            _check_selector(key)
            for site, settings in sites.items():
                _check_site(site, settings, SITE_ROLES, f"layers['{key}']")
        for site, settings in self.model.items():
            _check_site(site, settings, MODEL_SITE_ROLES, "model")
        for name in ("train_head", "train_embeddings", "full", "gates"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {getattr(self, name)!r}")

    # -- resolution against a model -------------------------------------------------------------
    def resolve(self, num_layers: int, stack_of: list[str]) -> dict[int, dict[str, Settings]]:
        """Per-layer site maps for a model with ``num_layers`` blocks; ``stack_of[i]`` names the stack
        ('encoder' / 'decoder' / other) of block i."""
        out: dict[int, dict[str, Settings | None]] = {i: {} for i in range(num_layers)}
        for key in sorted(self.layers, key=_selector_rank):
            for i in self._select(key, num_layers, stack_of):
                out[i].update(self.layers[key])
        return {i: {s: v for s, v in sites.items() if v is not None} for i, sites in out.items()}

    @staticmethod
    def _select(key: str, num_layers: int, stack_of: list[str]) -> list[int]:
        if key == "*":
            return list(range(num_layers))
        if key in _STACK_SELECTORS:
            if key not in stack_of:
                raise SpecError(f"layer selector '{key}': this model has no {key} stack")
            return [i for i, s in enumerate(stack_of) if s == key]
        m = _RANGE.match(key)
        lo, hi = (int(m[1]), int(m[2])) if m else (int(key), int(key))
        if lo > hi or hi >= num_layers:
            raise SpecError(
                f"layer selector '{key}' is beyond the model's depth: it has {num_layers} layers (0-{num_layers - 1})"
            )
        return list(range(lo, hi + 1))

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "peftlab_spec": SPEC_VERSION,
            "method": self.method,
            "layers": {
                k: {s: (v.to_dict() if v is not None else None) for s, v in sites.items()}
                for k, sites in self.layers.items()
            },
            "model": {s: v.to_dict() for s, v in self.model.items()},
            "train_head": self.train_head,
            "train_embeddings": self.train_embeddings,
            "full": self.full,
            "gates": self.gates,
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spec:
        if not isinstance(data, dict):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("peftlab_spec", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise SpecError(f"spec version {version!r} is not supported; this peftlab reads version {SPEC_VERSION}")
        allowed = {"method", "layers", "model", "train_head", "train_embeddings", "full", "gates"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise SpecError(f"unknown spec field(s) {', '.join(unknown)}; fields are: {', '.join(sorted(allowed))}")
        layers_in = data.pop("layers", {}) or {}
        if not isinstance(layers_in, dict):
            raise SpecError("'layers' must be an object mapping layer selectors to site maps")
        layers: dict[str, SiteMap] = {}
        for key, sites in layers_in.items():
            key = str(key)
            if not isinstance(sites, dict):
                raise SpecError(f"layers['{key}'] must be an object mapping sites to module settings")
            layers[key] = {
                site: None
                if v is None
                else Settings.from_dict(_settings(v, f"layers['{key}'].{site}"), f"layers['{key}'].{site}")
                for site, v in sites.items()
            }
        model_in = data.pop("model", {}) or {}
        if not isinstance(model_in, dict):
            raise SpecError(f"'model' must be an object mapping model-level sites to module settings, got {model_in!r}")
        model = {s: Settings.from_dict(_settings(v, f"model.{s}"), f"model.{s}") for s, v in model_in.items()}
        return cls(layers=layers, model=model, **data)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls.from_dict(parse_json(text, "spec", SpecError))

    @classmethod
    def load(cls, path: str | Path) -> Spec:
        p = Path(path)
        text = read_text(p, "spec file", SpecError)
        try:
            return cls.from_json(text)
        except SpecError as e:
            raise SpecError(f"spec file '{p}': {e}") from None

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_json() + "\n")

    def settings(self) -> list[Settings]:
        """Every module settings the spec names, per-layer ones first."""
        found = [v for sites in self.layers.values() for v in sites.values() if v is not None]
        return found + list(self.model.values())

    def kinds(self) -> set[str]:
        """Module kinds this spec uses (for defaults such as learning rates)."""
        return {v.kind for v in self.settings()}

    def parts(self) -> dict[str, Settings]:
        """The whole-model parts its flags ask for (head copy, embeddings, full fine-tuning)."""
        return whole_model_parts(self)

    def stored(self) -> Spec:
        """The spec as a saved adapter records it (each kind's stored form)."""
        layers = {
            key: {site: s.stored() if s is not None else None for site, s in sites.items()}
            for key, sites in self.layers.items()
        }
        model = {site: s.stored() for site, s in self.model.items()}
        return dataclasses.replace(self, layers=layers, model=model)

    def added_length(self) -> int:
        """Tokens its modules add to every input (a soft prompt's length)."""
        return sum(s.added_length() for s in self.model.values())

    def default_lr(self) -> float:
        """The papers' learning rate: full fine-tuning's, a gated spec's (UniPELT), else the largest of its kinds'
        (a spec of the head alone takes the head's)."""
        exclusive = [p for p in self.parts().values() if p.exclusive]
        if exclusive:
            return exclusive[0].default_lr
        if self.gates:
            return Gate.default_lr
        return max((s.default_lr for s in self.settings()), default=HeadSettings.default_lr)

    def training_loss(self) -> TrainingLoss | None:
        """The extra training objective one of its kinds brings, if any. Two kinds with objectives of their own
        (AdaMix's consistency, AdaLoRA's orthogonality, DiffPruning's L0 penalty) are refused: one weight
        (``--consistency``) cannot serve both, and dropping one silently would train another method."""
        found = {s.kind: s.training_loss for s in self.settings() if s.training_loss is not None}
        if len(set(map(id, found.values()))) > 1:
            raise SpecError(
                f"{' and '.join(sorted(found))} each bring their own training objective; a spec can carry one"
            )
        return next(iter(found.values()), None)


def _settings(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: module settings must be an object with a 'kind', got {value!r}")
    kind = value.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise SpecError(f"{where}: unknown module kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    return value
