"""``apply``: the single place that freezes a backbone and attaches the modules a spec describes.

A :class:`PeftModel` wraps a Hugging Face model. The backbone's modules are never replaced; PEFT modules
live in ``adapters[name]`` (so a saved adapter is exactly that sub-tree) and act through hooks. Several
named adapters can be attached; one is active at a time.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.anatomy import Anatomy, anatomy_for, find_blocks, find_head, find_suffix
from peftlab.errors import SpecError
from peftlab.hooks import HookRegistry
from peftlab.modules import BuildContext, Dims, PeftModule
from peftlab.modules.prefix import PrefixSettings, use_prefix_attention
from peftlab.spec import Spec

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def model_dims(config: Any, num_layers: int) -> Dims:
    """Sizes a module needs, read from any supported config (T5's inner attention width included)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return Dims(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, num_layers=num_layers)


def stack_name(path: str) -> str:
    return path.split(".")[0] if path.split(".")[0] in ("encoder", "decoder") else "layers"


def module_key(layer: int | None, site: str) -> str:
    """Key of a module in ``adapters[name].layers`` (ModuleDict keys cannot hold dots)."""
    return f"model-{site}" if layer is None else f"{layer}-{site}"


class Adapter(nn.Module):
    """One named adapter: its spec, its modules, modules its layers share, and its task-head copy."""

    def __init__(self, name: str, spec: Spec) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self.layers = nn.ModuleDict()
        self.shared = nn.ModuleDict()
        self.head: nn.Module | None = None

    def peft_modules(self) -> Iterator[tuple[str, PeftModule]]:
        yield from self.layers.items()


class PeftModel(nn.Module):
    """A backbone plus named adapters. Forward, ``generate`` and attribute access go to the backbone."""

    def __init__(self, model: nn.Module, spec: Spec, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise SpecError("this model already has peftlab adapters; use add_adapter() to add another")
        self.base_model = model
        self.anatomy: Anatomy = anatomy_for(model.config.model_type)
        self._blocks = find_blocks(model, self.anatomy)
        self.dims = model_dims(model.config, len(self._blocks))
        self.hooks = HookRegistry()
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._disabled = False
        self._full_tuned = False
        from peftlab.saving import fingerprint  # saving imports this module

        self.fingerprint = fingerprint(model, self.anatomy)
        for p in model.parameters():
            p.requires_grad_(False)
        # Trainer and other tools inspect forward's signature: show the backbone's.
        self.forward = functools.wraps(model.forward)(functools.partial(_call, model))
        self.train(model.training)
        self.add_adapter(adapter_name, spec)
        self.set_adapter(adapter_name)

    # -- plumbing ----------------------------------------------------------------------------------
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
        return next(self.base_model.parameters())

    # -- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, name: str, spec: Spec) -> None:
        """Build the modules ``spec`` describes and attach them (inactive until :meth:`set_adapter`)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise SpecError(f"adapter name {name!r} is not valid: use letters, digits, '_' or '-'")
        if name in self.adapters:
            raise SpecError(f"an adapter named '{name}' already exists; adapters: {', '.join(self.adapters)}")
        if spec.full and len(self.adapters):
            raise SpecError("full fine-tuning changes the backbone itself and cannot be one of several adapters")
        if self._full_tuned:
            raise SpecError("this model is fully fine-tuned; it cannot take further adapters")
        spec.check()
        adapter = Adapter(name, spec)
        try:
            self._build(adapter, spec)
            base_ids = {id(p) for p in self.base_model.parameters()}
            if any(id(p) in base_ids for p in adapter.parameters()):  # a module kept a backbone submodule
                raise RuntimeError(f"adapter '{name}' would own backbone parameters; this is a peftlab bug")
            if not spec.full and not any(True for _ in adapter.parameters()):
                raise SpecError(
                    f"the spec trains nothing on this model: {type(self.base_model).__name__} has no task head "
                    "and the spec places no module; add modules or use a model class with a task head"
                )
        except Exception:
            self.hooks.remove_owner_adapter(name)
            raise
        adapter.train(self.base_model.training)  # follow the backbone's mode (dropout, AdaMix routing)
        self.adapters[name] = adapter
        if spec.full:
            self._full_tuned = True

    def _context(self, adapter: Adapter, site: str, **kw: Any) -> BuildContext:
        p = self._param()
        return BuildContext(
            site=site,
            adapter_name=adapter.name,
            dims=self.dims,
            hooks=self.hooks,
            shared=adapter.shared,
            gated=False,
            device=p.device,
            dtype=p.dtype,
            model=self.base_model,
            **kw,
        )

    def _build(self, adapter: Adapter, spec: Spec) -> None:
        stacks = [stack_name(b.stack.path) for b in self._blocks]
        per_layer = spec.resolve(len(self._blocks), stacks)
        lengths = [s.length for sites in per_layer.values() for s in sites.values() if isinstance(s, PrefixSettings)]
        hiddens = {
            (s.hidden, s.reparam)
            for sites in per_layer.values()
            for s in sites.values()
            if isinstance(s, PrefixSettings)
        }
        if len(hiddens) > 1:
            raise SpecError("all prefix sites of one adapter must share 'hidden' and 'reparam' (one shared MLP)")
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
                    block=block,
                    linear=block.linear(site),
                    extra={"prefix_max_length": max(lengths, default=0)},
                )
                ctx.gated = spec.gates and settings.gateable
                self._add_module(adapter, module_key(i, site), settings, ctx, f"layer {i} site '{site}'")
        wanted = {site for sites in per_layer.values() for site in sites}
        if wanted and not placed:
            raise SpecError(
                f"site(s) {', '.join(sorted(wanted))} exist in no layer of this {self.anatomy.family}-family model"
            )
        for site, settings in spec.model.items():
            ctx = self._context(adapter, site)
            hosts = self._model_site_hosts(site)
            if hosts is not None and not hosts:
                continue  # the family has no such part (e.g. Llama has no embedding norm)
            ctx.extra["norms" if site.endswith("norm") else "biases"] = hosts
            self._add_module(adapter, module_key(None, site), settings, ctx, f"model site '{site}'")
        if spec.full:
            return
        if spec.train_head:
            found = find_head(self.base_model, self.anatomy)
            if found is not None:
                head = found[1]
                adapter.head = copy.deepcopy(head)
                self.hooks.add(head, "post", _HeadOwner(adapter.name), lambda x, y, a=adapter: a.head(x))

    def _model_site_hosts(self, site: str) -> list[tuple[str, nn.Module]] | None:
        """Backbone modules of a model-level site (None for the input site, which has no host list)."""
        if site in ("embed_norm", "final_norm"):
            paths = [self.anatomy.embed_norm] if site == "embed_norm" else list(self.anatomy.final_norms)
            return [(p, m) for p in paths if p and (m := find_suffix(self.base_model, p)) is not None]
        if site == "bias":
            inside = {id(m) for b in self._blocks for m in b.module.modules()}
            found = find_head(self.base_model, self.anatomy)
            inside |= {id(m) for m in found[1].modules()} if found else set()
            return [
                (n, m)
                for n, m in self.base_model.named_modules()
                if id(m) not in inside and isinstance(getattr(m, "bias", None), nn.Parameter)
            ]
        return None

    @staticmethod
    def _add_module(adapter: Adapter, key: str, settings: Any, ctx: BuildContext, where: str) -> None:
        try:
            module = settings.build(ctx)
        except SpecError as e:
            msg = str(e)
            raise SpecError(msg if msg.startswith(("layer", "model")) else f"{where}: {msg}") from None
        module.attach(ctx)
        adapter.layers[key] = module

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active (and only trainable) adapter."""
        if name not in self.adapters:
            raise SpecError(f"no adapter named '{name}'; adapters: {', '.join(self.adapters) or '(none)'}")
        if self.active_adapter not in (None, name) and self._is_merged(self.active_adapter):
            raise SpecError(f"adapter '{self.active_adapter}' is merged; call unmerge() before switching adapters")
        self.active_adapter = name
        for other, adapter in self.adapters.items():
            adapter.requires_grad_(other == name)
        spec = self.adapters[name].spec
        if spec.full:
            self.base_model.requires_grad_(True)
        if spec.train_embeddings:
            self.base_model.get_input_embeddings().requires_grad_(True)
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise SpecError(f"no adapter named '{name}'; adapters: {', '.join(self.adapters)}")
        if self._is_merged(name):
            raise SpecError(f"adapter '{name}' is merged; call unmerge() before deleting it")
        self.hooks.remove_owner_adapter(name)
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
        use_prefix_attention(self.base_model, self.hooks.has_phase("prefix", active))

    # -- merging ------------------------------------------------------------------------------------
    def _is_merged(self, name: str) -> bool:
        return any(m.merged for _, m in self.adapters[name].peft_modules())

    def merge(self) -> None:
        """Fold every mergeable module of the active adapter into the backbone weights; the rest
        (adapters, prefixes, gated LoRA) keep running through hooks."""
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
        left = [k for k, m in self._active_modules() if not m.mergeable]
        if left:
            raise SpecError(f"cannot unload: modules {', '.join(left[:5])} cannot be merged into weights")
        self.merge()
        if self.adapters[self.active_adapter].head is not None:
            _, head = find_head(self.base_model, self.anatomy)
            head.load_state_dict(self.adapters[self.active_adapter].head.state_dict())
        self.hooks.refresh(set())
        model = self.base_model
        use_prefix_attention(model, False)
        return model

    def _active_modules(self) -> list[tuple[str, PeftModule]]:
        if self.active_adapter is None:
            return []
        return list(self.adapters[self.active_adapter].peft_modules())

    # -- reporting and saving ---------------------------------------------------------------------------
    def counts(self, adapter: str | None = None):
        from peftlab.counting import count

        return count(self, adapter or self.active_adapter)

    def summary(self, adapter: str | None = None) -> str:
        return self.counts(adapter).table()

    def save(
        self, directory: str | Path, format: str = "peftlab", adapter: str | None = None, overwrite: bool = False
    ) -> Path:
        """Save the active (or named) adapter as a folder; ``format="peft"`` writes the peft layout."""
        from peftlab import saving

        return saving.save(
            self, Path(directory), format=format, adapter=adapter or self.active_adapter, overwrite=overwrite
        )


def _call(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return model(*args, **kwargs)


class _HeadOwner:
    """The owner record of a head-copy hook (heads are not PeftModules but follow the same switch)."""

    merged = False

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name


def apply(model: nn.Module, spec: Spec, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and attach the modules ``spec`` describes; returns the wrapped model."""
    if not isinstance(spec, Spec):
        raise SpecError(f"apply() needs a peftlab Spec (e.g. peftlab.methods.lora()), got {type(spec).__name__}")
    return PeftModel(model, spec, adapter_name)
