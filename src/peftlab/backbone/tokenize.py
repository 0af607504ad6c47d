"""Tokenizers for every model peftlab can name, offline.

Real checkpoints bring their own tokenizer (the packaged MiniLM's ``tokenizer.json``, the GGUF's
vocabulary). ``shape:`` models have none, so :class:`HashTokenizer` maps words to ids by a stable hash:
enough to train and measure a random-init model on real text without downloading anything.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoTokenizer

from peftlab.backbone.zoo import packaged_minilm, pretrained_source

_WORD = re.compile(r"\w+|[^\w\s]")


class HashTokenizer:
    """Words -> ids in [3, vocab) by a stable hash; 0 pad, 1 start/CLS, 2 separator/EOS. Decoding writes back the
    words seen in this process (so generated text of a ``shape:`` model can be scored against words)."""

    #: (vocabulary size, id) -> the latest word this process saw with it: what decode writes back for an id this
    #: tokenizer has not seen itself (ids are a function of the word, so tokenizers of one size share them)
    _words: ClassVar[dict[tuple[int, int], str]] = {}
    pad_token_id = 0
    bos_token_id = 1
    sep_token_id = 2
    eos_token_id = 2
    padding_side = "right"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
        self.vocab_size = vocab_size
        self._seen: dict[int, str] = {}  # this tokenizer's words by id: decode prefers them

    def _ids(self, text: str) -> list[int]:
        out = []
        for word in _WORD.findall(text.lower()):
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            out.append(3 + int.from_bytes(digest, "little") % (self.vocab_size - 3))
            self._seen[out[-1]] = word
            HashTokenizer._words[(self.vocab_size, out[-1])] = word
        return out

    def __call__(
        self,
        text: list[str],
        text_pair: list[str | None] | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        **_: Any,
    ) -> dict[str, list[list[int]]]:
        """Ids as a transformers tokenizer gives them: cut to ``max_length`` only when ``truncation`` is asked for (as
        there, no silent cut by default)."""
        pairs = text_pair or [None] * len(text)
        ids, types = [], []
        start, end = ([self.bos_token_id], [self.sep_token_id]) if add_special_tokens else ([], [])
        for a, b in zip(text, pairs, strict=True):
            first = [*start, *self._ids(a), *end]
            second = [*self._ids(b), *end] if b else []
            seq = (first + second)[:max_length] if truncation and max_length else first + second
            ids.append(seq)
            types.append(([0] * len(first) + [1] * len(second))[: len(seq)])
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": [[1] * len(s) for s in ids]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The words seen with these ids (this tokenizer's first, then any of the process's; an id never seen is
        written as ``<id>``), space-separated."""
        kept = [i for i in ids if not (skip_special_tokens and i < 3)]
        return " ".join(self._seen.get(i) or self._words.get((self.vocab_size, i), f"<{i}>") for i in kept)


def get_tokenizer(model_name: str, model: nn.Module):
    """The tokenizer that goes with a model named as :func:`peftlab.backbone.zoo.load_model` names it."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if model_name.startswith("shape:"):
        minilm = packaged_minilm()
        if model.config.model_type == "bert" and minilm is not None and vocab == 30522:
            return AutoTokenizer.from_pretrained(minilm)  # the same uncased BERT vocabulary
        return HashTokenizer(vocab)
    source, kw = pretrained_source(model_name)
    tok = AutoTokenizer.from_pretrained(source, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # decoders have no pad token; their EOS serves
    return tok


def pad_batch(rows: list[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest row of this batch, not to a fixed length."""
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list[list[int]]] = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        padded = []
        for r in rows:
            pad = [fill] * (width - len(r[key]))
            padded.append(pad + r[key] if left else r[key] + pad)
        out[key] = padded
    return {k: torch.tensor(v) for k, v in out.items()}
