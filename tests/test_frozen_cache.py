"""The frozen-prefix activation cache: the layer it starts at, outputs and gradients identical to the uncached forward,
hits, invalidation, the byte budget, and training runs with ``cache_frozen``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from peftlab import apply, methods
from peftlab.backbone.zoo import load_model
from peftlab.core.peft_model import PeftModel
from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError
from peftlab.train import TrainConfig, enable_checkpointing, train
from peftlab.train.frozen import FrozenCache, FrozenPrefix
from peftlab.train.warm import WarmStart

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")
LAYERS = 4
SIZES = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


def _model(family: str = "bert", seed: int = 0) -> torch.nn.Module:
    """A four-layer random encoder without dropout (tiny-bert has two layers: too few to place k in the middle)."""
    torch.manual_seed(seed)
    if family == "roberta":
        cfg = RobertaConfig(**SIZES, intermediate_size=64, max_position_embeddings=66, **NO_DROPOUT)
        return RobertaForSequenceClassification(cfg)
    return BertForSequenceClassification(
        BertConfig(**SIZES, intermediate_size=64, max_position_embeddings=64, **NO_DROPOUT)
    )


def _lora(layers: str) -> Spec:
    lora = {"kind": "lora", "r": 4}
    return Spec.from_dict({"layers": {layers: {"q": lora, "v": lora}}})


def _adapter(layer: int) -> Spec:
    return Spec.from_dict({"layers": {str(layer): {"after_ffn": {"kind": "adapter", "size": 8}}}})


def _applied(spec: Spec, family: str = "bert") -> PeftModel:
    pm = apply(_model(family), spec)
    with torch.no_grad():  # zero-initialised halves (LoRA's B, adapters' up projection) would hide the modules
        for p in pm.adapters["default"].parameters():
            p.normal_(std=0.2)
    return pm


def _batch(seed: int = 1, rows: int = 4, length: int = 11) -> dict[str, torch.Tensor]:
    """A right-padded batch: rows of different lengths, two token types, labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, rows):
        mask[i, length - 2 * i :] = 0
    ids = ids * mask + (1 - mask)  # pad id 1 (RoBERTa's), after each row's tokens
    types = torch.zeros_like(ids)
    types[:, length // 2 :] = 1
    types *= mask
    labels = torch.arange(rows) % 2
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def _step(pm: PeftModel, batch: dict, frozen: FrozenPrefix | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits, loss and the adapter's gradients of one training forward and backward."""
    pm.train()
    pm.zero_grad(set_to_none=True)
    if frozen is None:
        out = pm(**batch)
    else:
        with frozen.feeding(batch):
            out = pm(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("spec", "layer"),
    [
        (_lora("2-3"), 2),
        (_lora("3"), 3),
        (_adapter(1), 1),
        (methods.prefix(length=3, hidden=8, layers=[2]), 2),  # a model-wide switch: prefix attention
        (methods.head(), LAYERS),  # nothing below the head: every layer's output is cached
        (Spec.from_dict({"layers": {"2": {"norm": {"kind": "ln"}}}}), 2),
        (Spec.from_dict({"layers": {"3": {"bias": {"kind": "bitfit"}}}, "model": {"final_norm": {"kind": "ln"}}}), 3),
    ],
)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_the_cached_forward_gives_the_uncached_logits_loss_and_gradients(spec: Spec, layer: int, family: str) -> None:
    pm = _applied(spec, family)
    frozen = FrozenPrefix(pm, FrozenCache(), budget_mb=16)
    assert frozen.layer == layer and frozen.active
    batch = _batch()
    plain = _step(pm, batch)
    first = _step(pm, batch, frozen)  # computes the states
    again = _step(pm, batch, frozen)  # reads them
    _same(plain, first)
    _same(plain, again)
    assert (frozen.misses, frozen.hits, frozen.kept) == (4, 4, 4)
    # the cached forward leaves the model as it was: the next plain forward is the same again
    assert not any("forward" in vars(b.module) for b in pm.blocks)
    _same(plain, _step(pm, batch))


def test_gradient_checkpointing_with_the_cache_gives_the_same_gradients() -> None:
    pm = _applied(_lora("2-3"))
    plain = _step(pm, _batch())
    enable_checkpointing(pm.base_model)
    frozen = FrozenPrefix(pm, FrozenCache(), budget_mb=16)
    _same(plain, _step(pm, _batch(), frozen))
    _same(plain, _step(pm, _batch(), frozen))
    assert frozen.hits == 4


def test_examples_are_found_in_any_batch_and_padding() -> None:
    pm = _applied(_lora("2-3"))
    frozen = FrozenPrefix(pm, FrozenCache(), budget_mb=16)
    batch = _batch(rows=4, length=11)
    _step(pm, batch, frozen)
    # the same examples, in another order and padded further: every one is a hit, and the outputs are the same
    order = torch.tensor([2, 0, 3, 1])
    other = {k: v[order] for k, v in batch.items()}
    pad = 5
    other["input_ids"] = torch.cat([other["input_ids"], torch.ones(4, pad, dtype=torch.long)], dim=1)
    other["attention_mask"] = torch.cat([other["attention_mask"], torch.zeros(4, pad, dtype=torch.long)], dim=1)
    other["token_type_ids"] = torch.cat([other["token_type_ids"], torch.zeros(4, pad, dtype=torch.long)], dim=1)
    hits = frozen.hits
    _same(_step(pm, other), _step(pm, other, frozen))
    assert frozen.hits == hits + 4


def test_predictions_from_the_cache_are_the_uncached_ones() -> None:
    pm = _applied(_adapter(2))
    frozen = FrozenPrefix(pm, FrozenCache(), budget_mb=16)
    batch = {k: v for k, v in _batch(rows=6).items() if k != "labels"}
    pm.eval()
    with torch.no_grad():
        plain = pm(**batch).logits
        for _ in range(2):
            with frozen.feeding(batch):
                torch.testing.assert_close(pm(**batch).logits, plain, rtol=1e-5, atol=1e-6)
    assert (frozen.misses, frozen.hits) == (6, 6)


@pytest.mark.parametrize(
    "spec",
    [
        methods.prompt(length=3),  # a hook on the whole model
        dataclasses.replace(_lora("3"), train_embeddings=True),  # the embedding table trains
        methods.full(),
        Spec.from_dict({"model": {"embed_norm": {"kind": "ln"}}}),  # the embeddings' norm, below every layer
        Spec.from_dict({"model": {"bias": {"kind": "bitfit"}}}),  # embedding biases among them
        _lora("0-3"),
    ],
    ids=["prompt", "embeddings", "full", "embed-norm", "model-bias", "layer-0"],
)
def test_specs_that_act_below_the_first_layer_run_uncached(spec: Spec) -> None:
    pm = _applied(spec)
    frozen = FrozenPrefix(pm, FrozenCache(), budget_mb=16)
    assert frozen.layer == 0 and not frozen.active
    batch = _batch()
    _same(_step(pm, batch), _step(pm, batch, frozen))
    assert frozen.cache.nbytes == 0 and (frozen.hits, frozen.misses) == (0, 0)


def test_a_spec_that_moves_below_k_gets_its_own_states() -> None:
    """The key holds k (and the weights below it): states entering layer 3 are never read as layer 1's."""
    cache, batch = FrozenCache(), _batch()
    pm = _applied(_lora("3"))
    upper = FrozenPrefix(pm, cache, budget_mb=16)
    _step(pm, batch, upper)
    assert (upper.misses, len(cache.tables)) == (4, 1)

    pm.delete_adapter("default")
    pm.add_adapter("default", _adapter(1))
    pm.set_adapter("default")
    lower = FrozenPrefix(pm, cache, budget_mb=16)
    assert lower.layer == 1 and lower.key != upper.key
    _same(_step(pm, batch), _step(pm, batch, lower))
    assert (lower.misses, lower.hits, len(cache.tables)) == (4, 0, 2)

    pm.delete_adapter("default")
    pm.add_adapter("default", _lora("3"))
    pm.set_adapter("default")
    back = FrozenPrefix(pm, cache, budget_mb=16)
    assert back.key == upper.key
    _step(pm, batch, back)
    assert (back.misses, back.hits) == (0, 4)  # layer 3's states are still there

    with torch.no_grad():  # another base: a weight below k changed
        pm.blocks[1].module.output.dense.weight.add_(0.01)
    changed = FrozenPrefix(pm, cache, budget_mb=16)
    assert changed.key != back.key
    _same(_step(pm, batch), _step(pm, batch, changed))
    assert changed.misses == 4


def test_the_byte_budget_bounds_the_cache() -> None:
    cache, batch = FrozenCache(), _batch(rows=8, length=16)
    pm = _applied(_lora("3"))
    first = FrozenPrefix(pm, cache, budget_mb=16)
    _step(pm, batch, first)
    one_table = cache.nbytes
    assert first.kept == 8 and one_table > 0

    pm.delete_adapter("default")
    pm.add_adapter("default", _lora("2"))
    pm.set_adapter("default")
    # room for about half of the examples: layer 3's table goes first, then the rest is computed on the fly
    budget = one_table * 0.55 / 2**20
    tight = FrozenPrefix(pm, cache, budget_mb=budget)
    plain = _step(pm, batch)
    _same(plain, _step(pm, batch, tight))
    assert len(cache.tables) == 1 and cache.nbytes <= budget * 2**20
    assert 0 < tight.kept < 8 and tight.kept + tight.over == 8
    _same(plain, _step(pm, batch, tight))  # the examples kept are hits, the others are computed again
    assert tight.hits == tight.kept and tight.misses == 16 - tight.kept

    nothing = FrozenPrefix(pm, FrozenCache(), budget_mb=0)
    _same(plain, _step(pm, batch, nothing))
    assert nothing.kept == 0 and nothing.over == 8 and nothing.cache.nbytes == 0


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
def test_models_other_than_encoders_are_refused_in_one_line(shape: str) -> None:
    head = {"tiny-t5": "seq2seq", "tiny-gpt2": "causal-lm"}.get(shape, "seq-cls")
    pm = apply(load_model(f"shape:{shape}", head=head), _lora("1"))
    with pytest.raises(PeftlabError, match=r"supports encoder models \(the bert family") as e:
        FrozenPrefix(pm, FrozenCache(), budget_mb=16)
    assert "\n" not in str(e.value)


def _config(**kw) -> TrainConfig:
    base = {
        "model": "shape:tiny-bert",
        "task": "sst2",
        "data_dir": str(DATA),
        "k": 48,
        "dev_size": 24,
        "batch_size": 8,
        "max_length": 32,
        "max_steps": 18,  # three epochs
        "eval_every": 6,
        "lr": 1e-2,
        "dropout": 0.0,
        "progress": False,
    }
    return TrainConfig(**(base | kw))


#: record fields that measure the machine (or the cache), not the result
MEASURED = ("wall_time_s", "tokens_per_s", "peak_memory_bytes", "timings", "cache", "config")


def _scores(record) -> dict:
    return {k: v for k, v in dataclasses.asdict(record).items() if k not in MEASURED}


def _close(a: dict, b: dict) -> None:
    """Records equal, floats up to the rounding of states computed in differently padded batches."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        elif isinstance(a[key], dict):
            _close(a[key], b[key])
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], dict):
            for x, y in zip(a[key], b[key], strict=True):
                _close(x, y)
        else:
            assert a[key] == b[key], key


@needs_data
@pytest.mark.parametrize("spec", [_lora("1"), methods.head()], ids=["lora-layer-1", "head"])
def test_a_cached_run_scores_as_the_uncached_run_at_dropout_0(spec: Spec) -> None:
    plain = train(spec, _config())
    cached = train(spec, _config(cache_frozen=True))
    _close(_scores(plain), _scores(cached))
    assert plain.cache is None and "cache_s" not in plain.timings
    layer = 1 if spec.layers else 2
    assert cached.cache["layer"] == layer and cached.timings["cache_s"] > 0
    # 48 train + 24 dev examples computed once; then 3 epochs, 3 evaluations and the test split (uncached)
    assert cached.cache["misses"] == 48 + 24 and cached.cache["kept"] == 48 + 24
    assert cached.cache["hits"] == 3 * 48 - 48 + 3 * 24 - 24


@needs_data
def test_a_workers_runs_share_the_cache_and_score_as_fresh_runs() -> None:
    warm = WarmStart()
    first = train(_lora("1"), _config(cache_frozen=True), warm=warm)
    second = train(_adapter(1), _config(cache_frozen=True), warm=warm)
    assert warm.last == "reused"
    assert first.cache["misses"] == 48 + 24 and second.cache["misses"] == 0  # the second run found every example
    _close(_scores(second), _scores(train(_adapter(1), _config())))
    prompt = train(methods.prompt(length=2), _config(cache_frozen=True), warm=warm)
    assert prompt.cache["layer"] == 0 and prompt.cache["hits"] == prompt.cache["misses"] == 0


def test_a_negative_cache_budget_is_refused() -> None:
    with pytest.raises(PeftlabError, match="cache_frozen_mb must be a number >= 0"):
        TrainConfig(model="shape:tiny-bert", task="sst2", cache_frozen=True, cache_frozen_mb=-1).check()
