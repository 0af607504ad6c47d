"""The synthetic batch every measurement runs on, and what counts as its tokens."""

from __future__ import annotations

from typing import Any

import torch


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
