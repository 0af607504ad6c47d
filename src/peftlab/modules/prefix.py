"""Soft prompts and prefixes: prompt tuning on the input, prefix tuning inside attention.

Prefix key/values reach attention through a registered attention function (transformers'
``AttentionInterface``): it prepends the prefixes of the layers that have them and extends the mask
(and T5's position bias), then runs SDPA. Layers without a prefix run unchanged. A decoder block's cross-attention
takes a prefix of its own (site ``cross_attn``): prepended to the encoder's keys and values at every call, it is
never part of the KV cache, which holds only the encoder's.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from peftlab.backbone.anatomy import model_configs
from peftlab.core.sequence import CACHE_ARGS
from peftlab.errors import SpecError
from peftlab.modules.base import BuildContext, Gate, PeftModule, Settings, need_choice, need_int, register

ATTN_NAME = "peftlab"
_ORIGINAL_ATTR = "_peftlab_original_attn"
#: Attribute on an attention module that holds the prefix callbacks read by the attention function.
PREFIX_ATTR = "_peftlab_prefix"


@register
@dataclass
class PrefixSettings(Settings):
    """Prefix tuning (Li & Liang 2021): ``length`` trainable key/value vectors per layer and attention, produced
    during training by an MLP (``hidden`` wide) that is dropped on save. The MLP's embedding and down projection are
    shared by the layers of one location (an encoder-decoder has three: encoder self-, decoder self- and
    cross-attention, each with its own); each layer has its own up projection."""

    kind = "prefix"
    packable = False  # every position of a packed row would attend to one set of prefix key/values
    roles = frozenset({"prefix"})
    gateable = True
    default_lr = 2e-4  # UniPELT's appendix B

    length: int = 10
    hidden: int = 512
    reparam: bool = True

    def check(self) -> None:
        need_int("length", self.length, 1, 4096)
        need_int("hidden", self.hidden, 1, 65536)
        if not isinstance(self.reparam, bool):
            raise SpecError("reparam must be true or false")

    @classmethod
    def plan(cls, placed: list[Settings]) -> PrefixPlan:
        """The layers of one adapter share an MLP per location: they must agree on it, and its embedding table is as
        long as the adapter's longest prefix."""
        if len({(s.hidden, s.reparam) for s in placed}) > 1:
            raise SpecError("all prefix sites of one adapter must share 'hidden' and 'reparam' (one shared MLP)")
        return PrefixPlan(max_length=max((s.length for s in placed), default=0))

    def stored(self) -> PrefixSettings:
        return dataclasses.replace(self, reparam=False)

    def build(self, ctx: BuildContext) -> PeftModule:
        return Prefix(ctx, self)


@dataclass
class PrefixPlan:
    """What the prefixes of one adapter share."""

    max_length: int


class PrefixPool(nn.Module):
    """The shared part of the reparameterisation: prefix token embeddings and the down projection."""

    def __init__(self, length: int, dims_hidden: int, mid: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(length, dims_hidden, device=device, dtype=dtype))
        self.down = nn.Linear(dims_hidden, mid, device=device, dtype=dtype)
        if device.type != "meta":
            nn.init.normal_(self.embedding, std=0.02)

    def forward(self, length: int) -> torch.Tensor:
        return torch.tanh(self.down(self.embedding[:length]))


def use_prefix_attention(model: nn.Module, on: bool) -> None:
    """Route the model's attention through :func:`prefix_attention` (or back to what it was)."""
    for cfg in model_configs(model):
        current = cfg._attn_implementation
        if on and current != ATTN_NAME:
            if current not in ("sdpa", "eager", None):
                raise SpecError(
                    f"prefix tuning needs attn_implementation 'sdpa' or 'eager', this model uses '{current}'"
                )
            setattr(cfg, _ORIGINAL_ATTR, current)
            cfg._attn_implementation_internal = ATTN_NAME
        elif not on and current == ATTN_NAME:
            cfg._attn_implementation_internal = getattr(cfg, _ORIGINAL_ATTR, "sdpa")


def prefix_location(ctx: BuildContext) -> str:
    """Which prefix location a site belongs to: '' on single-stack models (one location); on encoder-decoders
    'encoder' and 'decoder' (self-attention) or 'cross' (the decoder's cross-attention). Li & Liang (and AdapterHub)
    give each location its own embedding and MLP."""
    if ctx.site == "cross_attn":
        return "cross"
    if ctx.block is None or len({b.stack.path for b in ctx.blocks}) < 2:
        return ""
    return ctx.block.stack.path.split(".")[0]


class Prefix(PeftModule):
    """One layer's prefix at one attention (self- or cross-attention): its key/values, made by the up projection of
    its location's shared pool, or stored directly."""

    model_switches = (use_prefix_attention,)
    #: the key of the reparameterisation MLP the prefixes of one location of one adapter share
    pool_key = "prefix_pool"

    def __init__(self, ctx: BuildContext, s: PrefixSettings) -> None:
        super().__init__(ctx)
        d = ctx.dims
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.length, self.kv_heads, self.head_dim = s.length, d.kv_heads, d.head_dim
        self.heads = d.heads
        self.reparam = s.reparam
        if s.reparam:
            plan = ctx.plan if isinstance(ctx.plan, PrefixPlan) else PrefixPlan(s.length)
            location = prefix_location(ctx)
            key = f"{self.pool_key}_{location}" if location else self.pool_key
            pool = ctx.share(key, lambda: PrefixPool(plan.max_length, d.hidden, s.hidden, **kw), stored=False)
            self._pool = (pool,)
            self.up = nn.Linear(s.hidden, 2 * d.kv_dim, **kw)
        else:
            self.kv = nn.Parameter(torch.zeros(2, d.kv_heads, s.length, d.head_dim, **kw))
            if ctx.device.type != "meta":
                nn.init.normal_(self.kv, std=0.02)
        self.gate = Gate(d.hidden, ctx.device, ctx.dtype, ctx.sequence()) if ctx.gated else None
        self._gate_input: torch.Tensor | None = None

    def attach(self, ctx: BuildContext) -> None:
        host = ctx.block.attention(ctx.site)
        ctx.hooks.add_attribute(host, PREFIX_ATTR, self, self.key_values)
        if self.gate is not None:
            ctx.hooks.add(host, "pre", self, self._capture)

    def _capture(self, x: torch.Tensor) -> torch.Tensor:
        self._gate_input = x
        return x

    def flops_per_token(self) -> float:
        """Every query also scores and averages ``length`` more keys and values (q·kᵀ and p·v, every head), and the
        gate's projection where gated."""
        gate = self.gate.flops_per_token() if self.gate is not None else 0.0
        return 4.0 * self.length * self.heads * self.head_dim + gate

    def flops_per_step(self) -> float:
        """The MLP making this layer's key/values, once per pass (none when they are stored directly)."""
        if not self.reparam:
            return 0.0
        down = self._pool[0].down
        return 2.0 * self.length * (down.in_features * down.out_features + self.up.in_features * self.up.out_features)

    def prefix_kv(self) -> torch.Tensor:
        """(2, kv_heads, length, head_dim): what inference needs and ``save`` stores."""
        if not self.reparam:
            return self.kv
        h = self._pool[0](self.length)
        kv = self.up(h).view(self.length, 2, self.kv_heads, self.head_dim)
        return kv.permute(1, 2, 0, 3)

    def key_values(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This layer's prefix keys and values for a batch, and its gate: None, (batch, 1, 1) for one gate per
        sequence, or (batch, positions, 1) for one per query position (a causal stack's running mean)."""
        kv = self.prefix_kv().to(dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        gate = None
        if self.gate is not None:
            gate = self.gate(self._gate_input).to(dtype)
            self._gate_input = None
        return kv[0], kv[1], gate

    def stored_numel(self) -> int:
        gate = sum(p.numel() for p in self.gate.parameters()) if self.gate is not None else 0
        return 2 * self.kv_heads * self.length * self.head_dim + gate

    def stored_state(self) -> dict[str, torch.Tensor]:
        state = {"kv": self.prefix_kv().detach()}
        if self.gate is not None:
            state |= {f"gate.{k}": v.detach() for k, v in self.gate.state_dict().items()}
        return state


def _extend_mask(
    mask: torch.Tensor | None, module: nn.Module, q_len: int, kv_len: int, extra: int, device: torch.device
) -> torch.Tensor:
    """The mask with ``extra`` always-visible prefix columns in front of the keys."""
    if mask is None:
        if getattr(module, "is_causal", False) and q_len > 1:
            rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
            mask = (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
        else:
            mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    pad_value = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:-1], extra), pad_value, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
):
    """SDPA attention that first prepends the prefix key/values of the layers that have them. A gate scales its
    prefix's keys and values (UniPELT); a gate per query position goes through :func:`_gated_by_position`."""
    prefixes = getattr(module, PREFIX_ATTR, None)
    if not prefixes:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, kv_len = query.shape[0], key.shape[2]
    triples = []
    for fn in prefixes:  # a callback gives one prefix's triple, or a list (a gate per prefix token and position)
        found = fn(batch, key.dtype)
        triples += found if isinstance(found, list) else [found]
    extra = sum(k.shape[2] for k, _, _ in triples)
    attention_mask = _extend_mask(attention_mask, module, query.shape[2], kv_len, extra, query.device)
    bias = kwargs.get("position_bias")
    if bias is not None:
        kwargs["position_bias"] = torch.nn.functional.pad(bias, (extra, 0))
    if any(g is not None and g.shape[1] > 1 for _, _, g in triples):
        return _gated_by_position(module, query, key, value, attention_mask, triples, **kwargs)
    pairs = [(k, v) if g is None else (k * g.view(batch, 1, 1, 1), v * g.view(batch, 1, 1, 1)) for k, v, g in triples]
    key = torch.cat([*(k for k, _ in pairs), key], dim=2)
    value = torch.cat([*(v for _, v in pairs), value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _gated_by_position(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    **kwargs: Any,
):
    """Attention where prefix i's keys and values are scaled by g_i[t] at query position t, in one SDPA call.

    The head dimension is widened into blocks, block 0 for the sequence and block i for prefix i: queries
    [q, g_1·q, ...], sequence keys and values in block 0, prefix i's in block i, zeros elsewhere. A score is then
    q·k for a sequence key and g_i·(q·k) for a prefix key, and the output's block i holds prefix i's share of the
    average, which is scaled by g_i before the blocks are summed."""
    batch, dim = query.shape[0], query.shape[-1]
    blocks = 1 + len(triples)
    scaling = kwargs.pop("scaling", None)
    scaling = dim**-0.5 if scaling is None else scaling
    gates = [torch.ones_like(query[:, :1, :, :1]) if g is None else g.unsqueeze(1) for _, _, g in triples]

    def place(t: torch.Tensor, i: int) -> torch.Tensor:
        d = t.shape[-1]
        return torch.nn.functional.pad(t, (i * d, (blocks - 1 - i) * d))

    wide_query = torch.cat([query, *(query * g for g in gates)], dim=-1)
    wide_key = torch.cat([*(place(k, i + 1) for i, (k, _, _) in enumerate(triples)), place(key, 0)], dim=2)
    wide_value = torch.cat([*(place(v, i + 1) for i, (_, v, _) in enumerate(triples)), place(value, 0)], dim=2)
    out, weights = sdpa_attention_forward(
        module, wide_query, wide_key, wide_value, attention_mask, scaling=scaling, **kwargs
    )
    d = value.shape[-1]
    parts = out.unflatten(-1, (blocks, d))  # (batch, length, heads, blocks, d)
    summed = parts[..., 0, :]
    for i, g in enumerate(gates):
        summed = summed + parts[..., i + 1, :] * g.view(batch, -1, 1, 1)
    return summed, weights


def _full_mask(*args: Any, **kwargs: Any):
    """SDPA's mask, never skipped: prefix columns must always be added to a real mask."""
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


@register
@dataclass
class AdaptivePrefixSettings(PrefixSettings):
    """Adaptive prefix tuning (Zhang et al. 2023): prefix tuning whose key/values are scaled per layer by
    λ · α, a layer-level gate λ (a trained scalar, starting at 1) and token-level gates α (one per prefix token,
    sigmoid of a linear map of the layer's input, averaged over the real tokens: a running mean in a decoder, so
    cached generation gives what the whole forward gives)."""

    kind = "adaptive-prefix"
    gateable = False  # its own gates; a UniPELT gate on top would be a third

    def build(self, ctx: BuildContext) -> PeftModule:
        return AdaptivePrefix(ctx, self)


class AdaptivePrefix(Prefix):
    """A prefix scaled by its layer gate and its token gates. In an encoder a sequence has one gate per prefix
    token, which scales its keys and values directly; in a decoder's forward over several positions each position
    has its own, so each prefix token goes to the attention as a prefix of its own with a gate per position
    (:func:`_gated_by_position`, whose head dimension grows with the prefix length: the price of exact per-position
    gates)."""

    pool_key = "adaptive_prefix_pool"

    def __init__(self, ctx: BuildContext, s: AdaptivePrefixSettings) -> None:
        super().__init__(ctx, s)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.token_gate = nn.Linear(ctx.dims.hidden, s.length, **kw)
        self.layer_gate = nn.Parameter(torch.ones((), **kw))
        self._view = (ctx.sequence(),)  # a tuple: the view is the core's, not a submodule

    def attach(self, ctx: BuildContext) -> None:
        super().attach(ctx)
        ctx.hooks.add(ctx.block.attention(ctx.site), "pre", self, self._capture)

    def flops_per_token(self) -> float:
        return super().flops_per_token() + 2.0 * self.token_gate.weight.numel()

    def _gates(self) -> torch.Tensor:
        """λ · α: (batch, length) in an encoder, (batch, positions, length) in a decoder."""
        x, self._gate_input = self._gate_input, None
        g = torch.sigmoid(self.token_gate(x.to(self.token_gate.weight.dtype)))  # (batch, positions, length)
        view = self._view[0]
        real = view.real(g) if view is not None else g.new_ones(*g.shape[:2], 1)
        if view is None or not view.causal:
            mean = (g * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)
        else:
            sums, counts = view.carry(id(self), torch.cumsum(g * real, dim=1), torch.cumsum(real, dim=1))
            mean = sums / counts.clamp_min(1.0)
        return self.layer_gate * mean

    def key_values(self, batch: int, dtype: torch.dtype):
        """The gated key/values: one triple (gates applied), or one per prefix token with its gate per position."""
        kv = self.prefix_kv().to(dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        gates = self._gates().to(dtype)
        if gates.dim() == 3 and gates.shape[1] == 1:
            gates = gates[:, 0]
        if gates.dim() == 2:
            scale = gates.view(batch, 1, -1, 1)
            return kv[0] * scale, kv[1] * scale, None
        return [(kv[0][:, :, j : j + 1], kv[1][:, :, j : j + 1], gates[..., j : j + 1]) for j in range(self.length)]

    def stored_numel(self) -> int:
        return super().stored_numel() + self.token_gate.weight.numel() + self.token_gate.bias.numel() + 1

    def stored_state(self) -> dict[str, torch.Tensor]:
        state = super().stored_state()
        state |= {f"token_gate.{k}": v.detach() for k, v in self.token_gate.state_dict().items()}
        return state | {"layer_gate": self.layer_gate.detach()}


AttentionInterface.register(ATTN_NAME, prefix_attention)
AttentionMaskInterface.register(ATTN_NAME, _full_mask)


@register
@dataclass
class PromptSettings(Settings):
    """Prompt tuning (Lester et al. 2021): ``length`` trainable vectors prepended to the input embeddings;
    ``init`` 'vocab' copies randomly drawn token embeddings, 'random' draws them from N(0, 0.02)."""

    kind = "prompt"
    packable = False  # the soft prompt leads the row, not each example packed into it
    roles = frozenset({"prompt"})
    default_lr = 3e-1  # Lester et al.

    length: int = 20
    init: str = "vocab"

    def check(self) -> None:
        need_int("length", self.length, 1, 4096)
        need_choice("init", self.init, ("vocab", "random"))

    def added_length(self) -> int:
        return self.length

    def build(self, ctx: BuildContext) -> PeftModule:
        return Prompt(ctx, self)


class Prompt(PeftModule):
    """Prepends the prompt to the input embeddings and keeps every other input consistent with it: the
    attention mask, token types and, for decoder language modelling, the labels (padded with -100).

    Decoders: the model's own forward is hooked; once a cache holds the prompt (generation), later steps
    only get their mask extended. Encoder-decoders: the encoder is hooked (``generate`` calls it directly)
    and the full model's mask is extended so the decoder's cross-attention sees the prompt positions too.
    """

    def __init__(self, ctx: BuildContext, s: PromptSettings) -> None:
        super().__init__(ctx)
        emb = ctx.model.get_input_embeddings()
        self.prompt = nn.Parameter(torch.empty(s.length, ctx.dims.hidden, device=ctx.device, dtype=ctx.dtype))
        if ctx.device.type != "meta":
            if s.init == "vocab":
                ids = torch.randint(emb.weight.shape[0], (s.length,))
                self.prompt.data.copy_(emb.weight.detach()[ids.to(emb.weight.device)].to(ctx.dtype))
            else:
                nn.init.normal_(self.prompt, std=0.02)
        self._embed = (emb,)
        self._enc_dec = bool(getattr(ctx.model.config, "is_encoder_decoder", False))
        host = ctx.model.get_encoder() if self._enc_dec else ctx.model
        self._host = (host,)  # a tuple: the backbone must not become a submodule of the adapter
        self._signatures = {id(m): inspect.signature(m.forward) for m in (ctx.model, host)}

    def flops_per_token(self) -> float:
        return 0.0  # a concatenation; the longer sequence it makes is the settings' added_length

    def attach(self, ctx: BuildContext) -> None:
        host = self._host[0]
        ctx.hooks.add(host, "kwargs", self, self._bound(host, self._prepend))
        if self._enc_dec:
            ctx.hooks.add(ctx.model, "kwargs", self, self._bound(ctx.model, self._extend_cross_mask))

    def _bound(self, module: nn.Module, fn):
        signature = self._signatures[id(module)]

        def hook(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kw = dict(signature.bind_partial(*args, **kwargs).arguments)
            kw |= kw.pop("kwargs", {})
            return (), fn(kw)

        return hook

    def _mask(self, kw: dict, total: int) -> None:
        """Give the attention mask the prompt's columns unless it already has them."""
        mask = kw.get("attention_mask")
        n = self.prompt.shape[0]
        if mask is not None and mask.dim() == 2 and mask.shape[1] == total - n:
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)

    def _prepend(self, kw: dict) -> dict:
        input_ids = kw.pop("input_ids", None)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = self._embed[0](input_ids)
        kw["inputs_embeds"] = embeds
        kw.pop("position_ids", None)  # the model derives positions from the (longer) sequence
        kw.pop("cache_position", None)
        past = next((kw[k] for k in CACHE_ARGS if kw.get(k) is not None), None)
        past_len = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        batch, length = embeds.shape[:2]
        n = self.prompt.shape[0]
        if past_len:  # the cache already holds the prompt
            self._mask(kw, past_len + length)
            return kw
        p = self.prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kw["inputs_embeds"] = torch.cat([p, embeds], dim=1)
        self._mask(kw, n + length)
        types = kw.get("token_type_ids")
        if types is not None:
            kw["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        labels = kw.get("labels")
        if labels is not None and not self._enc_dec and labels.dim() == 2 and labels.shape[1] == length:
            kw["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return kw

    def _extend_cross_mask(self, kw: dict) -> dict:
        encoded = kw.get("encoder_outputs")
        if encoded is not None:
            self._mask(kw, encoded[0].shape[1])
        else:
            source = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
            if source is not None:
                self._mask(kw, source.shape[1] + self.prompt.shape[0])
        return kw
