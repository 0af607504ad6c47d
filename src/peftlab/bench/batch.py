"""The batches a measurement runs on (a synthetic batch, or the survey protocol's real ones) and what counts as their
tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.backbone.tokenize import get_tokenizer
from peftlab.bench import survey


def padded_batch(config: Any, batch: int, seq: int, seed: int, response: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded batch of random ids: row lengths drawn from [seq/4, seq], the first row full, so the
    padded width is ``seq`` and a fair share of it is padding that throughput must not count.

    ``response``: a generative batch instead of a classification one. A decoder's rows are their prompt (as above)
    followed by ``response`` tokens, the only ones with labels (the rest -100), so the padded width is ``seq +
    response``; an encoder-decoder's labels are ``response`` tokens. Without it, class labels (T5: two tokens, a
    label word)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    width = seq + (response if response and not encoder_decoder else 0)
    ids = torch.randint(3, config.vocab_size, (batch, width), generator=g)  # ids 0-2 hold pad/special tokens
    position = torch.arange(width)[None, :]
    total = lengths + (response if response and not encoder_decoder else 0)
    mask = (position < total[:, None]).long()
    out = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if encoder_decoder:
        out["labels"] = torch.randint(3, config.vocab_size, (batch, response or 2), generator=g)
    elif response:
        answer = (position >= lengths[:, None]) & (mask == 1)
        out["labels"] = out["input_ids"].masked_fill(~answer, -100)
    else:
        out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    return out


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens: what a throughput in tokens/s counts (padding is wasted work, not work)."""
    return int(batch["attention_mask"].sum())


def measured_batches(config: Any, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The microbatches of one measured step (``config``: a :class:`BenchConfig` or a worker's job): the survey
    protocol's real examples, else one synthetic batch repeated ``accumulate`` times."""
    if config.protocol == "survey":
        tokenizer = get_tokenizer(config.model, model)
        return survey.batches(tokenizer, config.task, config.data_dir, config.batch, config.seed)
    return [padded_batch(model.config, config.batch, config.seq, config.seed + 1, config.response)] * config.accumulate
