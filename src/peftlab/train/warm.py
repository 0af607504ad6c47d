"""A worker's backbone, loaded once and lent to one run after another in exactly its loaded state.

Loading a checkpoint costs seconds per search trial; restoring it costs a copy. Before each loan the backbone is
put back as loaded: the previous run's adapters and hooks removed (their model switches turned off), every
parameter and buffer copied back from a copy taken at load time (full fine-tuning and trained embeddings change
weights in place), trainable again, without gradients, dropout probabilities and configs as loaded, gradient
checkpointing off, in eval mode. When anything is left that cannot be put back (a hook that is not the previous
adapter's), the backbone is loaded afresh instead.

A fresh load draws the task head's random initialisation from the global RNG, so a run's results depend on the
RNG state before and after loading. The backbone is kept with both states: it is lent only to a run that arrives
with the same state before (the same seed), and the RNG is then set to the state a fresh load would have left.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from peftlab.backbone.anatomy import model_configs
from peftlab.backbone.tokenize import get_tokenizer
from peftlab.core.peft_model import PeftModel
from peftlab.train.data import load_for_task
from peftlab.train.frozen import FrozenCache
from peftlab.train.tasks import TaskInfo
from peftlab.train.tokens import TokenCache


def _hooks(model: nn.Module) -> int:
    """The hooks registered on the model's modules (all kinds torch keeps per module)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
    return sum(len(getattr(m, k, {})) for m in model.modules() for k in kinds)


def _copy_values(attrs: dict[str, Any]) -> dict[str, Any]:
    """A config's attributes with their values copied (sub-configs stay the same objects: modules hold them)."""
    return {k: v if isinstance(v, PretrainedConfig) else copy.deepcopy(v) for k, v in attrs.items()}


@dataclass
class Loaded:
    """One loaded backbone and what restores it: its tensors and settings at load time, the RNG around the load."""

    model: nn.Module
    seq2seq: bool
    rng_before: torch.Tensor
    rng_after: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dropout: dict[nn.Dropout, float] = field(default_factory=dict)
    configs: list[tuple[PretrainedConfig, dict[str, Any]]] = field(default_factory=list)
    hooks: int = 0
    lent_to: PeftModel | None = None

    @classmethod
    def load(cls, model_name: str, task: TaskInfo) -> Loaded:
        before = torch.get_rng_state()
        model, seq2seq = load_for_task(model_name, task)
        loaded = cls(model, seq2seq, before, torch.get_rng_state())
        loaded.tensors = {n: t.detach().clone() for n, t in _state(model)}
        loaded.dropout = {m: m.p for m in model.modules() if isinstance(m, nn.Dropout)}
        loaded.configs = [(cfg, _copy_values(vars(cfg))) for cfg in model_configs(model)]
        loaded.hooks = _hooks(model)
        return loaded

    def restore(self) -> bool:
        """Put the backbone back as loaded; False when something is left that only a fresh load removes."""
        pm, self.lent_to = self.lent_to, None
        if pm is not None:
            try:
                for name in list(pm.adapters):
                    pm.delete_adapter(name)
            except Exception:  # e.g. a merged adapter: the backbone's weights are its own again after a reload
                return False
        model = self.model
        _checkpointing_off(model)
        if _hooks(model) != self.hooks:
            return False
        with torch.no_grad():
            for name, t in _state(model):
                t.copy_(self.tensors[name])
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        for m, p in self.dropout.items():
            m.p = p
        for cfg, attrs in self.configs:
            vars(cfg).clear()
            vars(cfg).update(_copy_values(attrs))
        model.eval()
        return True


def _checkpointing_off(model: nn.Module) -> None:
    """Checkpointing off, and the hook that enabling it put on the input embeddings removed (disabling leaves it).
    transformers 5.24 renamed the methods (``gradient_`` to ``activation_checkpointing``)."""
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()


def _state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


class WarmStart:
    """What one worker keeps between runs: its latest backbone, each model's tokenizer, the token ids, and the
    states of frozen layers (``--cache-frozen``; keyed by the weights they came from, so a reloaded backbone with the
    same weights finds them again)."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, int, bool], Loaded] = {}
        self._tokenizers: dict[str, Any] = {}
        self.tokens = TokenCache()
        self.frozen = FrozenCache()
        #: how the latest :meth:`backbone` was served: "loaded" or "reused"
        self.last = ""

    def backbone(self, model_name: str, task: TaskInfo) -> tuple[nn.Module, bool]:
        """The backbone for ``task``'s head, as a fresh load would give it at the current RNG state."""
        key = (model_name, task.num_labels, task.generative)  # the head: classifier or language model
        held = self._loaded.get(key)
        if held is not None and torch.equal(held.rng_before, torch.get_rng_state()) and held.restore():
            torch.set_rng_state(held.rng_after)
            self.last = "reused"
            return held.model, held.seq2seq
        self._loaded.clear()  # one backbone per worker: the previous one's memory goes first
        held = Loaded.load(model_name, task)
        self._loaded[key] = held
        self.last = "loaded"
        return held.model, held.seq2seq

    def lend(self, model: nn.Module, pm: PeftModel) -> None:
        """Record the wrapper a run put around the backbone, to strip before the next loan."""
        for held in self._loaded.values():
            if held.model is model:
                held.lent_to = pm

    def tokenizer(self, model_name: str, model: nn.Module) -> Any:
        """The model's tokenizer, loaded once per model name (its token ids stay valid across backbone loads)."""
        if model_name not in self._tokenizers:
            self._tokenizers = {model_name: get_tokenizer(model_name, model)}
        return self._tokenizers[model_name]
