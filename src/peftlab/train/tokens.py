"""Token ids kept between runs: a search's trials tokenize the same examples again and again.

Per-example ids do not depend on the batch an example is tokenized in (no padding at that stage: padding is
per batch, afterwards), so an example's ids can be memoised and batches padded from the memo. A memo belongs to
one tokenizer object, task (its text-to-text prefix), input limit and model class; each example is found by its
text, so a split whose examples change (another ``k``, seed or file) never reads another example's ids.
"""

from __future__ import annotations

from typing import Any

#: an example's ids by key (input_ids, attention_mask, token_type_ids), as the tokenizer returns them
Encoded = dict[str, list[int]]
#: an example's identity for the memo: its text, text pair, and whether it was tokenized as a pair
TextKey = tuple[str, str | None, bool]


class TokenMemo:
    """The ids of the examples one encoder has tokenized; counts hits and misses."""

    def __init__(self) -> None:
        self.ids: dict[TextKey, Encoded] = {}
        self.hits = 0
        self.misses = 0


class TokenCache:
    """A worker's memos, one per (tokenizer, task, input limit, model class), for its latest tokenizer only (a worker
    searches one model). A memo holds its tokenizer, so the object's identity cannot pass to another while it lives."""

    def __init__(self) -> None:
        self._memos: dict[tuple[int, str, int, bool], tuple[Any, TokenMemo]] = {}

    def memo(self, tokenizer: Any, task: str, max_length: int, seq2seq: bool) -> TokenMemo:
        key = (id(tokenizer), task, max_length, seq2seq)
        held = self._memos.get(key)
        if held is None or held[0] is not tokenizer:
            self._memos = {k: v for k, v in self._memos.items() if v[0] is tokenizer}
            held = (tokenizer, TokenMemo())
            self._memos[key] = held
        return held[1]
