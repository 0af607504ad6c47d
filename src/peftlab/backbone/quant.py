"""Quantized bases (QLoRA): the linear layers of the transformer blocks stored in 4-bit NF4 or 8-bit through
bitsandbytes, everything else (embeddings, norms, heads) in full precision.

bitsandbytes is the library transformers and peft integrate with, and since 0.49 it runs on the CPU, so a model
quantized here is an ordinary transformers quantized model: peft, ``save_pretrained`` and generation all see
``Linear4bit`` / ``Linear8bitLt`` modules as they would on a GPU. Checkpoints in safetensors are quantized while
they load (``from_pretrained(quantization_config=...)``); random-init ``shape:`` models and GGUF files, which
transformers cannot quantize on load, are loaded in full precision, written to a temporary folder and read back
quantized, so every quantized base comes out of the same loader.

Quantized modules store packed values, so counts and sizes never read ``numel()`` of their weights: they ask
:func:`logical_numel` (the shape the weight had) and :func:`storage_bytes` (what the packed weight and its scales
really occupy). Merging an adapter into a quantized weight is refused (see :func:`merge_refusal`).
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn
from transformers import BitsAndBytesConfig

from peftlab.errors import PeftlabError
from peftlab.optional import require

#: --quantize values: the QLoRA paper's 4-bit NormalFloat, and LLM.int8()
QUANTIZE_CHOICES = ("nf4", "int8")
#: what bitsandbytes' 4-bit format keeps beside the packed weight: one float32 scale per block of this many values
NF4_BLOCK = 64
#: bitsandbytes' NF4 code book: 16 float32 values per layer
NF4_CODE_BYTES = 16 * 4
#: the outlier threshold of LLM.int8() (transformers' default): larger activations stay in 16-bit
INT8_THRESHOLD = 6.0


def check_quantize(value: str | None) -> str | None:
    """``value`` when it names a quantization (or is None), otherwise a one-line error listing the choices."""
    if value is not None and value not in QUANTIZE_CHOICES:
        raise PeftlabError(f"unknown --quantize '{value}'; choose one of: {', '.join(QUANTIZE_CHOICES)}")
    return value


def bitsandbytes() -> Any:
    """The bitsandbytes package, or a one-line error saying how to install it. Its CPU backend logs a warning at
    import where the optional ``kernels`` package cannot fetch a faster kernel; it falls back to its own, so
    that line is dropped."""
    with _quiet("bitsandbytes"):
        return require("bitsandbytes", "--quantize")


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _DropCastNotice(logging.Filter):
    """LLM.int8() logs that it casts float32 inputs to float16 on every matmul call: that is its design (8-bit
    weights meet 16-bit activations), not news, and thousands of lines per run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


_CAST_FILTER = _DropCastNotice()


def quantization_config(kind: str, dtype: torch.dtype | None, skip: list[str]) -> Any:
    """The transformers ``BitsAndBytesConfig`` for ``kind``: QLoRA's NF4 (no double quantization, so scales are
    plain float32 and sizes are exact) computing in ``dtype`` (float32 by default), or LLM.int8() with frozen 8-bit
    weights. ``skip``: modules kept in full precision."""
    bitsandbytes()
    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype or torch.float32,
            bnb_4bit_use_double_quant=False,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skip, llm_int8_has_fp16_weight=False
    )


def full_precision_modules(model: nn.Module, blocks: list[nn.Module]) -> list[str]:
    """The linear modules outside the transformer ``blocks`` (task heads, LM heads, poolers): QLoRA keeps them,
    with embeddings and norms, in full precision."""
    inside = {id(m) for b in blocks for m in b.modules()}
    return [name for name, m in model.named_modules() if id(m) not in inside and is_linear(m)]


def is_linear(m: nn.Module) -> bool:
    """A linear layer as quantizing sees one: ``nn.Linear`` (bitsandbytes' modules are subclasses) or GPT-2's Conv1D."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def finish(model: nn.Module, kind: str) -> nn.Module:
    """A just-quantized model made deterministic and trainable on the CPU.

    bitsandbytes 0.50 repacks a 4-bit weight into a bfloat16 inference layout the first time the layer runs in
    eval mode without gradients on a CPU with AVX512-BF16; from then on every call takes that path, which has no
    backward (training after any evaluation fails or loses input gradients) and computes in bfloat16 (eval and
    train outputs differ). Switching the repacking off keeps every call on the dequantize-and-matmul path.
    """
    bnb = bitsandbytes()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_FILTER)
    model.peftlab_quantize = kind
    return model


def quantize_loaded(
    make: Callable[[], nn.Module],
    kind: str,
    dtype: torch.dtype | None,
    head_cls: Any,
    full_precision: Callable[[nn.Module], list[str]],
) -> nn.Module:
    """A full-precision model (what ``make`` loads) quantized by the loader that quantizes checkpoints: written to a
    temporary folder (safetensors) and read back with the quantization config, so it is the same model a quantized
    checkpoint load gives. ``make`` is called here so that nothing else holds the full-precision copy: it is freed
    before the read-back. ``full_precision``: the modules of a model to keep unquantized."""
    model = make()
    config = quantization_config(kind, dtype, full_precision(model))
    head_cls = head_cls or type(model)  # the model type's natural class: the one it was built as
    with tempfile.TemporaryDirectory(prefix="peftlab-quantize-") as folder:
        write_folder(model, Path(folder))
        del model
        gc.collect()
        with _quiet("transformers"):
            quantized = head_cls.from_pretrained(
                folder, quantization_config=config, device_map="cpu", attn_implementation="sdpa"
            )
    return finish(quantized.eval(), kind)


def write_folder(model: nn.Module, folder: Path) -> None:
    """A full-precision model as a transformers folder (config.json, model.safetensors). Written by hand:
    ``save_pretrained`` refuses a model read from GGUF (transformers marks it quantized by gguf, though its tensors
    are dequantized floats), and the config must not carry that mark into a later load."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def quantize_meta(model: nn.Module, kind: str, dtype: torch.dtype | None, skip: list[str]) -> nn.Module:
    """A meta-device model with bitsandbytes modules in place of its linears (but ``skip``), unquantized: what
    counting a quantized shape (``peftlab show --quantize``) needs, without weights in memory. The modules are the
    ones transformers' loader puts there."""
    bnb = bitsandbytes()
    kept = set(skip)
    for name, m in list(model.named_modules()):
        if name in kept or not is_linear(m):
            continue
        in_f, out_f = m.weight.shape if type(m).__name__ == "Conv1D" else (m.in_features, m.out_features)
        bias = m.bias is not None
        with torch.device("meta"):
            if kind == "nf4":
                new = bnb.nn.Linear4bit(
                    in_f, out_f, bias, dtype or torch.float32, compress_statistics=False, quant_type="nf4"
                )
            else:
                new = bnb.nn.Linear8bitLt(in_f, out_f, bias, has_fp16_weights=False, threshold=INT8_THRESHOLD)
        new.requires_grad_(False)
        model.set_submodule(name, new)
    model.peftlab_quantize = kind
    return model


def quantize_kind(module: nn.Module) -> str | None:
    """'nf4' / 'int8' for a bitsandbytes quantized linear module, None for anything else (bitsandbytes is not
    imported for a model that never used it)."""
    name = type(module).__name__
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    if name == "Linear4bit" or name.endswith("4bit"):
        return "nf4"
    if name.startswith("Linear8bit"):
        return "int8"
    return None


def model_quantize(model: nn.Module) -> str | None:
    """The quantization a model was loaded with (None: full precision)."""
    return getattr(model, "peftlab_quantize", None)


def logical_numel(p: torch.Tensor) -> int:
    """How many values a parameter holds as the model uses it: a packed 4-bit weight stores two per byte, so its
    ``numel()`` is half its shape's; its quantization state knows the original shape."""
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(p, "bnb_quantized", True):
        return math.prod(state.shape)
    return p.numel()


def storage_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors occupy: parameters and buffers as stored, a 4-bit weight's block scales and code
    book and an 8-bit weight's row scales included. On the meta device, what they will occupy once quantized."""
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        kind = quantize_kind(m)
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if kind is not None and p is m.weight:
                total += _quantized_weight_bytes(p, kind, m.out_features, _row_scales(m))
            else:
                total += p.numel() * p.element_size()
        for b in m.buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                total += b.numel() * b.element_size()
    return total


def _row_scales(module: nn.Module) -> torch.Tensor | None:
    """An 8-bit weight's per-row scales: on the weight until its first forward, then moved to the layer's state."""
    scb = getattr(module.weight, "SCB", None)
    state = getattr(module, "state", None)
    return scb if scb is not None else getattr(state, "SCB", None)


def _quantized_weight_bytes(p: torch.Tensor, kind: str, out_features: int, scb: torch.Tensor | None) -> int:
    state = getattr(p, "quant_state", None)
    if kind == "nf4" and state is not None and p.device.type != "meta":
        extra = [state.absmax, state.code]
        if state.nested:
            extra += [state.state2.absmax, state.state2.code]
        return p.numel() * p.element_size() + sum(t.numel() * t.element_size() for t in extra)
    if kind == "int8" and scb is not None and p.device.type != "meta":
        return p.numel() * p.element_size() + scb.numel() * scb.element_size()
    n = logical_numel(p)  # on the meta device: what quantizing will store
    if kind == "nf4":
        return (n + 1) // 2 + math.ceil(n / NF4_BLOCK) * 4 + NF4_CODE_BYTES
    return n + out_features * 4


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight a quantized linear module computes with, through bitsandbytes' own dequantize
    (what DoRA's weight norm needs); a new tensor, never a view of the stored one."""
    bnb = bitsandbytes()
    w = module.weight
    if w.device.type == "meta":
        return torch.empty(module.out_features, module.in_features, device="meta")
    if quantize_kind(module) == "nf4":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    return (w.data.to(torch.float32) * _row_scales(module).to(torch.float32)[:, None]) / 127.0


def merge_refusal(module: nn.Module) -> str:
    """Why an adapter cannot merge into this quantized layer: re-quantizing W + ΔW would round most of a
    low-rank update away (it is far smaller than one NF4 step), so the merged model would not be the trained one."""
    kind = quantize_kind(module)
    return (
        f"cannot merge into a base quantized to {kind}: re-quantizing the merged weight would round the update away; "
        "run the adapter unmerged, or load the base without --quantize and merge there"
    )
