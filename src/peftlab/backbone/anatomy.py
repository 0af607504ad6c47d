"""Model families: where the sites of a transformer block are, and what else peftlab must know of a model type.

Model families differ only in module names, so every other part of peftlab talks about *sites*
(``q``, ``ffn_out``, ``after_attn`` ...) and asks this module where they live. The same table says, per
``config.model_type``, whether the model is an encoder, a decoder or an encoder-decoder, which model class
it loads as by default and how many rows of its position table hold no position; loading, tokenizing,
training and benchmarking all ask here. Adding a family is adding one :class:`Anatomy` entry to
:data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from peftlab.backbone.quant import dequantized_weight, quantize_kind
from peftlab.errors import SpecError

#: Linear sites: a weight matrix that LoRA-like modules can reparameterise.
LINEAR_SITES = ("q", "k", "v", "o", "ffn_in", "ffn_gate", "ffn_out", "cross_q", "cross_k", "cross_v", "cross_o")
#: Sites that hold a bottleneck module in series with a sub-layer output.
SERIAL_SITES = ("after_attn", "after_ffn")
#: Sites that hold a bottleneck module beside (in parallel with) a sub-layer.
PARALLEL_SITES = ("beside_ffn",)
#: Sites that hold prefix key/values: a block's self-attention, and its cross-attention where it has one (the
#: decoder blocks of encoder-decoders; Li & Liang prefix both, each from a reparameterisation of its own).
PREFIX_SITES = ("attn", "cross_attn")
#: Linear sites whose input is the encoder's output, not the block's hidden states: a per-sequence statistic there
#: (a UniPELT gate) is taken over the encoder's real tokens.
ENCODER_INPUT_SITES = ("cross_k", "cross_v")
#: Every per-layer site with what it holds.
SITE_ROLES: dict[str, str] = {
    **dict.fromkeys(LINEAR_SITES, "linear"),
    **dict.fromkeys(SERIAL_SITES, "serial"),
    **dict.fromkeys(PARALLEL_SITES, "parallel"),
    **dict.fromkeys(PREFIX_SITES, "prefix"),
    "bias": "bias",
    "norm": "norm",
}
#: Model-level sites (outside the blocks); ``side``: a network beside the whole stack (Ladder Side-Tuning).
MODEL_SITE_ROLES: dict[str, str] = {
    "input": "prompt",
    "embed_norm": "norm",
    "final_norm": "norm",
    "bias": "bias",
    "side": "side",
}


@dataclass(frozen=True)
class Stack:
    """One list of transformer blocks (an encoder or a decoder) and where each site sits in a block.

    Paths are relative to the block. ``fused`` maps a linear site to (path, index, parts) for projections
    stored as one matrix (GPT-2's ``c_attn`` holds q, k and v as three equal column blocks).
    """

    path: str
    linear: dict[str, str]
    attention: str
    serial: dict[str, str]
    ffn: str
    norms: tuple[str, ...]
    fused: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    #: per serial site, the norm of that sub-layer: the LayerNorm after its residual where ``post_norm`` (BERT),
    #: the norm before the sub-layer otherwise (pre-norm families: its input is the residual stream)
    serial_norms: dict[str, str] = field(default_factory=dict)
    #: the block normalises after each residual (BERT) rather than before each sub-layer (GPT-2, Llama, T5)
    post_norm: bool = False
    #: positions attend only to earlier ones (decoders): a per-sequence statistic must be a running one
    causal: bool = False
    #: how many levels above the block list sits the module whose forward takes the stack's padding mask
    #: (BertModel above ``encoder.layer``; LlamaModel, GPT2Model and T5's stacks directly above theirs)
    root_up: int = 1
    #: the cross-attention module (decoder blocks of encoder-decoders), whose keys and values come from the encoder
    cross_attention: str | None = None


#: The model class a model loads as by default (a key of :data:`peftlab.backbone.zoo.HEADS`), by architecture.
_DEFAULT_HEADS = {"encoder": "seq-cls", "decoder": "causal-lm", "seq2seq": "seq2seq"}


@dataclass(frozen=True)
class ModelType:
    """One ``config.model_type``: its architecture and the facts that follow from it."""

    name: str
    #: "encoder", "decoder" (decoder-only) or "seq2seq" (encoder-decoder)
    architecture: str
    #: RoBERTa numbers positions from ``padding_idx + 1``: the rows below hold no position.
    positions_after_padding: bool = False

    @property
    def decoder_only(self) -> bool:
        """Decoders classify from their last position, so their batches are padded on the left."""
        return self.architecture == "decoder"

    @property
    def seq2seq(self) -> bool:
        return self.architecture == "seq2seq"

    @property
    def default_head(self) -> str:
        """The natural model class: a classifier for encoders, a language model for decoders, text-to-text."""
        return _DEFAULT_HEADS[self.architecture]

    @property
    def task_head(self) -> str:
        """The model class a classification or regression task trains: text-to-text for seq2seq models (their
        decoder generates the label), a classifier head for the others."""
        return "seq2seq" if self.seq2seq else "seq-cls"

    def position_offset(self, config: Any) -> int:
        """Rows of the position table before the first position (RoBERTa: ``padding_idx + 1``, so 2)."""
        return config.pad_token_id + 1 if self.positions_after_padding else 0


def _types(architecture: str, *names: str, positions_after_padding: bool = False) -> tuple[ModelType, ...]:
    return tuple(ModelType(n, architecture, positions_after_padding) for n in names)


@dataclass(frozen=True)
class Anatomy:
    """A model family: its model types, its stacks, its model-level sites and its task heads."""

    family: str
    model_types: tuple[ModelType, ...]
    stacks: tuple[Stack, ...]
    embed_norm: str | None = None
    final_norms: tuple[str, ...] = ()
    heads: tuple[str, ...] = ("classifier", "score", "classification_head")


_BERT_BLOCK = Stack(
    path="encoder.layer",
    linear={
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
    attention="attention.self",
    serial={"after_attn": "attention.output.dense", "after_ffn": "output.dense"},
    ffn="intermediate",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    serial_norms={"after_attn": "attention.output.LayerNorm", "after_ffn": "output.LayerNorm"},
    post_norm=True,
    root_up=2,
)

_LLAMA_BLOCK = Stack(
    path="layers",
    linear={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_in": "mlp.up_proj",
        "ffn_out": "mlp.down_proj",
    },
    attention="self_attn",
    serial={"after_attn": "self_attn.o_proj", "after_ffn": "mlp.down_proj"},
    ffn="mlp",
    norms=("input_layernorm", "post_attention_layernorm"),
    serial_norms={"after_attn": "input_layernorm", "after_ffn": "post_attention_layernorm"},
    causal=True,
)

_GPT2_BLOCK = Stack(
    path="h",
    linear={"o": "attn.c_proj", "ffn_in": "mlp.c_fc", "ffn_out": "mlp.c_proj"},
    fused={"q": ("attn.c_attn", 0, 3), "k": ("attn.c_attn", 1, 3), "v": ("attn.c_attn", 2, 3)},
    attention="attn",
    serial={"after_attn": "attn.c_proj", "after_ffn": "mlp.c_proj"},
    ffn="mlp",
    norms=("ln_1", "ln_2"),
    serial_norms={"after_attn": "ln_1", "after_ffn": "ln_2"},
    causal=True,
)


def _t5_block(path: str, ffn_index: int, cross: bool) -> Stack:
    ff = f"layer.{ffn_index}.DenseReluDense"
    linear = {
        "q": "layer.0.SelfAttention.q",
        "k": "layer.0.SelfAttention.k",
        "v": "layer.0.SelfAttention.v",
        "o": "layer.0.SelfAttention.o",
        "ffn_in": f"{ff}.wi",
        "ffn_out": f"{ff}.wo",
    }
    norms = ["layer.0.layer_norm", f"layer.{ffn_index}.layer_norm"]
    if cross:
        linear |= {f"cross_{p}": f"layer.1.EncDecAttention.{p}" for p in "qkvo"}
        norms.insert(1, "layer.1.layer_norm")
    return Stack(
        path=path,
        linear=linear,
        attention="layer.0.SelfAttention",
        serial={"after_attn": "layer.0.SelfAttention.o", "after_ffn": f"{ff}.wo"},
        ffn=ff,
        norms=tuple(norms),
        serial_norms={"after_attn": "layer.0.layer_norm", "after_ffn": f"layer.{ffn_index}.layer_norm"},
        causal=cross,  # the decoder stack
        cross_attention="layer.1.EncDecAttention" if cross else None,
    )


FAMILIES: tuple[Anatomy, ...] = (
    Anatomy(
        "bert",
        _types("encoder", "bert")
        + _types("encoder", "roberta", "xlm-roberta", "camembert", positions_after_padding=True),
        (_BERT_BLOCK,),
        embed_norm="embeddings.LayerNorm",
    ),
    Anatomy("llama", _types("decoder", "llama", "qwen2", "mistral", "qwen3"), (_LLAMA_BLOCK,), final_norms=("norm",)),
    Anatomy("gpt2", _types("decoder", "gpt2"), (_GPT2_BLOCK,), final_norms=("ln_f",)),
    Anatomy(
        "t5",
        _types("seq2seq", "t5", "mt5"),
        (_t5_block("encoder.block", 1, cross=False), _t5_block("decoder.block", 2, cross=True)),
        final_norms=("encoder.final_layer_norm", "decoder.final_layer_norm"),
    ),
)

#: Every supported ``config.model_type`` by name.
MODEL_TYPES: dict[str, ModelType] = {t.name: t for a in FAMILIES for t in a.model_types}


def anatomy_for(model_type: str) -> Anatomy:
    """The anatomy of a ``config.model_type``, or a clear error listing the supported ones."""
    for anatomy in FAMILIES:
        if model_type in {t.name for t in anatomy.model_types}:
            return anatomy
    raise SpecError(f"model type '{model_type}' is not supported; supported model types: {', '.join(MODEL_TYPES)}")


def model_type_facts(model_type: str) -> ModelType:
    """The facts of a ``config.model_type``. A type peftlab cannot adapt is taken for an encoder, so that it
    still loads (as a classifier) and tokenizes; :func:`anatomy_for` refuses it when a spec is applied."""
    return MODEL_TYPES.get(model_type) or ModelType(model_type, "encoder")


@dataclass
class LinearRef:
    """A linear site resolved on a model: the host module and, for fused projections, its output slice."""

    module: nn.Module
    out_slice: slice | None = None

    @property
    def transposed(self) -> bool:
        """GPT-2's ``Conv1D`` stores its weight as (in, out)."""
        return type(self.module).__name__ == "Conv1D"

    @property
    def quantized(self) -> str | None:
        """'nf4' / 'int8' when the host is a bitsandbytes quantized linear (its weight holds packed values)."""
        return quantize_kind(self.module)

    @property
    def weight(self):
        """The weight as an (out, in) view of the host's parameter, sliced to this site. On a quantized host, a
        dequantized copy: writing into it changes nothing (merging is refused there)."""
        if self.quantized:
            w = dequantized_weight(self.module)
            return w if self.out_slice is None else w[self.out_slice]
        w = self.module.weight.T if self.transposed else self.module.weight
        return w if self.out_slice is None else w[self.out_slice]

    @property
    def bias(self):
        b = self.module.bias
        if b is None or self.out_slice is None:
            return b
        return b[self.out_slice]

    @property
    def in_features(self) -> int:
        return self.module.in_features if self.quantized else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        if self.quantized:
            return self.total_out if self.out_slice is None else self.out_slice.stop - self.out_slice.start
        return self.weight.shape[0]

    @property
    def total_out(self) -> int:
        if self.quantized:
            return self.module.out_features
        w = self.module.weight
        return w.shape[1] if self.transposed else w.shape[0]


@dataclass
class Block:
    """One transformer block of a concrete model, with its sites resolved to modules."""

    index: int
    stack: Stack
    module: nn.Module
    #: the module whose forward takes this block's stack's padding mask (see :attr:`Stack.root_up`)
    root: nn.Module | None = None

    def sub(self, path: str) -> nn.Module:
        return self.module.get_submodule(path)

    def linear(self, site: str) -> LinearRef | None:
        if site in self.stack.linear:
            return LinearRef(self.sub(self.stack.linear[site]))
        if site in self.stack.fused:
            path, index, parts = self.stack.fused[site]
            ref = LinearRef(self.sub(path))
            width = ref.total_out // parts
            ref.out_slice = slice(index * width, (index + 1) * width)
            return ref
        return None

    def has_site(self, site: str) -> bool:
        """Whether this block has the site (gate projections and cross-attention are in some blocks only)."""
        if SITE_ROLES[site] == "linear":
            return site in self.stack.linear or site in self.stack.fused
        if site == "cross_attn":
            return self.stack.cross_attention is not None
        return True

    def attention(self, site: str) -> nn.Module:
        """The attention module a prefix site prepends to: self-attention ('attn') or cross-attention."""
        path = self.stack.cross_attention if site == "cross_attn" else self.stack.attention
        if path is None:
            raise SpecError(f"block {self.index} has no cross-attention")
        return self.sub(path)

    def biases(self) -> list[tuple[str, nn.Module]]:
        """The modules of this block that own a bias (BitFit trains these)."""
        return [
            (name, m)
            for name, m in self.module.named_modules()
            if isinstance(getattr(m, "bias", None), nn.Parameter) and not _is_peft(name)
        ]

    def norms(self) -> list[tuple[str, nn.Module]]:
        return [(p, self.sub(p)) for p in self.stack.norms]


def _is_peft(name: str) -> bool:
    return "peftlab" in name


def find_blocks(model: nn.Module, anatomy: Anatomy) -> list[Block]:
    """All blocks of the model in order (encoder before decoder), numbered from 0."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    blocks: list[Block] = []
    for stack in anatomy.stacks:
        matches = [name for name in lists if name == stack.path or name.endswith("." + stack.path)]
        if not matches:
            continue
        # The shortest match is the backbone's own stack (not a nested list with the same suffix).
        name = min(matches, key=len)
        root = model.get_submodule(".".join(name.split(".")[: -stack.root_up]))
        for layer in lists[name]:
            blocks.append(Block(len(blocks), stack, layer, root))
    if not blocks:
        raise SpecError(f"no transformer blocks found for family '{anatomy.family}'")
    return blocks


def find_suffix(model: nn.Module, suffix: str) -> nn.Module | None:
    """The shallowest module whose qualified name is ``suffix`` or ends with ``.suffix``."""
    best: tuple[int, nn.Module] | None = None
    for name, m in model.named_modules():
        if name == suffix or name.endswith("." + suffix):
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, m)
    return None if best is None else best[1]


def find_head(model: nn.Module, anatomy: Anatomy) -> tuple[str, nn.Module] | None:
    """The newly initialised task head, if the model class has one (LM heads are not task heads)."""
    for name in anatomy.heads:
        m = getattr(model, name, None)
        if isinstance(m, nn.Module):
            return name, m
    return None


def stack_names(blocks: list[Block]) -> list[str]:
    """The layer selector each block answers to: 'encoder' / 'decoder' for T5's stacks, 'layers' otherwise."""
    names = []
    for b in blocks:
        first = b.stack.path.split(".")[0]
        names.append(first if first in ("encoder", "decoder") else "layers")
    return names


def model_configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every config object the model's modules hold, once each (sub-models such as T5's stacks keep their own)."""
    seen: dict[int, PretrainedConfig] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PretrainedConfig):
            seen[id(cfg)] = cfg
    return list(seen.values())
