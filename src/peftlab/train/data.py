"""From a task to batches: the task's splits (built-in or the user's files), the model class it needs, and the
encoder that turns examples into padded tensors."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from peftlab.backbone.anatomy import model_type_facts
from peftlab.backbone.tokenize import get_tokenizer, pad_batch
from peftlab.backbone.zoo import CHECKPOINTS, SHAPES, load_model
from peftlab.errors import PeftlabError
from peftlab.train.config import TrainConfig
from peftlab.train.generative import Generation
from peftlab.train.responses import ResponseEncoder
from peftlab.train.tasks import (
    Example,
    Row,
    Splits,
    TaskInfo,
    get_task,
    load_user_data,
    load_user_responses,
    make_splits,
)
from peftlab.train.tokens import Encoded, TokenCache, TokenMemo


class Encoder:
    """Examples -> padded tensors for the model class (classifier labels, or text targets for T5). With a
    ``cache``, each example is tokenized once per worker; ``elapsed`` is the time spent encoding (a run reports it)."""

    def __init__(
        self,
        tokenizer: Any,
        task: TaskInfo,
        max_length: int,
        seq2seq: bool,
        left_pad: bool,
        cache: TokenCache | None = None,
    ) -> None:
        self.tok, self.task, self.max_length = tokenizer, task, max_length
        self.seq2seq, self.left_pad = seq2seq, left_pad
        self.memo = cache.memo(tokenizer, task.name, max_length, seq2seq) if cache is not None else None
        self.elapsed = 0.0
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None else pad
        if seq2seq:
            words = task.label_names or ("score",)
            self.targets = [self._target_ids(w) for w in words]

    def _target_ids(self, text: str) -> list[int]:
        return self.tok([text], truncation=True, max_length=16)["input_ids"][0]

    def label_text(self, label: float | int) -> str:
        return self.task.label_names[int(label)] if self.task.label_names else f"{float(label):.1f}"

    def _encode(self, rows: list[Example], paired: bool) -> list[Encoded]:
        """Each example's ids, unpadded (the same whatever other examples it is tokenized with); ``paired``: as
        pairs, a missing second text empty (as when any example of the batch has one)."""
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows]
        if self.seq2seq:
            name = self.task.name.split("/")[-1]
            texts = [f"{name} {a}" + (f" | {b}" if b else "") for a, b in zip(texts, pairs, strict=True)]
            enc = self.tok(texts, truncation=True, max_length=self.max_length)
        elif paired:
            enc = self.tok(texts, [p or "" for p in pairs], truncation=True, max_length=self.max_length)
        else:
            enc = self.tok(texts, truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(rows))]

    def _memoised(self, rows: list[Example], memo: TokenMemo) -> list[Encoded]:
        """:meth:`_encode` through the memo: only examples it has not seen are tokenized."""
        paired = _paired(rows)
        keys = [(r["text"], r["text_pair"], paired) for r in rows]
        new = {k: r for k, r in zip(keys, rows, strict=True) if k not in memo.ids}
        memo.misses += len(new)
        memo.hits += len(rows) - len(new)
        if new:
            memo.ids.update(zip(new, self._encode(list(new.values()), paired), strict=True))
        return [memo.ids[k] for k in keys]

    def __call__(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        encoded = self._encode(rows, _paired(rows)) if self.memo is None else self._memoised(rows, self.memo)
        batch = pad_batch(encoded, self.pad_id, self.left_pad)
        if self.seq2seq:
            targets = [self._target_ids(self.label_text(r["label"])) if r["label"] is not None else [0] for r in rows]
            labels = pad_batch([{"input_ids": t} for t in targets], -100)["input_ids"]
            batch["labels"] = labels
        elif rows[0]["label"] is not None:
            dtype = torch.float if self.task.is_regression else torch.long
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        self.elapsed += time.perf_counter() - start
        return batch


def _paired(rows: list[Example]) -> bool:
    return any(r["text_pair"] is not None for r in rows)


def input_limit(model: nn.Module, wanted: int) -> int:
    """``wanted`` capped at the model's position table (less the rows RoBERTa reserves for padding)."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is None:
        return wanted
    return min(wanted, limit - model_type_facts(cfg.model_type).position_offset(cfg))


def task_encoder(
    model_name: str,
    model: nn.Module,
    task: TaskInfo,
    max_length: int,
    seq2seq: bool,
    tokenizer: Any | None = None,
    cache: TokenCache | None = None,
    chat_template: bool = False,
    max_new_tokens: int | None = None,
) -> Encoder | ResponseEncoder:
    """The tokenizer-backed encoder for a model and task (``tokenizer``: one already loaded for the model); gives
    the model a pad token id if it lacks one. Decoders classify from their last position, so their classification
    batches are padded on the left; generative tasks have their own encoder."""
    tokenizer = tokenizer if tokenizer is not None else get_tokenizer(model_name, model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(tokenizer, "pad_token_id", 0)
    if task.generative:
        limit = input_limit(model, max_length)
        return ResponseEncoder(tokenizer, task, limit, seq2seq, cache, chat_template, max_new_tokens)
    decoder_only = not seq2seq and model_type_facts(model.config.model_type).decoder_only
    return Encoder(tokenizer, task, input_limit(model, max_length), seq2seq, left_pad=decoder_only, cache=cache)


def text_length(row: Row) -> int:
    """A tokenizer-free length proxy (characters) for grouping examples of similar length."""
    if "prompt" in row:
        return len(row["prompt"]) + len(row["response"])
    return len(row["text"]) + len(row["text_pair"] or "")


def batches(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Shuffled batches; with ``lengths``, batches of similar length (as transformers' ``group_by_length``):
    shuffle, sort within mega-batches of 50 batches, shuffle the batches. Less padding, same examples."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    mega = 50 * batch_size
    order = [i for s in range(0, n, mega) for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def user_task(config: TrainConfig) -> tuple[TaskInfo, Splits]:
    """A task made of the user's own CSV / TSV / JSONL files: classification when the labels are integers
    or named, regression when they are floats; dev is held out from the train file, test is ``test_file``
    (or, without one, the dev split)."""

    def read(path: str) -> list[Example]:
        return load_user_data(
            path, config.text_column, config.label_column, config.text_pair_column, config.label_names
        )

    generative = bool(config.prompt_column or config.response_column or config.messages_column)
    pool = user_responses(config, config.train_file) if generative else read(config.train_file)
    info = _user_generative(config) if generative else _user_classification(config, pool)
    n_dev = min(1000, len(pool) // 5) if config.dev_size is None else config.dev_size
    if n_dev < 1:
        raise PeftlabError(
            f"{config.train_file}: {len(pool)} example(s) leave an empty dev split (a fifth is held out for dev by "
            "default): give at least 5 examples, or set --dev-size"
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.data_seed)).tolist()
    dev = [pool[i] for i in order[:n_dev]]
    rest = [pool[i] for i in order[n_dev:]]
    train_rows = rest if config.k is None else rest[: config.k]
    if not train_rows:
        raise PeftlabError(f"{config.train_file}: no examples left to train on after holding out {n_dev} for dev")
    if config.test_file:
        test = user_responses(config, config.test_file) if generative else read(config.test_file)
    else:
        test = dev
    return info, Splits(train=train_rows, dev=dev, test=test)


def uses_chat_template(config: TrainConfig) -> bool:
    """Whether prompts go through the model's chat template: asked for, or chat turns to render."""
    return config.chat_template or bool(config.messages_column)


def user_responses(config: TrainConfig, path: str) -> list[Row]:
    """A generative user file's examples, by the config's columns."""
    return load_user_responses(
        path, config.prompt_column or "prompt", config.response_column or "response", config.messages_column
    )


def _user_generative(config: TrainConfig) -> TaskInfo:
    """The task of a user's prompt → response file, scored by ``eval_metric``."""
    generation = Generation(prompt=lambda r: r["prompt"], response=lambda r: r["response"], scoring=config.eval_metric,
                            max_new_tokens=128)  # fmt: skip
    return _user_info(config, None, generation.metrics, generation.metrics[0], generation)


def _user_info(
    config: TrainConfig,
    names: tuple[str, ...] | None,
    metrics: tuple[str, ...],
    main: str,
    generation: Generation | None = None,
) -> TaskInfo:
    return TaskInfo(
        name=f"user/{config.task}",
        text_fields=("text",),
        label_names=names,
        metrics=metrics,
        main_metric=main,
        local_dir="",
        local_files={},
        hub_id="",
        hub_config="",
        hub_splits={},
        generation=generation,
    )


def _user_classification(config: TrainConfig, pool: list[Example]) -> TaskInfo:
    """The task of a user's labelled file: classification when the labels are integers or named, regression when
    they are floats."""
    regression = isinstance(pool[0]["label"], float)
    if config.label_names:
        names = tuple(config.label_names)
    elif regression:
        names = None
    else:
        names = tuple(str(i) for i in range(int(max(ex["label"] for ex in pool)) + 1))
    binary = names is not None and len(names) == 2
    metrics = ("pearson", "spearman") if regression else ("accuracy", "f1" if binary else "macro_f1")
    return _user_info(config, names, metrics, metrics[0 if not regression else 1])


def task_splits(config: TrainConfig) -> tuple[TaskInfo, Splits]:
    """The task and its train / dev / test splits: the user's files, or a built-in task."""
    if config.train_file:
        return user_task(config)
    task = get_task(config.task)
    return task, make_splits(task.name, config.data_dir, config.k, config.data_seed, config.dev_size)


def load_for_task(
    model_name: str, task: TaskInfo, meta: bool = False, quantize: str | None = None
) -> tuple[nn.Module, bool]:
    """The backbone in the class the task needs: T5 text-to-text, generative tasks a language model, everything
    else a classifier."""
    if model_name.startswith("shape:") and model_name[6:] in SHAPES:
        model_type = SHAPES[model_name[6:]].model_type
    elif model_name in CHECKPOINTS:
        model_type = CHECKPOINTS[model_name].model_type
    else:
        model_type = AutoConfig.from_pretrained(model_name).model_type
    facts = model_type_facts(model_type)
    if task.generative and facts.architecture == "encoder":
        raise PeftlabError(
            f"{task.name} is a generation task and {model_name} an encoder, which cannot generate: use a decoder "
            "(e.g. smollm2-135m) or an encoder-decoder (T5)"
        )
    head = facts.default_head if task.generative else facts.task_head
    model = load_model(model_name, head=head, num_labels=task.num_labels, meta=meta, quantize=quantize)
    return model, facts.seq2seq
