"""Strategies: a module kind placed at some sites of a layer, sized by one setting (S4's adapter, prefix, BitFit,
LoRA and the others)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from peftlab.backbone.anatomy import SITE_ROLES
from peftlab.errors import SpecError
from peftlab.modules import KINDS, Settings
from peftlab.space.parse import json_object


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
        data = json_object(data, where, {"name", "kind", "sites", "size", "settings", "step"})
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


def builtin_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SpecError(
            f"unknown strategy '{name}'; built-in strategies: {', '.join(STRATEGIES)} "
            "(or define one as an object with name, kind, sites, size)"
        )
    return STRATEGIES[name]


def disjoint(names: Sequence[str], by_name: Mapping[str, Strategy]) -> bool:
    sites = [site for n in names if n in by_name for site in by_name[n].sites]
    return len(sites) == len(set(sites))
