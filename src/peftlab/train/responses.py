"""Prompt → response examples as tensors: training batches whose loss covers the response only, and prompt batches to
generate from.

Decoders see ``prompt + response + EOS`` with the prompt's positions masked out of the labels (-100), padded on the
right (positions then start at 0 as they do when generating); prompts to generate from are padded on the left, so
that every row's next token follows its last real one. Encoder-decoders (T5) take the prompt as input and
``response + EOS`` as labels. A row with ``messages`` is rendered with the model's chat template, as is every prompt
with ``chat_template``.

Too long for ``max_length``: the prompt is cut from the left (its end, nearest the answer, stays) down to half the
limit, then the response is cut from the right; both are counted and reported, never silent.

Packing (:meth:`ResponseEncoder.pack`, decoders): a batch's examples are laid end to end in as few rows of
``max_length`` as fit, each with positions from 0 and no attention mask, so that transformers' causal mask keeps
them apart (it reads example boundaries off restarting ``position_ids`` when no mask is given); the loss covers the
same response tokens as the padded batch, so it is the same number, with less padding to compute.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from peftlab.errors import PeftlabError
from peftlab.train.tasks import GenExample, TaskInfo
from peftlab.train.tokens import TokenCache, TokenMemo

log = logging.getLogger("peftlab.train")


class ResponseEncoder:
    """Generative examples -> padded tensors (the :class:`peftlab.train.data.Encoder` of generative tasks; ``task``
    None: prompts to generate from, outside any task). ``cut``
    counts the distinct examples whose prompt or response ``max_length`` cut; ``elapsed`` is the time spent
    encoding."""

    seq2seq: bool

    def __init__(
        self,
        tokenizer: Any,
        task: TaskInfo | None,
        max_length: int,
        seq2seq: bool,
        cache: TokenCache | None = None,
        chat_template: bool = False,
        max_new_tokens: int | None = None,
    ) -> None:
        self.tok, self.task, self.max_length, self.seq2seq = tokenizer, task, max_length, seq2seq
        self.chat_template = chat_template
        if chat_template:
            self._check_template()
        #: the most tokens generated per prompt when scoring
        self.max_new_tokens = max_new_tokens or (task.generation.max_new_tokens if task and task.generation else 64)
        name = task.name if task is not None else ""
        self.memo = cache.memo(tokenizer, f"{name}|chat={chat_template}", max_length, seq2seq) if cache else None
        self.elapsed = 0.0
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None else pad
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise PeftlabError("generative training needs a tokenizer with an end-of-sequence token; this one has none")
        self.eos_id = eos
        self.cut: dict[str, set[tuple[str, str]]] = {"prompt": set(), "response": set()}
        self.seen: set[tuple[str, str]] = set()

    # -- text -> ids -------------------------------------------------------------------------------------------

    def render(self, row: GenExample) -> str:
        """The prompt as the model reads it: through the chat template for ``messages`` rows and with
        ``chat_template``, else as written."""
        messages = row.get("messages")
        if messages is None and not self.chat_template:
            return row["prompt"]
        self._check_template()
        turns = messages if messages is not None else [{"role": "user", "content": row["prompt"]}]
        return self.tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)

    def _check_template(self) -> None:
        if not getattr(self.tok, "chat_template", None):
            raise PeftlabError(
                "this model's tokenizer has no chat template: give prompt/response columns (without "
                "--chat-template) instead of a messages column"
            )

    def _prompt_ids(self, row: GenExample) -> list[int]:
        templated = row.get("messages") is not None or self.chat_template
        # a chat template writes its own special tokens (BOS included)
        return list(self.tok([self.render(row)], add_special_tokens=not templated)["input_ids"][0])

    def _response_ids(self, row: GenExample) -> list[int]:
        text = row["response"]
        if not self.seq2seq and not row["prompt"][-1:].isspace() and not text[:1].isspace():
            text = " " + text  # the word boundary a decoder's tokenizer expects after "Answer:"
        return [*self.tok([text], add_special_tokens=False)["input_ids"][0], self.eos_id]

    def _encode(self, row: GenExample) -> dict[str, list[int]]:
        """One example's ids and labels, cut to ``max_length`` (recorded in ``cut``)."""
        prompt, response = self._prompt_ids(row), self._response_ids(row)
        key = (row["prompt"], row["response"])
        self.seen.add(key)
        if self.seq2seq:
            if len(prompt) > self.max_length:
                prompt = prompt[-self.max_length :]
                self.cut["prompt"].add(key)
            if len(response) > self.max_length:
                response = response[: self.max_length]
                self.cut["response"].add(key)
            return {"input_ids": prompt, "labels": response}
        if len(prompt) + len(response) > self.max_length:
            keep = max(self.max_length - len(response), min(len(prompt), self.max_length // 2))
            if keep < len(prompt):
                prompt = prompt[-keep:]
                self.cut["prompt"].add(key)
            if len(prompt) + len(response) > self.max_length:
                response = response[: self.max_length - len(prompt)]
                self.cut["response"].add(key)
        return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}

    def _encoded(self, rows: list[GenExample]) -> list[dict[str, list[int]]]:
        if self.memo is None:
            return [self._encode(r) for r in rows]
        memo: TokenMemo = self.memo
        keys = [(r["prompt"], r["response"], r.get("messages") is not None) for r in rows]
        for key, row in zip(keys, rows, strict=True):
            if key in memo.ids:
                memo.hits += 1
            else:
                memo.misses += 1
                memo.ids[key] = self._encode(row)
        return [memo.ids[k] for k in keys]

    # -- batches -----------------------------------------------------------------------------------------------

    def __call__(self, rows: list[GenExample]) -> dict[str, torch.Tensor]:
        """A training batch: right-padded ids, attention mask, and labels that are -100 off the response."""
        start = time.perf_counter()
        encoded = self._encoded(rows)
        batch = _pad([e["input_ids"] for e in encoded], self.pad_id, left=False)
        batch["labels"] = _pad([e["labels"] for e in encoded], -100, left=False)["input_ids"]
        self.elapsed += time.perf_counter() - start
        return batch

    def pack(self, rows: list[GenExample]) -> tuple[dict[str, torch.Tensor], int]:
        """A training batch with the examples packed (first fit, longest first) into rows of at most ``max_length``
        tokens: ids, ``position_ids`` restarting at 0 for each example, labels (-100 off the responses and at each
        example's first token, which nothing in its own row predicts); and the number of real tokens."""
        if self.seq2seq:
            raise PeftlabError("packing is for decoders; an encoder-decoder (T5) reads each prompt on its own")
        start = time.perf_counter()
        encoded = sorted(self._encoded(rows), key=lambda e: -len(e["input_ids"]))
        packed: list[dict[str, list[int]]] = []
        for e in encoded:
            row = next((r for r in packed if len(r["input_ids"]) + len(e["input_ids"]) <= self.max_length), None)
            if row is None:
                row = {"input_ids": [], "labels": [], "position_ids": []}
                packed.append(row)
            row["input_ids"] += e["input_ids"]
            row["labels"] += [-100, *e["labels"][1:]]
            row["position_ids"] += list(range(len(e["input_ids"])))
        width = max(len(r["input_ids"]) for r in packed)
        batch = {
            # padding is one more example (positions from 0) whose labels are all -100
            key: torch.tensor([r[key] + fill(width - len(r[key])) for r in packed])
            for key, fill in (
                ("input_ids", lambda n: [self.pad_id] * n),
                ("labels", lambda n: [-100] * n),
                ("position_ids", lambda n: list(range(n))),
            )
        }
        self.elapsed += time.perf_counter() - start
        return batch, sum(len(e["input_ids"]) for e in encoded)

    def prompts(self, rows: list[GenExample], room: int = 0) -> dict[str, torch.Tensor]:
        """The prompts of ``rows`` to generate from: decoders padded on the left and cut from the left to leave
        ``room`` positions for the generated tokens within the model's limit (but never to less than half of it)."""
        start = time.perf_counter()
        limit = self.max_length if self.seq2seq else max(self.max_length - room, self.max_length // 2)
        ids = [self._prompt_ids(r)[-limit:] for r in rows]
        batch = _pad(ids, self.pad_id, left=not self.seq2seq)
        self.elapsed += time.perf_counter() - start
        return batch

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def report_cuts(self) -> dict[str, int]:
        """The number of distinct examples cut (and encoded: ``seen``), logged once per run when any were."""
        counts = {**{k: len(v) for k, v in self.cut.items()}, "seen": len(self.seen)}
        if counts["prompt"] or counts["response"]:
            log.warning(
                "max_length %d cut %d prompt(s) (from the left) and %d response(s) (from the right) of %d examples "
                "seen; raise --max-length to keep them whole",
                self.max_length,
                counts["prompt"],
                counts["response"],
                counts["seen"],
            )
        return counts


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + r if left else r + [pad_id] * (width - len(r)) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) if left else [1] * len(r) + [0] * (width - len(r)) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
