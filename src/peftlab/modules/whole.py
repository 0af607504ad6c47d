"""Whole-model parts: the task head copy, trained input embeddings and full fine-tuning.

The spec switches them on with flags (``train_head``, ``train_embeddings``, ``full``) rather than placing
them at sites, so they are not registered kinds; but they follow the same module contract, so saving,
loading, counting and training treat them like any other module. Their tensors keep the key roots the
adapter file has always used (``head.``, ``embeddings.``, ``base.``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.backbone.anatomy import find_head
from peftlab.backbone.quant import model_quantize
from peftlab.errors import SpecError
from peftlab.modules.base import BuildContext, PeftModule, Settings


@dataclass
class HeadSettings(Settings):
    """A trainable copy of the model's task head, so each adapter has its own head and the backbone stays intact."""

    kind = "head"
    roles = frozenset()
    default_lr = 1e-3

    def build(self, ctx: BuildContext) -> PeftModule | None:
        found = find_head(ctx.model, ctx.anatomy)
        return HeadCopy(ctx, found[1]) if found is not None else None


class HeadCopy(PeftModule):
    """Runs in place of the original head while live; ``merge_and_unload`` writes it into the head."""

    state_prefix = "head"

    def __init__(self, ctx: BuildContext, head: nn.Module) -> None:
        super().__init__(ctx)
        self._host = (head,)  # a tuple: the backbone's head must not become a submodule of the adapter
        self.head = copy.deepcopy(head)

    def attach(self, ctx: BuildContext) -> None:
        ctx.hooks.add(self._host[0], "post", self, lambda x, y: self.head(x))

    def flops_per_token(self) -> float:
        return 0.0  # runs instead of the head, on the head's few tokens: the cost model leaves heads out

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.head.state_dict().items()}

    def load_targets(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    @property
    def unloadable(self) -> bool:
        return True

    def fold(self) -> None:
        self._host[0].load_state_dict(self.head.state_dict())


class InPlace(PeftModule):
    """Trains backbone tensors themselves: nothing to hook or merge, and unloading leaves them as trained."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self._model = (ctx.model,)  # a tuple: the backbone must not become a submodule of the adapter

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained backbone tensors as the adapter file keys them (live views)."""
        raise NotImplementedError

    def attach(self, ctx: BuildContext) -> None:
        """Nothing to attach: the backbone computes with the trained tensors directly."""

    def flops_per_token(self) -> float:
        return 0.0  # no work of its own; the weight gradients of backbone_parameters() are the cost model's

    @property
    def unloadable(self) -> bool:
        return True

    def own_numel(self) -> int:
        return sum(p.numel() for p in self.backbone_parameters())

    def stored_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.tensors().items()}

    def load_targets(self) -> dict[str, torch.Tensor]:
        return self.stored_state()


@dataclass
class EmbeddingsSettings(Settings):
    """Train the input embedding table itself (e.g. beside prompt tuning on new tokens)."""

    kind = "embeddings"
    roles = frozenset()

    def build(self, ctx: BuildContext) -> PeftModule:
        return TrainedEmbeddings(ctx)


class TrainedEmbeddings(InPlace):
    state_prefix = "embeddings"

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [self._model[0].get_input_embeddings().weight]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self._model[0].get_input_embeddings().weight}


@dataclass
class FullSettings(Settings):
    """Full fine-tuning: every backbone parameter trains, and the adapter file is the whole state."""

    kind = "full"
    roles = frozenset()
    exclusive = True
    default_lr = 2e-5  # UniPELT's appendix B

    def build(self, ctx: BuildContext) -> PeftModule:
        kind = model_quantize(ctx.model)
        if kind is not None:
            raise SpecError(
                f"full fine-tuning cannot train a base quantized to {kind} (its weights are frozen packed integers); "
                "load the model without --quantize"
            )
        return FullTuning(ctx)


class FullTuning(InPlace):
    state_prefix = "base"

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self._model[0].parameters())

    def tensors(self) -> dict[str, torch.Tensor]:
        return self._model[0].state_dict()


def head_copy(adapter: Any) -> nn.Module | None:
    """An adapter's own copy of the task head, if it trains one."""
    part = dict(adapter.parts.items()).get(HeadSettings.kind)
    return part.head if part is not None else None


def whole_model_parts(spec: Any) -> dict[str, Settings]:
    """The parts a spec's flags ask for, keyed by kind (full fine-tuning already trains head and embeddings)."""
    if spec.full:
        return {"full": FullSettings()}
    parts: dict[str, Settings] = {}
    if spec.train_head:
        parts["head"] = HeadSettings()
    if spec.train_embeddings:
        parts["embeddings"] = EmbeddingsSettings()
    return parts
