"""The backbone side of a space: its layers and sizes, and what modules and whole specs cost on it (the one cost
routine the design spaces and the search use)."""

from __future__ import annotations

import functools
import json

import torch
from torch import nn

from peftlab.backbone.anatomy import anatomy_for, find_blocks, find_head
from peftlab.backbone.zoo import load_model
from peftlab.core.hooks import HookRegistry
from peftlab.core.peft_model import PeftModel
from peftlab.core.spec import Spec
from peftlab.modules import BuildContext, Dims, Settings
from peftlab.space.strategies import Strategy


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
        return PeftModel(self.model, None)

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
