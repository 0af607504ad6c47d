"""``apply``: the single place that freezes a backbone and attaches the modules a spec describes.

A :class:`PeftModel` wraps a Hugging Face model. The backbone's modules are never replaced; PEFT modules
live in ``adapters[name]`` (so a saved adapter is exactly that sub-tree) and act through hooks. Several
named adapters can be attached; one is active at a time.
"""

from __future__ import annotations

import contextvars
import functools
import re
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.backbone.anatomy import Anatomy, Block, anatomy_for, find_blocks, stack_names
from peftlab.core.counting import Counts, count
from peftlab.core.hooks import HookRegistry
from peftlab.core.sequence import SequenceView
from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError, SpecError
from peftlab.formats import interop
from peftlab.formats import native as saving
from peftlab.formats.keys import module_key
from peftlab.modules import KINDS, BuildContext, Dims, PeftModule, Settings

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
#: how ``save`` writes each format: the files of the folder, each with its writer
_FORMATS: dict[str, Callable[[Any, str], dict[str, Callable[[Path], None]]]] = {
    "peftlab": saving.adapter_files,
    "peft": interop.peft_files,
}


class Adapter(nn.Module):
    """One named adapter: its spec, its modules, modules its layers share, and its task-head copy."""

    def __init__(self, name: str, spec: Spec) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.layers = nn.ModuleDict()  # modules at sites, by module_key
        self.parts = nn.ModuleDict()  # whole-model parts (head copy, embeddings, full), by kind
        self.shared = nn.ModuleDict()

    def peft_modules(self) -> Iterator[tuple[str, PeftModule]]:
        """(key, module) for the modules at sites."""
        yield from self.layers.items()

    def all_modules(self) -> Iterator[tuple[str, PeftModule]]:
        """The modules at sites and the whole-model parts, keyed as counted (``<layer>-<site>``, ``model-<part>``)."""
        yield from self.layers.items()
        for kind, part in self.parts.items():
            yield module_key(None, kind), part

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self.all_modules() for p in m.backbone_parameters()]


class PeftModel(nn.Module):
    """A backbone plus named adapters. Forward, ``generate`` and attribute access go to the backbone."""

    def __init__(self, model: nn.Module, spec: Spec | None, adapter_name: str = "default") -> None:
        """``spec`` None: the wrapper without an adapter yet (what counting attaches adapters to, one at a time)."""
        super().__init__()
        if isinstance(model, PeftModel):
            raise SpecError("this model already has peftlab adapters; use add_adapter() to add another")
        self.base_model = model
        self.anatomy: Anatomy = anatomy_for(model.config.model_type)
        self._blocks = find_blocks(model, self.anatomy)
        self.dims = Dims.of(model.config, len(self._blocks))
        self.hooks = HookRegistry()
        self._views: dict[tuple[str, int], SequenceView] = {}  # by (adapter, id of the stack's root)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._disabled = False
        self._exclusive: str | None = None  # the kind that changed the backbone itself, once one has
        self._switches: dict[Callable[[nn.Module, bool], None], None] = {}  # every model switch seen, in order
        self.fingerprint = saving.fingerprint(model, self.anatomy)
        for p in model.parameters():
            p.requires_grad_(False)
        # Trainer and other tools inspect forward's signature: show the backbone's.
        self.forward = functools.wraps(model.forward)(functools.partial(_call, model))
        self.train(model.training)
        if spec is not None:
            self.add_adapter(adapter_name, spec)
            self.set_adapter(adapter_name)

    # -- plumbing ----------------------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        """A forward patched onto the wrapper (TRL's fused LM head patches the model it is given) goes onto the
        backbone, as it does for a peft model: the wrapper's forward only calls the backbone, whose hooks (prompts,
        adapters) must run before any forward of it, patched or not."""
        if name == "forward" and isinstance(value, types.MethodType) and value.__self__ is self:
            self.base_model.forward = _patched(value.__func__, self.base_model)
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def blocks(self):
        return self._blocks

    def _param(self) -> torch.Tensor:
        """A floating-point backbone parameter: its device and dtype are the modules' (a quantized base also holds
        packed integer weights)."""
        params = list(self.base_model.parameters())
        return next((p for p in params if p.is_floating_point()), params[0])

    # -- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: Spec) -> None:
        """Build the modules ``spec`` describes and attach them (inactive until :meth:`set_adapter`)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise SpecError(f"adapter name {name!r} is not valid: use letters, digits, '_' or '-'")
        if name in self.adapters:
            raise SpecError(f"an adapter named '{name}' already exists; adapters: {', '.join(self.adapters)}")
        exclusive = next((p.kind for p in spec.parts().values() if p.exclusive), None)
        if exclusive and len(self.adapters):
            raise SpecError(f"'{exclusive}' changes the backbone itself and cannot be one of several adapters")
        if self._exclusive:
            raise SpecError(f"this model's backbone is changed by '{self._exclusive}'; it cannot take further adapters")
        spec.check()
        adapter = Adapter(name, spec)
        try:
            self._build(adapter, spec)
            base_ids = {id(p) for p in self.base_model.parameters()}
            if any(id(p) in base_ids for p in adapter.parameters()):  # a module kept a backbone submodule
                raise RuntimeError(f"adapter '{name}' would own backbone parameters; this is a peftlab bug")
            if not any(True for _ in adapter.parameters()) and not adapter.backbone_parameters():
                raise SpecError(
                    f"the spec trains nothing on this model: {type(self.base_model).__name__} has no task head "
                    "and the spec places no module; add modules or use a model class with a task head"
                )
        except Exception:
            self._forget(name)
            raise
        adapter.train(self.base_model.training)  # follow the backbone's mode (dropout, AdaMix routing)
        self.adapters[name] = adapter
        for _, module in adapter.all_modules():
            self._switches.update(dict.fromkeys(module.model_switches))
        self._exclusive = exclusive

    def _forget(self, name: str) -> None:
        """Drop the hooks and sequence views of adapter ``name``."""
        self.hooks.remove_owner_adapter(name)
        self._views = {k: v for k, v in self._views.items() if k[0] != name}

    def _sequence_view(self, adapter_name: str, block: Block) -> SequenceView:
        """The view of ``block``'s stack for one adapter, made (and its watching hook registered) on first use."""
        key = (adapter_name, id(block.root))
        if key not in self._views:
            view = SequenceView(adapter_name, block.root, block.stack.causal)
            self.hooks.add(block.root, "kwargs", view, view.watch)
            self._views[key] = view
        return self._views[key]

    def _context(self, adapter: Adapter, site: str, settings: Settings, plan: Any, **kw: Any) -> BuildContext:
        p = self._param()
        return BuildContext(
            site=site,
            adapter_name=adapter.name,
            dims=self.dims,
            hooks=self.hooks,
            shared=adapter.shared,
            gated=adapter.spec.gates and settings.gateable,
            device=p.device,
            dtype=p.dtype,
            model=self.base_model,
            kind=settings.kind,
            plan=plan,
            anatomy=self.anatomy,
            blocks=self._blocks,
            views=functools.partial(self._sequence_view, adapter.name),
            read_adapter=self._read_component,
            **kw,
        )

    def _read_component(self, folder: str) -> dict[str, torch.Tensor]:
        """A saved peftlab adapter's tensors, refused (one line) when it was trained on another base model."""
        return saving.read_adapter(Path(folder), saving.fingerprint(self.base_model, self.anatomy))[1]

    def _build(self, adapter: Adapter, spec: Spec) -> None:
        per_layer = spec.resolve(len(self._blocks), stack_names(self._blocks))
        placements = [s for sites in per_layer.values() for s in sites.values()] + list(spec.model.values())
        plans = {
            kind: type(group[0]).plan(group)
            for kind in dict.fromkeys(s.kind for s in placements)
            for group in [[s for s in placements if s.kind == kind]]
        }
        of_kind: dict[str, list] = {}
        for i, sites in per_layer.items():
            for site, settings in sites.items():
                if self._blocks[i].has_site(site):
                    of_kind.setdefault(settings.kind, []).append((self._blocks[i], site))
        placed: set[str] = set()
        for i, sites in per_layer.items():
            block = self._blocks[i]
            for site, settings in sites.items():
                if not block.has_site(site):
                    continue  # optional sites (gate projection, cross-attention) exist in some blocks only
                placed.add(site)
                ctx = self._context(
                    adapter,
                    site,
                    settings,
                    plans[settings.kind],
                    block=block,
                    linear=block.linear(site),
                    placed=of_kind[settings.kind],
                )
                self._add_module(adapter.layers, module_key(i, site), settings, ctx, f"layer {i} site '{site}'")
        wanted = {site for sites in per_layer.values() for site in sites}
        if wanted and not placed:
            raise SpecError(
                f"site(s) {', '.join(sorted(wanted))} exist in no layer of this {self.anatomy.family}-family model"
            )
        for site, settings in spec.model.items():
            ctx = self._context(adapter, site, settings, plans[settings.kind])
            self._add_module(adapter.layers, module_key(None, site), settings, ctx, f"model site '{site}'")
        for kind, settings in spec.parts().items():
            ctx = self._context(adapter, kind, settings, None)
            self._add_module(adapter.parts, kind, settings, ctx, kind)

    @staticmethod
    def _add_module(into: nn.ModuleDict, key: str, settings: Settings, ctx: BuildContext, where: str) -> None:
        try:
            module = settings.build(ctx)
        except SpecError as e:
            msg = str(e)
            raise SpecError(msg if msg.startswith(("layer", "model")) else f"{where}: {msg}") from None
        if module is None:
            return  # the model has nothing for this kind here (e.g. Llama has no embedding norm)
        module.attach(ctx)
        into[key] = module

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active (and only trainable) adapter."""
        if name not in self.adapters:
            raise SpecError(f"no adapter named '{name}'; adapters: {', '.join(self.adapters) or '(none)'}")
        if self.active_adapter not in (None, name) and self._is_merged(self.active_adapter):
            raise SpecError(f"adapter '{self.active_adapter}' is merged; call unmerge() before switching adapters")
        self.active_adapter = name
        for other, adapter in self.adapters.items():
            adapter.requires_grad_(other == name)
        for p in self.adapters[name].backbone_parameters():
            p.requires_grad_(True)
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise SpecError(f"no adapter named '{name}'; adapters: {', '.join(self.adapters)}")
        if self._is_merged(name):
            raise SpecError(f"adapter '{name}' is merged; call unmerge() before deleting it")
        self._forget(name)
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.adapters), None)
        self._refresh()

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the bare backbone inside the block (merged weights stay merged)."""
        self._disabled = True
        self._refresh()
        try:
            yield
        finally:
            self._disabled = False
            self._refresh()

    def _active(self) -> set[str]:
        return set() if self._disabled or self.active_adapter is None else {self.active_adapter}

    def _refresh(self) -> None:
        active = self._active()
        self.hooks.refresh(active)
        live = {
            switch
            for name in active
            for _, m in self.adapters[name].all_modules()
            if not m.merged
            for switch in m.model_switches
        }
        for switch in self._switches:
            switch(self.base_model, switch in live)

    def after_step(self, step: int, total: int) -> None:
        """The per-step hook of every kind in the active adapter (``Settings.after_step``): the training loop calls it
        once per optimiser step, ``step`` (from 1) of ``total``, after the update and before gradients are cleared."""
        if self.active_adapter is None:
            return
        spec = self.adapters[self.active_adapter].spec
        kinds = {s.kind: type(s) for s in [*spec.settings(), *spec.parts().values()]}
        by_kind: dict[str, list[PeftModule]] = {}
        for _, m in self._active_modules():
            by_kind.setdefault(m.kind, []).append(m)
        for kind, modules in by_kind.items():
            if kind in kinds:
                kinds[kind].after_step(modules, step, total)

    def prepare(self, batches: Callable[[], Iterator[dict[str, torch.Tensor]]]) -> None:
        """Let each kind of the active adapter choose from training data before the first step (FishMask's Fisher
        mask, LT-SFT's mask): :meth:`Settings.prepare` once per kind, with its modules; ``batches()`` gives a fresh
        iterator over training batches on the model's device. Kinds without the hook ignore it."""
        if self.active_adapter is None:
            return
        by_kind: dict[str, list[PeftModule]] = {}
        for _, module in self.adapters[self.active_adapter].all_modules():
            by_kind.setdefault(module.kind, []).append(module)
        for kind, modules in by_kind.items():
            if kind in KINDS:
                KINDS[kind].prepare(self, modules, batches)

    # -- merging ------------------------------------------------------------------------------------
    def _is_merged(self, name: str) -> bool:
        return any(m.merged for _, m in self.adapters[name].all_modules())

    def _refuse_merge(self) -> None:
        """One line for the first module whose kind merges but not into this backbone (a quantized base)."""
        for key, m in self._active_modules():
            why = m.merge_refusal()
            if why is not None:
                raise PeftlabError(f"module {key}: {why}")

    def merge(self) -> None:
        """Fold every mergeable module of the active adapter into the backbone weights; the rest
        (adapters, prefixes, gated LoRA) keep running through hooks. On a quantized base, refused."""
        self._refuse_merge()
        for _, m in self._active_modules():
            if m.mergeable and not m.merged:
                m.merge()
        self._refresh()

    def unmerge(self) -> None:
        for _, m in self._active_modules():
            if m.merged:
                m.unmerge()
        self._refresh()

    def merge_and_unload(self) -> nn.Module:
        """The backbone with the active adapter merged in and no hooks left: a plain transformers model."""
        self._refuse_merge()
        left = [k for k, m in self._active_modules() if not m.unloadable]
        if left:
            raise SpecError(f"cannot unload: modules {', '.join(left[:5])} cannot be merged into weights")
        self.merge()
        for _, m in self._active_modules():
            m.fold()
        self.hooks.refresh(set())
        model = self.base_model
        for switch in self._switches:
            switch(model, False)
        return model

    def _active_modules(self) -> list[tuple[str, PeftModule]]:
        if self.active_adapter is None:
            return []
        return list(self.adapters[self.active_adapter].all_modules())

    # -- reporting and saving ---------------------------------------------------------------------------
    def counts(self, adapter: str | None = None) -> Counts:
        return count(self, adapter or self.active_adapter)

    def summary(self, adapter: str | None = None) -> str:
        return self.counts(adapter).table()

    def save(
        self, directory: str | Path, format: str = "peftlab", adapter: str | None = None, overwrite: bool = False
    ) -> Path:
        """Save the active (or named) adapter as a folder; ``format="peft"`` writes the peft layout."""
        name = adapter or self.active_adapter
        if format not in _FORMATS:
            raise PeftlabError(f"unknown adapter format '{format}'; formats are: {', '.join(_FORMATS)}")
        if name not in self.adapters:
            raise PeftlabError(f"no adapter named '{name}'; adapters: {', '.join(self.adapters)}")
        return saving.write_folder(Path(directory), _FORMATS[format](self, name), overwrite)


#: set while a forward patched onto a backbone runs (see PeftModel.__setattr__)
_IN_PATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("peftlab_in_patch", default=False)


def _call(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The wrapper's forward: the backbone's, hooks included. Called back from a patched forward (as its "original
    forward"), the hooks have already run: the backbone's own forward then."""
    if _IN_PATCH.get():
        return type(model).forward(model, *args, **kwargs)
    return model(*args, **kwargs)


def _patched(func: Callable[..., Any], model: nn.Module) -> Callable[..., Any]:
    """``func`` (written against the wrapper) as the backbone's forward, marking its run for :func:`_call`."""

    @functools.wraps(type(model).forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        token = _IN_PATCH.set(True)
        try:
            return func(model, *args, **kwargs)
        finally:
            _IN_PATCH.reset(token)

    return forward


def apply(model: nn.Module, spec: Spec, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and attach the modules ``spec`` describes; returns the wrapped model."""
    if not isinstance(spec, Spec):
        raise SpecError(f"apply() needs a peftlab Spec (e.g. peftlab.methods.lora()), got {type(spec).__name__}")
    return PeftModel(model, spec, adapter_name)
