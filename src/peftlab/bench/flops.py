"""The cost model: a training step's forward + backward, predicted from counted matmul FLOPs, relative to the frozen
floor; measured over predicted says which methods cost more than their arithmetic (optimisation targets).

Accounting (2 FLOPs per multiply-add; elementwise work, embeddings gathers and the task head are left out):

- the backbone's forward per token: every linear of every block (2·in·out) plus attention (q·kᵀ and p·v:
  4·keys·heads·head_dim per query token); F = tokens × that, on the padded batch (padding is computed too);
- the **floor** (every weight frozen, gradients to the embedding output): F forward, and a backward through the
  activations of every block: the linears' input gradients (= their forward) and attention's (twice its forward:
  dq, dk from dscores; dp, dv from dout): floor = 2·F_linear + 3·F_attention;
- a **method**: the same backbone on its longer sequence (a prompt's ``added_length``) with the activation backward
  only from the lowest layer it acts on (a head alone needs none), plus, per module (``flops_per_token`` ×
  tokens + ``flops_per_step``, from the module contract), its forward and a backward of twice that (input and
  weight gradients of its matmuls), plus the weight gradients (= their forward) of backbone tensors it trains in
  place: **full fine-tuning** = floor + the weight gradients of every block linear; with the **frozen-prefix
  cache**, the forward only from the first block the method acts on (the states entering it are read, not computed).

The lowest layer a method acts on is counted whole (its lowest linears' input gradients, not needed, are counted).
Encoder-decoder models (whose decoder runs on the labels, not the input) and kinds without ``flops_per_token`` get
no prediction, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftlab.backbone.anatomy import LINEAR_SITES, Block, find_head
from peftlab.core.peft_model import PeftModel
from peftlab.modules import Dims
from peftlab.space import Backbone
from peftlab.train.frozen import touched

#: measured over predicted above this marks an optimisation target
TARGET = 1.10


@dataclass(frozen=True)
class StepFlops:
    """Matmul FLOPs of one training step's forward and backward (no optimiser: it is memory-bound, not FLOPs)."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def linear_flops(block: Block) -> float:
    """Forward FLOPs per token of a block's linears (a fused projection counted once, as its sites' slices)."""
    total = 0.0
    for site in LINEAR_SITES:
        if block.has_site(site):
            ref = block.linear(site)
            total += 2.0 * ref.in_features * ref.out_features
    return total


def attention_flops(dims: Dims, keys: int) -> float:
    """Forward FLOPs per query token of one attention over ``keys`` keys: q·kᵀ and p·v for every query head."""
    return 4.0 * keys * dims.heads * dims.head_dim


def floor(blocks: list[Block], dims: Dims, batch: int, seq: int) -> StepFlops:
    """The frozen floor: forward, and the backward through every block's activations."""
    tokens = batch * seq
    lin = sum(linear_flops(b) for b in blocks)
    att = len(blocks) * attention_flops(dims, seq)
    return StepFlops(forward=tokens * (lin + att), backward=tokens * (lin + 2 * att))


def lowest_layer(pm: PeftModel, backward: bool = True) -> int:
    """The lowest block the active adapter acts on: the backward through the backbone's activations starts there
    (``backward``; modules that read the backbone detached, LST's ladders, start none), or, counting every module it
    acts on, the first block the frozen-prefix cache cannot skip. A host inside the task head counts as above every
    block; any other host outside the blocks (the embeddings, the model's input) as below them all."""
    blocks = pm.blocks
    in_block = {id(m): b.index for b in blocks for m in b.module.modules()}
    found = find_head(pm.base_model, pm.anatomy)
    in_head = {id(m) for m in found[1].modules()} if found else set()
    k = len(blocks)
    for host in touched(pm, backward=backward):
        layer = in_block.get(id(host), len(blocks) if id(host) in in_head else 0)
        k = min(k, layer)
    return k


def _uncovered(config: Any) -> str | None:
    """Why this cost model cannot predict the model's cost, or None."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder: the decoder runs on the labels, which the cost model does not cover"
    return None


def predict_floor(backbone: Backbone, batch: int, seq: int) -> tuple[StepFlops | None, str | None]:
    """The floor's step FLOPs on ``backbone``, or None and why there is no prediction."""
    why = _uncovered(backbone.model.config)
    if why:
        return None, why
    return floor(backbone.blocks, backbone.dims, batch, seq), None


def predict(pm: PeftModel, batch: int, seq: int, cached: bool = False) -> tuple[StepFlops | None, str | None]:
    """The active adapter's step FLOPs on a ``batch`` × ``seq`` batch, or None and why there is no prediction;
    ``cached``: with the frozen-prefix cache, whose steps run the blocks from the first one the adapter acts on
    (gathering the cached states is a copy, not counted)."""
    config = pm.base_model.config
    why = _uncovered(config)
    if why:
        return None, why
    adapter = pm.adapters[pm.active_adapter]
    modules = list(adapter.all_modules())
    missing = sorted({m.kind for _, m in modules if m.flops_per_token() is None})
    if missing:
        return None, f"no FLOP count for {', '.join(missing)} (flops_per_token)"
    blocks = pm.blocks
    dims = Dims.of(config, len(blocks))
    length = seq + adapter.spec.added_length()
    tokens = batch * length
    k = lowest_layer(pm)
    start = lowest_layer(pm, backward=False) if cached else 0
    lin = [linear_flops(b) for b in blocks]
    att = attention_flops(dims, length)
    forward = tokens * (sum(lin[start:]) + (len(blocks) - start) * att)
    backward = tokens * (sum(lin[k:]) + 2 * att * (len(blocks) - k))
    trained = {id(p) for p in adapter.backbone_parameters()}
    backward += tokens * sum(_weight_gradient_flops(b, trained) for b in blocks)
    added = sum(tokens * m.flops_per_token() + m.flops_per_step() for _, m in modules)
    return StepFlops(forward=forward + added, backward=backward + 2 * added), None


def _weight_gradient_flops(block: Block, trained: set[int]) -> float:
    """Per token: the weight gradients of the block's linears trained in place (each costs its forward)."""
    total = 0.0
    for site in LINEAR_SITES:
        if block.has_site(site):
            ref = block.linear(site)
            weight: nn.Parameter = ref.module.weight
            if id(weight) in trained:
                total += 2.0 * ref.in_features * ref.out_features
    return total
