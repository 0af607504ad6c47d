"""The contract every PEFT building block follows, and the registry of module kinds.

A *kind* is a settings dataclass (what the spec stores, validated, JSON-friendly) plus the
``nn.Module`` it builds. The module wires itself into the backbone through the hook registry and
knows how to count itself and, where possible, how to merge into the base weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.anatomy import Block, LinearRef
from peftlab.errors import SpecError
from peftlab.hooks import HookRegistry

#: kind name -> settings class
KINDS: dict[str, type[Settings]] = {}


def register(cls: type[Settings]) -> type[Settings]:
    """Class decorator: one registration point per module kind."""
    KINDS[cls.kind] = cls
    return cls


@dataclass
class Dims:
    """Sizes of the backbone that modules need."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    num_layers: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass
class BuildContext:
    """Everything a module needs to build and attach itself at one site."""

    site: str
    adapter_name: str
    dims: Dims
    hooks: HookRegistry
    shared: nn.ModuleDict
    gated: bool
    device: torch.device
    dtype: torch.dtype
    block: Block | None = None
    linear: LinearRef | None = None
    model: nn.Module | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass
class Settings:
    """Base of all module settings: a validated, JSON-serialisable record."""

    kind: ClassVar[str]
    #: the site roles (see anatomy.SITE_ROLES) this kind can occupy
    roles: ClassVar[frozenset[str]]
    #: whether the built module can be folded into base weights
    mergeable: ClassVar[bool] = False
    #: whether a UniPELT gate can scale it
    gateable: ClassVar[bool] = False

    def check(self) -> None:
        """Raise SpecError for out-of-range values."""

    def build(self, ctx: BuildContext) -> PeftModule:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Settings:
        data = dict(data)
        kind = data.pop("kind", None)
        if kind not in KINDS:
            raise SpecError(f"{where}: unknown module kind '{kind}'; known kinds: {', '.join(sorted(KINDS))}")
        settings_cls = KINDS[kind]
        names = {f.name for f in dataclasses.fields(settings_cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(
                f"{where}: '{kind}' has no setting {', '.join(map(repr, unknown))}; "
                f"its settings are: {', '.join(sorted(names)) or '(none)'}"
            )
        try:
            settings = settings_cls(**data)
        except TypeError as e:  # pragma: no cover - dataclass constructor messages are already clear
            raise SpecError(f"{where}: {e}") from None
        settings.check_at(where)
        return settings

    def check_at(self, where: str | None = None) -> None:
        """``check`` with the place (a spec path) and the kind in the message."""
        try:
            self.check()
        except SpecError as e:
            raise SpecError(f"{where + ': ' if where else ''}{self.kind} {e}") from None


def need_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """One-line range check shared by every kind."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise SpecError(f"{name} must be an integer {allowed}, got {value!r}")


def need_float(name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        allowed = bound if high is None else f"{bound} and <= {high}"
        raise SpecError(f"{name} must be a number {allowed}, got {value!r}")


def need_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class PeftModule(nn.Module):
    """A built module: attached to hosts through hooks; counts itself; may merge."""

    merged: bool = False

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.adapter_name = ctx.adapter_name
        self.site = ctx.site

    def attach(self, ctx: BuildContext) -> None:
        """Register hooks on the host modules."""
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        return False

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def own_numel(self) -> int:
        """Trainable parameters owned by this module (shared modules are counted once, elsewhere)."""
        return sum(p.numel() for p in self.parameters())

    def stored_numel(self) -> int:
        """Parameters the saved adapter file holds for this module."""
        return self.own_numel()

    def changed_numel(self) -> int:
        """Parameters of the final model that differ from the backbone (base weights it merges into,
        or the parameters it adds when it cannot merge)."""
        return self.stored_numel()

    def stored_state(self) -> dict[str, torch.Tensor]:
        """What ``save`` writes for this module (keys relative to the module)."""
        return {k: v.detach() for k, v in self.state_dict().items()}


class Gate(nn.Module):
    """UniPELT gate: sigmoid of a linear map of the module input, averaged over the sequence."""

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(features, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.proj(x))  # (..., seq, 1)
        return g.mean(dim=-2, keepdim=True) if g.dim() > 2 else g
