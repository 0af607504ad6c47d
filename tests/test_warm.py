"""Cheap trials: a worker's backbone lent to run after run in its loaded state, and token ids kept between runs."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from peftlab import methods
from peftlab.backbone.tokenize import get_tokenizer
from peftlab.train import TrainConfig, task_encoder, task_splits, train
from peftlab.train.tokens import TokenCache
from peftlab.train.warm import WarmStart

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")
#: record fields that measure the machine, not the result
TIMES = ("wall_time_s", "tokens_per_s", "peak_memory_bytes", "timings")


def _config(task: str = "sst2", **kw) -> TrainConfig:
    base = {
        "model": "shape:tiny-bert",
        "task": task,
        "data_dir": str(DATA),
        "k": 32,
        "dev_size": 16,
        "batch_size": 8,
        "max_length": 24,
        "max_steps": 6,
        "eval_every": 3,
        "progress": False,
    }
    return TrainConfig(**(base | kw))


def _result(record) -> dict:
    return {k: v for k, v in dataclasses.asdict(record).items() if k not in TIMES}


def test_a_reused_backbone_gives_the_records_of_fresh_loads() -> None:
    with_embeddings = dataclasses.replace(methods.lora(r=4), train_embeddings=True)
    trials = [  # each changes what the next must not see: weights, hooks, model switches, dropout, RNG
        (methods.full(), {}),
        (methods.lora(r=4), {}),
        (with_embeddings, {"dropout": 0.0}),
        (methods.prefix(length=4, hidden=16), {}),
        (methods.houlsby(size=8), {"seed": 1}),
        (methods.bitfit(), {"seed": 1, "gradient_checkpointing": True}),
        (methods.lora(r=4), {"seed": 1}),
    ]
    warm = WarmStart()
    served = []
    for spec, kw in trials:
        fresh = train(spec, _config(**kw))
        reused = train(spec, _config(**kw), warm=warm)
        served.append(warm.last)
        assert _result(reused) == _result(fresh), (spec.to_dict(), kw)
    # a new seed draws a new head: the backbone is loaded again then, and reused otherwise
    assert served == ["loaded", "reused", "reused", "reused", "loaded", "reused", "reused"]


def test_the_backbone_lent_again_is_as_loaded() -> None:
    warm = WarmStart()
    task, _ = task_splits(_config())
    torch.manual_seed(0)
    model, _ = warm.backbone("shape:tiny-bert", task)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    train(methods.full(), _config(dropout=0.0, lr=1e-2, gradient_checkpointing=True), warm=warm)
    torch.manual_seed(0)
    again, _ = warm.backbone("shape:tiny-bert", task)
    assert again is model and warm.last == "reused"
    assert all(torch.equal(v, loaded[k]) for k, v in again.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in again.parameters())
    assert {m.p for m in again.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    assert not again.is_activation_checkpointing
    assert not again.training and not any(m._forward_hooks or m._forward_pre_hooks for m in again.modules())


def test_cached_token_ids_give_the_batches_of_the_tokenizer() -> None:
    config = _config("rte", k=16)  # sentence pairs
    task, splits = task_splits(config)
    model, _ = WarmStart().backbone(config.model, task)
    plain = task_encoder(config.model, model, task, 24, False)
    cache = TokenCache()
    cached = task_encoder(config.model, model, task, 24, False, tokenizer=plain.tok, cache=cache)
    rows = splits.train
    for batch in (rows[:8], rows[4:12], rows[:8]):
        a, b = plain(batch), cached(batch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (cached.memo.misses, cached.memo.hits) == (12, 12)
    again = task_encoder(config.model, model, task, 24, False, tokenizer=plain.tok, cache=cache)
    again(rows[:8])
    assert again.memo is cached.memo and again.memo.hits == 20  # another run of the same worker: no tokenizing


def test_the_token_cache_is_keyed_by_tokenizer_task_and_length() -> None:
    config = _config("rte", k=16)
    task, splits = task_splits(config)
    sst2, _ = task_splits(_config())
    model, _ = WarmStart().backbone(config.model, task)
    tok = get_tokenizer(config.model, model)
    cache = TokenCache()
    memo = cache.memo(tok, task.name, 24, False)
    assert cache.memo(tok, task.name, 24, False) is memo
    assert cache.memo(tok, task.name, 16, False) is not memo  # another input limit
    assert cache.memo(tok, sst2.name, 24, False) is not memo  # another task (a text-to-text prefix differs)
    assert cache.memo(tok, task.name, 24, True) is not memo  # another model class
    other = get_tokenizer(config.model, model)
    assert cache.memo(other, task.name, 24, False) is not memo  # another tokenizer...
    assert cache.memo(tok, task.name, 24, False) is not memo  # ...replaces the first one's memos
    short = task_encoder(config.model, model, task, 8, False, tokenizer=tok, cache=cache)
    long = task_encoder(config.model, model, task, 24, False, tokenizer=tok, cache=cache)
    rows = splits.train[:4]
    assert short(rows)["input_ids"].shape[1] == 8 and long(rows)["input_ids"].shape[1] > 8
    changed = [{**r, "text": r["text"] + " and more words"} for r in rows]  # a split whose examples changed
    assert not torch.equal(long(changed)["input_ids"], long(rows)["input_ids"])
    assert long.memo.misses == 8
