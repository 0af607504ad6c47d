"""Text from a model and, optionally, a saved adapter: the routine behind ``peftlab generate`` and
:func:`peftlab.generate`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftlab.backbone.anatomy import model_type_facts
from peftlab.backbone.tokenize import get_tokenizer
from peftlab.backbone.zoo import load_model
from peftlab.core.peft_model import PeftModel
from peftlab.errors import PeftlabError
from peftlab.formats.loading import load
from peftlab.train.data import input_limit
from peftlab.train.environment import default_device
from peftlab.train.generation import Sampling, generate_texts
from peftlab.train.responses import ResponseEncoder
from peftlab.train.tasks import GenExample


def language_model(
    model_name: str, adapter: str | Path | None = None, merge: bool = False, quantize: str | None = None
) -> tuple[nn.Module, int]:
    """The model as a language model (decoders) or text-to-text model (T5), with ``adapter`` loaded (and its
    mergeable modules merged with ``merge``; refused on a ``quantize``-d base); returns it and the number of modules
    merged."""
    model = load_model(model_name, quantize=quantize)
    if model_type_facts(model.config.model_type).architecture == "encoder":
        raise PeftlabError(f"{model_name} is an encoder, which cannot generate: use a decoder or an encoder-decoder")
    if adapter is None:
        if merge:
            raise PeftlabError("--merge needs an --adapter to merge")
        return model, 0
    pm = load(model, adapter)
    merged = 0
    if merge:
        before = {k for k, m in pm.adapters[pm.active_adapter].all_modules() if m.merged}
        pm.merge()
        merged = sum(1 for k, m in pm.adapters[pm.active_adapter].all_modules() if m.merged and k not in before)
    return pm, merged


def generate(
    model: nn.Module | PeftModel,
    model_name: str,
    prompts: list[str] | list[GenExample],
    sampling: Sampling | None = None,
    batch_size: int = 8,
    chat_template: bool = False,
    max_length: int = 2048,
    seed: int = 0,
) -> list[str]:
    """What ``model`` (a backbone or a PeftModel built on ``model_name``) writes after each prompt: plain strings,
    or rows with ``messages`` (rendered with the chat template). Greedy unless ``sampling`` says to sample (seeded
    by ``seed``)."""
    sampling = sampling or Sampling()
    torch.manual_seed(seed)
    device = default_device()
    model.to(device)
    tokenizer = get_tokenizer(model_name, model.base_model if isinstance(model, PeftModel) else model)
    seq2seq = model_type_facts(model.config.model_type).seq2seq
    encoder = ResponseEncoder(tokenizer, None, input_limit(model, max_length), seq2seq, chat_template=chat_template)
    rows: list[GenExample] = [
        p if isinstance(p, dict) else {"prompt": p, "response": "", "reference": ""} for p in prompts
    ]
    return generate_texts(model, encoder, rows, batch_size, device, sampling)
