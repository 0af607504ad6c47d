"""Ladder Side-Tuning (Sung et al. 2022): a small side network beside the frozen backbone.

The side network is ``reduction`` times narrower than the backbone and has one small block per backbone layer. Each
layer's block reads a gated *ladder*: the backbone block's output, detached and down-projected, mixed with the side
network's previous state, ``z_i = mu_i · down_i(h_i) + (1 - mu_i) · s_{i-1}``, ``mu_i = sigmoid(alpha_i / T)``
(alpha_i starts at 0, T the paper's temperature 0.1). The side block is ``s_i = z_i + FFN_i(LN_i(z_i))``. After the
last block its state is up-projected and added to the backbone's final hidden state, which the head reads.

Nothing the side network computes flows back into the backbone: the ladders read detached activations, and the only
place the side network writes is the last block's output. With the backbone frozen, no tensor inside the backbone
requires a gradient, so its forward keeps no autograd graph and the training step has no backward through it (a
backward through the final norm and the head only): LST costs less than the frozen floor, which back-propagates
through every block. The up-projection starts at zero, so the model is unchanged at init.

Decisions: the side blocks are position-wise (norm and FFN, no attention of their own): the backbone's states that
feed every ladder already carry the context, and a position-wise side network needs no KV cache of its own, so cached
generation equals uncached. The side network is random-initialised (the paper's pruned-backbone initialisation and
layer dropping are not reproduced). In an encoder-decoder (T5) it runs beside the decoder stack, whose final state
the LM head reads; a side network beside the encoder could reach the head only through the backbone's decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.errors import SpecError
from peftlab.modules.base import BuildContext, PeftModule, Settings, need_choice, need_float, need_int, register
from peftlab.modules.bottleneck import ACTIVATIONS


@register
@dataclass
class LstSettings(Settings):
    """Ladder Side-Tuning: a side network ``reduction`` times narrower than the backbone (its FFNs too), one block
    per layer of the stack that feeds the head, ladders gated by sigmoid(alpha / ``temperature``)."""

    kind = "lst"
    roles = frozenset({"side"})
    default_lr = 3e-3  # Sung et al. (T5 on GLUE)

    reduction: int = 8
    temperature: float = 0.1
    activation: str = "gelu"

    def check(self) -> None:
        need_int("reduction", self.reduction, 1, 4096)
        need_float("temperature", self.temperature, 0.0, low_open=True)
        need_choice("activation", self.activation, tuple(ACTIVATIONS))

    def build(self, ctx: BuildContext) -> PeftModule:
        width = ctx.dims.hidden // self.reduction
        if width < 1:
            raise SpecError(f"reduction {self.reduction} leaves no width of the hidden size {ctx.dims.hidden}")
        return LadderSide(ctx, self, width)


def _inner_size(config: Any, hidden: int) -> int:
    """The backbone's FFN width (BERT/Llama ``intermediate_size``, T5 ``d_ff``, GPT-2 ``n_inner`` or 4·hidden)."""
    for name in ("intermediate_size", "d_ff", "n_inner"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4 * hidden


class SideBlock(nn.Module):
    """One position-wise side block: z + FFN(LN(z))."""

    def __init__(self, width: int, inner: int, activation: str, kw: dict) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, **kw)
        self.fc1 = nn.Linear(width, inner, **kw)
        self.fc2 = nn.Linear(inner, width, **kw)
        self.act = ACTIVATIONS[activation]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.fc2(self.act(self.fc1(self.norm(z))))


class LadderSide(PeftModule):
    """The side network of one adapter: ladders from every block of the stack that feeds the head."""

    #: reads the backbone detached and writes only after its last block: no backward through the backbone
    detached = True

    def __init__(self, ctx: BuildContext, s: LstSettings, width: int) -> None:
        super().__init__(ctx)
        last = ctx.blocks[-1].stack
        self._blocks = tuple(b for b in ctx.blocks if b.stack is last)  # a tuple: the blocks are the backbone's
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        hidden, layers = ctx.dims.hidden, len(self._blocks)
        inner = max(1, _inner_size(ctx.model.config, hidden) // s.reduction)
        self.down = nn.ModuleList(nn.Linear(hidden, width, **kw) for _ in range(layers))
        self.alpha = nn.Parameter(torch.zeros(layers, **kw))
        self.side = nn.ModuleList(SideBlock(width, inner, s.activation, kw) for _ in range(layers))
        self.up = nn.Linear(width, hidden, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.temperature = s.temperature
        self._state: torch.Tensor | None = None

    def attach(self, ctx: BuildContext) -> None:
        for i, block in enumerate(self._blocks):
            ctx.hooks.add(block.module, "post", self, self._ladder(i))

    def _ladder(self, i: int):
        last = i == len(self._blocks) - 1

        def hook(x: Any, out: Any) -> Any:
            hidden = out[0] if isinstance(out, tuple) else out
            h = self.down[i](hidden.detach().to(self.up.weight.dtype))
            mu = torch.sigmoid(self.alpha[i] / self.temperature)
            before = self._state
            z = mu * h if before is None or i == 0 else mu * h + (1 - mu) * before
            state = self.side[i](z)
            if not last:
                self._state = state
                return out
            self._state = None
            combined = hidden + self.up(state).to(hidden.dtype)
            return (combined, *out[1:]) if isinstance(out, tuple) else combined

        return hook

    def flops_per_token(self) -> float:
        """Per token: every ladder's down projection and side FFN, and the final up projection."""
        per_layer = sum(2.0 * d.weight.numel() + 2.0 * (b.fc1.weight.numel() + b.fc2.weight.numel())
                        for d, b in zip(self.down, self.side, strict=True))  # fmt: skip
        return per_layer + 2.0 * self.up.weight.numel()
