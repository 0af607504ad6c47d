"""AdapterFusion (Pfeiffer et al. 2021): a learned attention over several trained bottleneck adapters, per layer.

Each site runs every component adapter on its input and mixes their outputs: softmax over components of
q(x)·k(o_i) / T weights v(o_i), where x is the adapters' input (the sub-layer's output) and o_i the i-th adapter's
output. The components are frozen (buffers, read once from their saved folders), the query, key and value
projections are trained, and the mix is added where the components would add (their shared placement).

A :class:`~peftlab.core.peft_model.PeftModel` runs one adapter at a time, so the components are copied into the fusion
adapter rather than kept as adapters of their own: the saved fusion is self-contained and loads without the folders
it was made from (its stored settings drop them). :func:`components` checks the folders (one base model, adapters
only, one placement); the build checks them against the model it is applied to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import PeftlabError, SpecError
from peftlab.formats.keys import module_key
from peftlab.modules.base import BuildContext, PeftModule, Settings, need_choice, need_float, need_int, register
from peftlab.modules.bottleneck import ACTIVATIONS, BottleneckModule, Placement

PLACEMENT = ("original_ln_before", "original_ln_after", "residual_before_ln")


@register
@dataclass
class FuseSettings(Settings):
    """AdapterFusion over the component adapters saved in ``adapters`` (folders); ``sizes``, ``activations`` and
    ``scalings`` record each component at this site, the last three settings their common placement;
    ``temperature`` divides the attention scores."""

    kind = "fuse"
    roles = frozenset({"serial", "parallel"})
    default_lr = 5e-5  # AdapterFusion's fusion layers (the paper's adapters train at 1e-4)

    adapters: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    scalings: list[float] = field(default_factory=list)
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True
    temperature: float = 1.0

    def check(self) -> None:
        if not isinstance(self.sizes, list) or len(self.sizes) < 2:
            raise SpecError(f"needs two or more component adapters (sizes), got {self.sizes!r}")
        n = len(self.sizes)
        if not isinstance(self.activations, list) or not isinstance(self.scalings, list):
            raise SpecError("activations and scalings must be lists, one entry per component")
        if len(self.activations) != n or len(self.scalings) != n:
            raise SpecError(f"sizes, activations and scalings must have one entry per component ({n})")
        if not isinstance(self.adapters, list) or (self.adapters and len(self.adapters) != n):
            raise SpecError(f"adapters must list the {n} component folders (or be empty in a saved fusion)")
        for i in range(n):
            need_int(f"sizes[{i}]", self.sizes[i], 1, 65536)
            need_choice(f"activations[{i}]", self.activations[i], tuple(ACTIVATIONS))
            need_float(f"scalings[{i}]", self.scalings[i], 0.0, low_open=True)
        need_float("temperature", self.temperature, 0.0, low_open=True)
        self.placement.check()

    @property
    def placement(self) -> Placement:
        return Placement(self.original_ln_before, self.original_ln_after, self.residual_before_ln)

    @classmethod
    def plan(cls, placed: list[Settings]) -> dict[str, Any]:
        """A cache of the component folders' tensors, read once for all sites."""
        if len({tuple(s.adapters) for s in placed}) > 1:
            raise SpecError("all fuse sites of one adapter must compose the same adapter folders")
        return {}

    def stored(self) -> Settings:
        """The saved fusion holds its components' weights: it no longer needs their folders."""
        return dataclasses.replace(self, adapters=[])

    def build(self, ctx: BuildContext) -> PeftModule:
        module = Fusion(ctx, self)
        if self.adapters:
            module.load_components(self._component_tensors(ctx), ctx)
        return module

    def _component_tensors(self, ctx: BuildContext) -> list[dict[str, torch.Tensor]]:
        """Each folder's tensors, checked against the model being adapted (cached in the build's plan)."""
        cache = ctx.plan if isinstance(ctx.plan, dict) else {}
        if "tensors" not in cache:
            if ctx.read_adapter is None:
                raise SpecError("fuse reads its component adapters through the core: apply the spec to a model")
            tensors = []
            for folder in self.adapters:
                try:
                    tensors.append(ctx.read_adapter(folder))
                except PeftlabError as e:
                    raise SpecError(f"fuse: {e}") from None
            cache["tensors"] = tensors
        return cache["tensors"]


class Fusion(BottleneckModule):
    """The frozen components (``c<i>_down_weight`` ... buffers) and the trained query, key and value projections;
    the value starts as the identity, so training starts from a plain attention-weighted mean of the components."""

    def __init__(self, ctx: BuildContext, s: FuseSettings) -> None:
        super().__init__(ctx, 1.0, s.placement)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        h = ctx.dims.hidden
        self.sizes, self.acts, self.scalings = list(s.sizes), [ACTIVATIONS[a] for a in s.activations], list(s.scalings)
        for i, size in enumerate(s.sizes):
            self.register_buffer(f"c{i}_down_weight", torch.zeros(size, h, **kw))
            self.register_buffer(f"c{i}_down_bias", torch.zeros(size, **kw))
            self.register_buffer(f"c{i}_up_weight", torch.zeros(h, size, **kw))
            self.register_buffer(f"c{i}_up_bias", torch.zeros(h, **kw))
        self.query = nn.Linear(h, h, **kw)
        self.key = nn.Linear(h, h, **kw)
        self.value = nn.Linear(h, h, **kw)
        if ctx.device.type != "meta":
            for proj in (self.query, self.key):
                nn.init.normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)
            nn.init.eye_(self.value.weight)
            nn.init.zeros_(self.value.bias)
        self.temperature = s.temperature

    def load_components(self, states: list[dict[str, torch.Tensor]], ctx: BuildContext) -> None:
        """Copy each component's adapter at this site into the frozen buffers."""
        root = f"layers.{module_key(ctx.block.index if ctx.block is not None else None, ctx.site)}"
        with torch.no_grad():
            for i, state in enumerate(states):
                for part in ("down", "up"):
                    for name in ("weight", "bias"):
                        key, target = f"{root}.{part}.{name}", getattr(self, f"c{i}_{part}_{name}")
                        if key not in state:
                            raise SpecError(f"fuse: component {i} has no adapter at {root} ({key} missing)")
                        if state[key].shape != target.shape:
                            raise SpecError(
                                f"fuse: component {i}'s {key} has shape {tuple(state[key].shape)}, the spec says "
                                f"{tuple(target.shape)}"
                            )
                        target.copy_(state[key].to(target.dtype))

    def bottleneck(self) -> int:
        return sum(self.sizes)

    def flops_per_token(self) -> float:
        """Every component's down and up projections, then query, key and value (key and value per component)."""
        n = len(self.sizes)
        return 4.0 * self.hidden * sum(self.sizes) + 2.0 * self.hidden * self.hidden * (1 + 2 * n)

    def stored_numel(self) -> int:
        """The fusion projections and the components' weights (the saved fusion is self-contained)."""
        return sum(t.numel() for t in self.state_dict().values())

    def changed_numel(self) -> int:
        return self.stored_numel()

    def components(self, x: torch.Tensor) -> torch.Tensor:
        """Each component's output for ``x``, stacked on a new second-to-last dimension."""
        outs = []
        for i, (act, scale) in enumerate(zip(self.acts, self.scalings, strict=True)):
            down = F.linear(x, getattr(self, f"c{i}_down_weight"), getattr(self, f"c{i}_down_bias"))
            outs.append(F.linear(act(down), getattr(self, f"c{i}_up_weight"), getattr(self, f"c{i}_up_bias")) * scale)
        return torch.stack(outs, dim=-2)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.query.weight.dtype)
        outs = self.components(x)  # (..., n, h)
        scores = (self.key(outs) @ self.query(x).unsqueeze(-1)).squeeze(-1) / self.temperature  # (..., n)
        probs = torch.softmax(scores, dim=-1)
        return (probs.unsqueeze(-1) * self.value(outs)).sum(dim=-2)
