"""Design spaces (S4) and search spaces (AutoPEFT): group patterns, budgets, encodings, space files."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from conftest import logits, make_batch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
    T5Config,
)

import peftlab
from peftlab import Spec, methods
from peftlab.errors import PeftlabError, SpecError
from peftlab.space import (
    ALLOCATIONS,
    GROUPINGS,
    S4_CHOICE,
    Backbone,
    DesignChoice,
    DesignSpace,
    LayerSpace,
    SearchSpace,
    allocation_weights,
    design_spec,
    group_sizes,
    load_space,
    log2_choices,
)


def _holds(sizes: list[int], pattern: str) -> bool:
    pairs = list(itertools.pairwise(sizes))
    ends, middle = (sizes[0], sizes[-1]), set(sizes[1:-1])
    return {
        "increasing": all(a < b for a, b in pairs),
        "decreasing": all(a > b for a, b in pairs),
        "uniform": max(sizes) - min(sizes) <= 1,
        "spindle": len(middle) == 1 and all(e < min(middle) for e in ends),
        "bottleneck": len(middle) == 1 and all(e > min(middle) for e in ends),
    }[pattern]


def _splits(n: int, g: int):
    for cuts in itertools.combinations(range(1, n), g - 1):
        yield [b - a for a, b in itertools.pairwise((0, *cuts, n))]


@pytest.mark.parametrize("groups", [3, 4])
def test_grouping_patterns_sum_to_depth_and_hold_exactly_when_possible(groups: int) -> None:
    for n in range(groups, 27):
        for pattern in GROUPINGS:
            possible = any(_holds(s, pattern) for s in _splits(n, groups))
            if not possible:
                with pytest.raises(SpecError, match=f"no split of {n} layers"):
                    group_sizes(n, pattern, groups)
                continue
            sizes = group_sizes(n, pattern, groups)
            assert sum(sizes) == n and min(sizes) >= 1 and len(sizes) == groups
            assert _holds(sizes, pattern), (n, pattern, sizes)


def test_grouping_examples_and_errors() -> None:
    assert group_sizes(12, "spindle") == [2, 4, 4, 2]
    assert group_sizes(24, "spindle") == [5, 7, 7, 5]
    assert group_sizes(12, "bottleneck") == [4, 2, 2, 4]
    assert group_sizes(12, "increasing") == [1, 2, 4, 5]
    assert group_sizes(12, "decreasing") == [5, 4, 2, 1]
    assert group_sizes(12, "uniform") == [3, 3, 3, 3]
    with pytest.raises(SpecError, match=r"spindle.*patterns that fit: uniform, bottleneck"):
        group_sizes(7, "spindle")
    with pytest.raises(SpecError, match="cannot split 3 layers into 4"):
        group_sizes(3, "uniform")
    with pytest.raises(SpecError, match="at least 3 groups"):
        group_sizes(12, "spindle", groups=2)
    with pytest.raises(SpecError, match="unknown grouping pattern"):
        group_sizes(12, "hourglass")


def test_allocation_weights() -> None:
    assert allocation_weights(4, "increasing") == [1, 2, 3, 4]
    assert allocation_weights(4, "decreasing") == [4, 3, 2, 1]
    assert allocation_weights(4, "uniform") == [1, 1, 1, 1]


@pytest.fixture(scope="module")
def bert_base() -> Backbone:
    return Backbone.of("shape:bert-base")


def _trainable(spec: Spec, model: str = "shape:bert-base"):
    """(trainable parameters without the task head, backbone parameters), counted by peftlab."""
    c = peftlab.apply(peftlab.load_model(model, meta=True), spec).counts()
    head = c.per_kind.get("head")
    return c.trainable_params - (head.trainable if head else 0), c.backbone_params


CHOICES = [
    S4_CHOICE,
    DesignChoice(
        "increasing",
        "increasing",
        (2, 4),
        (("adapter",), ("lora", "bitfit"), ("prefix",), ("prefix", "bitfit", "lora")),
    ),
    DesignChoice("bottleneck", "decreasing", (1, 3), (("lora",), ("adapter",), ("adapter", "prefix"), ("lora",))),
    DesignChoice("uniform", "uniform", (1, 2, 3, 4), (("parallel",), ("ia3", "adapter"), ("ln", "prefix"), ("lora",))),
]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: f"{c.grouping}-{c.allocation}")
@pytest.mark.parametrize("budget", [0.005, 0.02])
def test_allocation_meets_the_budget_by_real_counting(bert_base: Backbone, choice: DesignChoice, budget: float) -> None:
    spec = design_spec(choice, bert_base, budget)
    trainable, backbone = _trainable(spec)
    assert backbone == bert_base.params
    assert abs(trainable - budget * backbone) <= 0.01 * budget * backbone
    # The costs the allocation used are exactly what the counting code counts.
    per_layer = spec.resolve(12, ["layers"] * 12)
    assert trainable == sum(bert_base.cost(i, site, s) for i, sites in per_layer.items() for site, s in sites.items())
    # Layers of untuned groups get nothing; uniform allocation gives a group's layers sizes within one.
    groups = [range(a, b) for a, b in itertools.pairwise(itertools.accumulate([0, *group_sizes(12, choice.grouping)]))]
    for g, layers in enumerate(groups, 1):
        assert all(bool(per_layer[i]) == (g in choice.tuned) for i in layers)
        if choice.allocation == "uniform" and g in choice.tuned:
            sizes = [s.size for i in layers for s in per_layer[i].values() if s.kind == "adapter"]
            assert not sizes or max(sizes) - min(sizes) <= 1


def test_increasing_allocation_grows_with_depth(bert_base: Backbone) -> None:
    choice = DesignChoice("uniform", "increasing", (1, 2, 3, 4), (("adapter",),) * 4)
    per_layer = design_spec(choice, bert_base).resolve(12, ["layers"] * 12)
    sizes = [per_layer[i]["after_ffn"].size for i in range(12)]
    assert sizes == sorted(sizes) and sizes[-1] > 5 * sizes[0]


def _tiny(family: str):
    """Small random models with 10 blocks, the fewest that every grouping pattern fits."""
    if family == "bert":
        config = BertConfig(
            num_hidden_layers=10,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=128,
            max_position_embeddings=64,
        )
        return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()
    if family == "llama":
        config = LlamaConfig(
            num_hidden_layers=10,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=128,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    config = T5Config(
        num_layers=5,
        num_decoder_layers=5,
        d_model=32,
        num_heads=4,
        d_kv=8,
        d_ff=64,
        vocab_size=128,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine waiting for them costs seconds a pass."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
@pytest.mark.usefixtures("one_thread")
def test_sampled_specs_apply_and_run(family: str) -> None:
    model = _tiny(family)
    batch = make_batch(model)
    space = DesignSpace.for_model(model, budget=0.05)
    assert space.groupings == GROUPINGS
    assert ("bitfit" in {s.name for s in space.strategies}) == (family == "bert")  # Llama and T5 have no biases
    specs = space.sample(4, random.Random(0))
    specs += LayerSpace.autopeft(10, 32).sample(3, rng=1)
    pm = peftlab.apply(model, specs[0])
    for k, spec in enumerate(specs):
        assert all(key.isdigit() or key.split("-")[0].isdigit() for key in spec.layers)  # explicit selectors
        if k:
            pm.add_adapter(f"s{k}", spec)
            pm.set_adapter(f"s{k}")
        assert logits(pm, batch).isfinite().all()


def test_design_space_json_round_trip_and_stages(bert_base: Backbone) -> None:
    space = DesignSpace.for_model(bert_base)
    assert space.size == 5 * 3 * 15 * 15**4 == space.size
    again = SearchSpace.from_dict(json.loads(space.to_json()), bert_base)
    assert again == space and again.to_dict() == space.to_dict()
    assert space.stages() == [
        "grouping",
        "allocation",
        "tuned",
        "strategies_g1",
        "strategies_g2",
        "strategies_g3",
        "strategies_g4",
    ]
    for stage in space.stages():
        candidates = space.candidates(stage)
        assert sum(c.size for c in candidates) == space.size
        assert all(SearchSpace.from_dict(c.to_dict(), bert_base) == c for c in candidates)
    spindle = space.candidates("grouping")[GROUPINGS.index("spindle")]
    for vector in (spindle.random_vector(k) for k in range(5)):
        assert spindle.choice(vector).grouping == "spindle"
    # Without a model the space is still data; specs need the model's costs.
    bare = SearchSpace.from_dict(space.to_dict())
    assert bare == space
    with pytest.raises(SpecError, match="no model"):
        bare.sample(1)


def test_design_choice_encoding(bert_base: Backbone) -> None:
    space = DesignSpace.for_model(bert_base)
    vector = space.encode(S4_CHOICE)
    assert space.choice(vector) == S4_CHOICE
    assert space.decode(vector) == design_spec(S4_CHOICE, bert_base)
    config = {
        "grouping": "spindle",
        "allocation": "uniform",
        "tuned": [4, 3, 2, 1],
        "strategies_g1": "lora+adapter",
        "strategies_g2": ["adapter", "prefix"],
        "strategies_g3": "adapter+prefix+bitfit",
        "strategies_g4": "prefix+bitfit+lora",
    }
    assert space.encode(config) == vector
    with pytest.raises(SpecError, match="grouping: 'hourglass' is not a choice"):
        space.encode(config | {"grouping": "hourglass"})
    with pytest.raises(SpecError, match="not a set of strategies"):
        space.encode(config | {"strategies_g1": "adapter+dora"})


def test_s4_preset_hits_half_a_percent() -> None:
    spec = methods.s4(24, "shape:t5-base", bitfit=False)
    trainable, backbone = _trainable(spec, "shape:t5-base")
    assert 0.00495 <= trainable / backbone <= 0.00505
    assert spec.kinds() == {"adapter", "prefix", "lora"} and spec.method == "s4"
    spec = methods.s4(12, "shape:bert-base")
    trainable, backbone = _trainable(spec)
    assert 0.00495 <= trainable / backbone <= 0.00505
    per_layer = spec.resolve(12, ["layers"] * 12)
    assert [sorted(s.kind for s in per_layer[i].values()) for i in (0, 2, 6, 10)] == [
        ["adapter", "lora", "lora"],
        ["adapter", "prefix"],
        ["adapter", "bitfit", "prefix"],
        ["bitfit", "lora", "lora", "prefix"],
    ]
    assert Spec.from_json(spec.to_json()) == spec
    assert methods.MODEL_METHODS["s4"].make(12, "shape:bert-base") == spec


def test_s4_preset_errors() -> None:
    with pytest.raises(SpecError, match="bitfit=False"):
        methods.s4(24, "shape:t5-base")
    with pytest.raises(SpecError, match="num_layers=12 but the model has 24 blocks"):
        methods.s4(12, "shape:t5-base", bitfit=False)


def test_autopeft_space_matches_the_paper(bert_base: Backbone) -> None:
    space = load_space("autopeft", bert_base)
    assert log2_choices(768) == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    assert space.size == 5_451_776  # 2^12 x 11^3, the paper's count for BERT-base
    assert LayerSpace.autopeft(24, 1024).size == 2**24 * 12**3  # "~3 x 10^10" for RoBERTa-large
    dims = space.dimensions()
    assert [d.name for d in dims] == [f"layer_{i}" for i in range(12)] + ["serial", "parallel", "prefix"]
    assert space.size == len(dims[0].choices) ** 12 * len(dims[-1].choices) ** 3
    assert json.loads(json.dumps([d.to_dict() for d in dims]))[-1]["choices"][-1] == 512


def test_autopeft_encode_decode_round_trip(bert_base: Backbone) -> None:
    space = load_space("autopeft", bert_base)
    rng = random.Random(3)
    checked = 0
    while checked < 30:
        vector = space.random_vector(rng)
        spec = space.decode(vector)
        if not spec.layers:
            continue  # "nothing placed" has one canonical point: all zeros
        assert space.encode(spec) == vector
        again = space.decode(space.encode(Spec.from_json(spec.to_json())))
        assert again.resolve(12, ["layers"] * 12) == spec.resolve(12, ["layers"] * 12)
        checked += 1
    config = {f"layer_{i}": int(i in (1, 2, 3, 7)) for i in range(12)} | {"serial": 64, "parallel": 0, "prefix": 8}
    spec = space.decode(space.encode(config))
    assert list(spec.layers) == ["1-3", "7"]
    assert spec.layers["7"]["after_ffn"].size == 64 and spec.layers["7"]["attn"].length == 8
    assert space.encode(spec) == space.encode(config)
    assert space.encode(Spec()) == [0.0] * 15


def test_autopeft_errors(bert_base: Backbone) -> None:
    space = load_space("autopeft", bert_base)
    with pytest.raises(SpecError, match="not in this space"):
        space.encode(methods.lora())
    with pytest.raises(SpecError, match="not in this space"):
        space.encode(methods.pfeiffer(48))  # 48 is not on the log scale
    with pytest.raises(SpecError, match="has 15 values, got 3"):
        space.decode([0, 1, 2])
    with pytest.raises(SpecError, match="outside 0-10"):
        space.decode([1.0] * 12 + [11, 0, 0])
    with pytest.raises(PeftlabError, match="depends on the model"):
        load_space("autopeft")


USER_SPACE = {
    "type": "layers",
    "layers": [0, 1],
    "modules": [
        {
            "name": "lora",
            "kind": "lora",
            "sites": ["q", "v"],
            "size": "r",
            "choices": [0, 4, 8],
            "settings": {"alpha": 8.0},
        },
        {"name": "adapter", "kind": "adapter", "sites": ["after_ffn"], "size": "size", "choices": [0, 16]},
        {"name": "bitfit", "kind": "bitfit", "sites": ["bias"], "choices": [0, 1]},
    ],
}


def test_user_space_file_loads(tmp_path) -> None:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(USER_SPACE))
    model = peftlab.load_model("shape:tiny-bert")
    space = SearchSpace.from_file(path, model)
    assert isinstance(space, LayerSpace) and space.num_layers == 2
    assert [(d.name, d.type, len(d.choices)) for d in space.dimensions()] == [
        ("layer_0", "bool", 2),
        ("layer_1", "bool", 2),
        ("lora", "ordinal", 3),
        ("adapter", "ordinal", 2),
        ("bitfit", "ordinal", 2),
    ]
    assert space.size == 2 * 2 * 3 * 2 * 2
    spec = space.decode([1, 1, 2, 0, 1])
    assert spec.layers["0-1"]["q"].r == 8 and spec.layers["0-1"]["q"].alpha == 8.0 and "bias" in spec.layers["0-1"]
    peftlab.apply(model, spec)
    assert SearchSpace.from_dict(space.to_dict()) == space
    # num_layers from the file alone; the same space as YAML when PyYAML is there.
    path.write_text(json.dumps(USER_SPACE | {"num_layers": 2}))
    assert SearchSpace.from_file(path) == space
    yaml = pytest.importorskip("yaml")
    yaml_path = tmp_path / "space.yaml"
    yaml_path.write_text(yaml.safe_dump(USER_SPACE | {"num_layers": 2}))
    assert load_space(yaml_path) == space


def _module(**changes) -> dict:
    return {"type": "layers", "num_layers": 2, "modules": [USER_SPACE["modules"][0] | changes]}


BAD_SPACES = [
    ("{", "not valid JSON"),
    ("[]", "must be a JSON object"),
    (json.dumps({"type": "grid", "num_layers": 2}), "unknown space type 'grid'"),
    (json.dumps(USER_SPACE | {"num_layers": 2, "depth": 3}), "unknown field(s) depth"),
    (json.dumps({"num_layers": 2, "modules": []}), "'modules' must be a non-empty list"),
    (json.dumps(USER_SPACE), "num_layers is missing"),
    (json.dumps(USER_SPACE | {"num_layers": 2, "layers": [0, 5]}), "layers must be indices in 0-1"),
    (json.dumps(_module(kind="loraa")), "unknown module kind 'loraa'"),
    (json.dumps(_module(sites=["after_ffn"])), "cannot sit at 'after_ffn'"),
    (json.dumps(_module(size="rank")), "no integer setting 'rank'"),
    (json.dumps(_module(choices=[0, "8"])), "choices must be a non-empty list of integers"),
    (json.dumps(_module(choices=[8, 4])), "increasing without repeats"),
    (json.dumps(_module(choices=[0, 5000])), "r must be an integer in [1, 4096]"),
    (json.dumps(_module(settings={"alpha": -1})), "alpha must be a number > 0.0"),
    (json.dumps({"num_layers": 2, "modules": [USER_SPACE["modules"][2] | {"choices": [0, 2]}]}), "0 (off) and 1"),
    (json.dumps({"type": "s4", "num_layers": 7, "groupings": ["spindle"]}), "no split of 7 layers"),
    (json.dumps({"type": "s4", "num_layers": 12, "strategies": ["adapter", "lora2"]}), "unknown strategy 'lora2'"),
    (json.dumps({"type": "s4", "num_layers": 12, "budget": 5}), "budget is a fraction"),
    (json.dumps({"type": "s4", "num_layers": 12, "tuned": [[0, 1]]}), "distinct group numbers 1-4"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SPACES, ids=[m for _, m in BAD_SPACES])
def test_bad_space_files_fail_in_one_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "space.json"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        SearchSpace.from_file(path)
    msg = str(info.value)
    assert message in msg and msg.startswith(f"space file '{path}': ") and "\n" not in msg


def test_space_file_problems_outside_the_content(tmp_path) -> None:
    with pytest.raises(PeftlabError, match="does not exist"):
        SearchSpace.from_file(tmp_path / "missing.json")
    with pytest.raises(PeftlabError, match="built-in spaces are autopeft, s4"):
        load_space("autopef")
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"type": "s4", "num_layers": 24, "strategies": ["adapter", "bitfit"]}))
    with pytest.raises(SpecError, match="strategy 'bitfit' cannot go on this model"):
        SearchSpace.from_file(path, "shape:t5-base")
    with pytest.raises(SpecError, match="the space is for 24 layers but the model has 12"):
        SearchSpace.from_file(path, "shape:bert-base")


def test_custom_strategy_in_an_s4_space(bert_base: Backbone) -> None:
    dora = {"name": "dora", "kind": "lora", "sites": ["q", "v"], "size": "r", "settings": {"dora": True}}
    space = SearchSpace.from_dict(
        {"type": "s4", "strategies": ["adapter", dora], "allocations": ["uniform"]}, bert_base
    )
    assert isinstance(space, DesignSpace) and space.to_dict()["strategies"][1] == dora
    assert [len(d.choices) for d in space.dimensions()] == [5, 1, 15, 3, 3, 3, 3]
    for spec in space.sample(3, rng=0):
        trainable, backbone = _trainable(spec)
        assert abs(trainable - 0.005 * backbone) <= 0.01 * 0.005 * backbone
    assert set(ALLOCATIONS) >= set(space.allocations)
