"""The contract every PEFT building block follows, and the registry of module kinds.

A *kind* is a settings dataclass (what the spec stores, validated, JSON-friendly) plus the
``nn.Module`` it builds. The module wires itself into the backbone through the hook registry and
knows how to count itself and, where possible, how to merge into the base weights.

Everything particular to a kind lives on its two classes, so the core (``peft_model``, ``saving``,
``counting``, the spaces, training and the bench) names no kind. Adding a kind is one file here, a
``@register``-ed :class:`Settings` subclass and its :class:`PeftModule`, plus its preset(s) and tests.

Required: ``Settings.kind``, ``Settings.roles`` (the site roles it can occupy), ``Settings.build`` and
``PeftModule.attach``. Optional hooks, each with a default that suits most kinds:

On :class:`Settings` (kind-wide):

- ``default_lr``: the learning rate the papers use for the kind; a spec mixing kinds takes the largest.
- ``plan(placed)``: a pass over every placement of the kind in one adapter before anything is built;
  it checks what the placements must agree on and returns what each build needs
  (``BuildContext.plan``), e.g. the longest prefix, which sizes the prefix MLP they share.
- ``stored()``: the settings as the saved adapter records them (prefixes are saved as key/values,
  so they load without their MLP).
- ``added_length()``: the tokens the kind adds to every input (a soft prompt's length).
- ``training_loss``: an extra training objective (:class:`TrainingLoss`) and its default weight,
  e.g. AdaMix's consistency between two randomly routed passes.
- ``after_step(modules, step, total)``: acts once per optimiser step, after the update and before the gradients are
  cleared (the training loop calls it through ``PeftModel.after_step``), with every module of the kind in the active
  adapter, the steps taken so far and the run's total: what a schedule over training needs, e.g. AdaLoRA's rank
  budget, which ranks by importance all matrices of the adapter together.
- ``exclusive``: the kind changes the backbone itself, so it cannot be one of several adapters.
- ``prepare(model, modules, batches)``: choose what the kind chooses from training data before the first step
  (FishMask's Fisher mask, LT-SFT's mask from a short full fine-tuning). The core calls it once per kind of the
  active adapter, with that kind's built modules and ``batches()``, a fresh iterator over training batches (on the
  model's device, in the run's order, without end); training's :class:`~peftlab.train.loop.Run` calls it before the
  first step (:meth:`~peftlab.core.peft_model.PeftModel.prepare`). Without data (a spec applied for counting or
  ``peftlab show``, the matrix tests) nothing calls it, so what it chooses must have a data-free default fixed at
  build (a seeded random mask of the same size), which also keeps the saved adapter's shapes the spec's.
- ``mergeable`` / ``gateable``: whether it folds into base weights / a UniPELT gate can scale it.
- ``packable``: whether examples packed end to end into one row stay apart under it (not for soft prompts and
  prefixes, which every position of a row attends to).

On :class:`PeftModule` (per built module):

- ``model_switches``: model-wide switches the module needs while it is live (e.g. routing attention
  through the prefix-aware function); each is called with ``on=False`` once no live module needs it.
- ``backbone_parameters()``: backbone tensors the module trains in place (full fine-tuning, the
  input embeddings); they become trainable with the adapter.
- ``detached``: the module reads the backbone's activations detached and writes only after its last block (LST's
  side network), so a training step back-propagates through no block for it (the cost model counts none).
- ``own_numel`` / ``stored_numel`` / ``changed_numel``: the survey's three counts.
- ``run_state()`` / ``load_run_state()``: what a training checkpoint keeps of the module beyond its trainable
  tensors, so that a resumed run continues exactly (AdaLoRA's importance statistics and rank mask);
- ``stored_state()`` / ``load_targets()``: what the adapter file holds and where it loads back;
  ``state_prefix`` sets the tensors' key root (default ``layers.<layer>-<site>``).
- ``fold()`` / ``unloadable``: what ``merge_and_unload`` does beyond ``merge`` (a head copy overwrites the
  head, so it unloads though it does not merge).
- ``merge_refusal()``: why this module cannot merge into this particular backbone although its kind merges (a
  quantized base weight); ``merge`` then refuses with that line instead of leaving the module unmerged.
- ``flops_per_token()`` / ``flops_per_step()``: the matmul FLOPs the module adds to a forward pass, per token it acts
  on and once per pass (e.g. a prefix MLP); ``peftlab bench`` predicts a training step's cost from them (the
  backward of matmuls with trained weights costing twice their forward). None (the default): not modelled, so a
  spec using the kind gets no prediction.

Parts several modules of one adapter share (Compacter's rules, the prefix MLP, UniPELT's LoRA gate)
come from :meth:`BuildContext.share`, which records the kind that owns them and whether the saved
adapter keeps them. A shared part may define ``changed_numel()`` where the parameters it changes in the final model
are neither none nor all it stores (a sparse mask stores values and their indices, and changes the values' entries).

A module that needs the batch's padding mask or the KV cache's length (a statistic over the sequence, such as
:class:`Gate`'s mean) asks :meth:`BuildContext.sequence` for its stack's :class:`~peftlab.core.sequence.SequenceView`:
hooks see hidden states only, and the view watches the forward that takes the mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from peftlab.backbone.anatomy import ENCODER_INPUT_SITES, Anatomy, Block, LinearRef
from peftlab.core.hooks import HookRegistry
from peftlab.core.sequence import SequenceView
from peftlab.errors import SpecError

#: a fresh iterator over training batches, without end (what ``Settings.prepare`` reads)
Batches = Callable[[], Iterator[dict[str, torch.Tensor]]]

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

    @classmethod
    def of(cls, config: Any, num_layers: int) -> Dims:
        """Sizes read from any supported config (T5's inner attention width included)."""
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
        return cls(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, num_layers=num_layers)


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
    #: the kind being built (set by the core; parts made through :meth:`share` are counted under it)
    kind: str = ""
    #: what the kind's :meth:`Settings.plan` returned for this adapter
    plan: Any = None
    anatomy: Anatomy | None = None
    blocks: list[Block] = dataclasses.field(default_factory=list)
    #: every (block, site) of a layer where this adapter places the kind being built, so that a part the
    #: placements share can be sized for all of them (VeRA's projections); empty where unknown (costing one site)
    placed: list[tuple[Block, str]] = dataclasses.field(default_factory=list)
    #: reads a saved adapter folder's tensors, checked against the model being adapted (the core's; the modules sit
    #: below the formats and do not read folders themselves): AdapterFusion's components
    read_adapter: Callable[[str], dict[str, torch.Tensor]] | None = None
    #: the core's maker of sequence views (one per adapter and stack), behind :meth:`sequence`
    views: Callable[[Block], SequenceView] | None = None

    def sequence(self) -> SequenceView | None:
        """The padding mask and cached length of the forward at this block's stack, or at the encoder's for a site
        that reads the encoder's output (None outside a block or without a core to watch the stack)."""
        if self.block is None or self.views is None:
            return None
        if self.site in ENCODER_INPUT_SITES:  # cross-attention's keys and values read the encoder's positions
            encoder = next((b for b in self.blocks if b.stack.cross_attention is None), None)
            if encoder is not None:
                return self.views(encoder)
        return self.views(self.block)

    def share(self, key: str, make: Callable[[], nn.Module], stored: bool = True, folds: bool = False) -> nn.Module:
        """The part ``key`` that modules of this adapter share, made on first use. ``stored=False``: the saved
        adapter drops it (and its parameters count as trainable only). Its buffers (frozen tensors) are stored
        but never trained. ``folds=True``: merging its modules leaves no trace of it in the final model (VeRA's
        frozen projections), so it changes no parameter there."""
        if key not in self.shared:
            part = make()
            part.peftlab_kind = self.kind
            part.peftlab_stored = stored
            part.peftlab_folds = folds
            self.shared[key] = part
        return self.shared[key]


class TrainingLoss(Protocol):
    """An extra training objective a kind brings: the batch loss, given the model, the batch, the model's output
    on it and the objective's weight."""

    default_weight: float

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], out: Any, weight: float) -> torch.Tensor: ...


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
    #: the learning rate the papers train the kind with
    default_lr: ClassVar[float] = 1e-3
    #: an extra training objective, or None
    training_loss: ClassVar[TrainingLoss | None] = None
    #: the kind changes the backbone itself: it cannot be one of several adapters
    exclusive: ClassVar[bool] = False
    #: examples packed into one row stay apart under it (``--packing``)
    packable: ClassVar[bool] = True

    def check(self) -> None:
        """Raise SpecError for out-of-range values."""

    def build(self, ctx: BuildContext) -> PeftModule | None:
        """The module for one site, or None where this model has nothing for the kind to act on."""
        raise NotImplementedError

    @classmethod
    def plan(cls, placed: list[Settings]) -> Any:
        """Checks across every placement of the kind in one adapter; returns what each build needs."""
        return None

    @classmethod
    def after_step(cls, modules: list[PeftModule], step: int, total: int) -> None:
        """Once per optimiser step (``step`` from 1 of ``total``), after the update, gradients still in place."""

    def stored(self) -> Settings:
        """These settings as the saved adapter records them."""
        return self

    @classmethod
    def prepare(cls, model: nn.Module, modules: list[PeftModule], batches: Batches) -> None:
        """Choose from training data before the first step (see the module docstring); the default: nothing."""

    def added_length(self) -> int:
        """Tokens the kind adds to every input sequence."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Settings:
        data = dict(data)
        kind = data.pop("kind", None)
        if not isinstance(kind, str) or kind not in KINDS:
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
    #: model-wide switches ``fn(model, on)`` this module needs while live
    model_switches: ClassVar[tuple[Callable[[nn.Module, bool], None], ...]] = ()
    #: the key root of its tensors in the adapter file (None: ``layers.<its key>``)
    state_prefix: ClassVar[str | None] = None
    #: reads the backbone detached and writes only after its last block: no backward through the blocks
    detached: ClassVar[bool] = False

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.adapter_name = ctx.adapter_name
        self.site = ctx.site
        self.kind = ctx.kind

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters this module trains in place (they follow the adapter's trainable switch)."""
        return []

    def fold(self) -> None:
        """What ``merge_and_unload`` does after ``merge`` for this module."""

    def attach(self, ctx: BuildContext) -> None:
        """Register hooks on the host modules."""
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        return False

    @property
    def unloadable(self) -> bool:
        """Whether ``merge_and_unload`` can leave a plain model without this module's hooks (after ``fold``)."""
        return self.mergeable

    def merge_refusal(self) -> str | None:
        """Why this module cannot merge into this backbone although its kind merges (None: nothing stops it)."""
        return None

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

    def flops_per_token(self) -> float | None:
        """Matmul FLOPs (2 per multiply-add) this module adds to the forward pass per token it acts on; 0 for
        elementwise work, which the cost model leaves out like the backbone's; None: not modelled."""
        return None

    def flops_per_step(self) -> float:
        """Matmul FLOPs this module's forward does once per pass, whatever the number of tokens (e.g. the prefix MLP
        producing its key/values, DoRA's weight norm)."""
        return 0.0

    def run_state(self) -> dict[str, torch.Tensor]:
        """What a resumed training run needs of this module beyond its trainable tensors (statistics a schedule
        keeps, e.g. AdaLoRA's smoothed importance); a checkpoint holds it. Default: nothing."""
        return {}

    def load_run_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back :meth:`run_state` from a checkpoint."""

    def stored_state(self) -> dict[str, torch.Tensor]:
        """What ``save`` writes for this module (keys relative to the module)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_targets(self) -> dict[str, torch.Tensor]:
        """Where a saved adapter's tensors load back to (the keys of :meth:`stored_state`)."""
        return self.state_dict()


class Gate(nn.Module):
    """UniPELT gate: sigmoid of a linear map of the module input, averaged over the sequence's real tokens.

    The mean skips padding (the batch's mask, through the stack's :class:`SequenceView`). In a causal stack it is
    a running mean, one gate per position over the real tokens up to it: what a position's gate may depend on in a
    decoder, and what lets a cached decoding step give the gate the whole forward gives there. The output is
    (batch, 1, 1) in an encoder and (batch, positions, 1) in a decoder; both broadcast over the hidden size.
    """

    #: a gated spec (UniPELT) trains at this rate (UniPELT's appendix B)
    default_lr: ClassVar[float] = 5e-4

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype, view: SequenceView | None = None):
        super().__init__()
        self.proj = nn.Linear(features, 1, device=device, dtype=dtype)
        self._view = (view,)  # a tuple: the view is the core's, not a submodule

    def flops_per_token(self) -> float:
        return 2.0 * self.proj.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.proj(x))  # (..., seq, 1)
        if g.dim() <= 2:
            return g
        view = self._view[0]
        if view is None:
            return g.mean(dim=-2, keepdim=True)
        real = view.real(g)
        if not view.causal:
            return (g * real).sum(dim=-2, keepdim=True) / real.sum(dim=-2, keepdim=True).clamp_min(1.0)
        sums, counts = view.carry(id(self), torch.cumsum(g * real, dim=-2), torch.cumsum(real, dim=-2))
        return sums / counts.clamp_min(1.0)
