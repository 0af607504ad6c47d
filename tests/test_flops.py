"""The cost model of ``peftlab bench`` (``peftlab.bench.flops``) on tiny random-init shapes, against FLOPs worked out by
hand: the floor, what LoRA and a prefix add, the longer sequence of a prompt, full fine-tuning's weight gradients,
the backward that stops at the lowest layer a method touches, and no prediction where a kind has no count."""

from __future__ import annotations

import pytest
from conftest import NEEDS_FOLDERS, TINY_SETTINGS, make_model, trained_adapters

import peftlab
from peftlab import bench, methods
from peftlab.core.spec import Spec
from peftlab.modules import PeftModule
from peftlab.modules.linear import IA3
from peftlab.space import Backbone

# shape:tiny-bert: hidden 32, FFN 64, 2 layers, 4 heads of 8
H, FFN, LAYERS, HEADS = 32, 64, 2, 4
LINEAR = 2 * (4 * H * H + 2 * H * FFN)  # per token and layer: q, k, v, o, FFN in and out


def attention(keys: int) -> int:
    return 4 * keys * H  # per query token and layer: q·kᵀ and p·v over every head


def pm(name: str, **settings) -> peftlab.PeftModel:
    return peftlab.apply(
        peftlab.load_model("shape:tiny-bert", head="seq-cls", meta=True), methods.get(name, **settings)
    )


def floor(batch: int, seq: int) -> bench.StepFlops:
    got, why = bench.predict_floor(
        Backbone.of(peftlab.load_model("shape:tiny-bert", head="seq-cls", meta=True)), batch, seq
    )
    assert why is None
    return got


def predict(model: peftlab.PeftModel, batch: int = 8, seq: int = 32) -> bench.StepFlops:
    got, why = bench.predict(model, batch, seq)
    assert why is None, why
    return got


def test_the_floor_is_a_forward_and_the_activation_backward() -> None:
    tokens = 8 * 32
    got = floor(8, 32)
    assert got.forward == tokens * LAYERS * (LINEAR + attention(32))
    assert got.backward == tokens * LAYERS * (LINEAR + 2 * attention(32))  # attention: dq, dk and dp, dv


@pytest.mark.parametrize("r", [1, 8])
def test_lora_on_q_and_v_adds_its_two_matmuls_three_times(r: int) -> None:
    tokens, base = 8 * 32, floor(8, 32)
    added = tokens * LAYERS * 2 * 2 * r * (H + H)  # 2 sites, x·Aᵀ (H→r) and ·Bᵀ (r→H)
    got = predict(pm("lora", r=r))
    assert got.forward == base.forward + added
    assert got.backward == base.backward + 2 * added  # input and weight gradients


def test_a_prompt_lengthens_the_sequence_and_nothing_else() -> None:
    got = predict(pm("prompt", length=8), 8, 32)
    assert got == floor(8, 40)
    linear_part = 8 * 40 * LAYERS * LINEAR
    assert linear_part / (8 * 32 * LAYERS * LINEAR) == 40 / 32  # the linears grow with the sequence
    assert got.forward - linear_part == 8 * 40 * LAYERS * attention(40)  # attention with its square


def test_a_prefix_adds_keys_to_every_query_and_its_mlp_once_per_pass() -> None:
    length, hidden, tokens = 5, 16, 8 * 32
    keys = tokens * LAYERS * attention(length)
    mlp = LAYERS * 2 * length * (H * hidden + hidden * 2 * H)  # per layer: the shared down, its own up
    got, base = predict(pm("prefix", length=length, hidden=hidden)), floor(8, 32)
    assert got.forward == base.forward + keys + mlp
    assert got.backward == base.backward + 2 * (keys + mlp)


def test_full_fine_tuning_is_the_floor_plus_every_weight_gradient() -> None:
    got, base = predict(pm("full")), floor(8, 32)
    assert got.forward == base.forward
    assert got.backward == base.backward + 8 * 32 * LAYERS * LINEAR


def test_the_backward_starts_at_the_lowest_layer_a_method_touches() -> None:
    base = floor(8, 32)
    head = predict(pm("head"))
    assert (head.forward, head.backward) == (base.forward, 0)  # the head alone: no backward into the backbone
    upper = predict(pm("prefix", length=5, hidden=16, layers=[1]))
    assert upper.backward - 2 * (upper.forward - base.forward) == 8 * 32 * (LINEAR + 2 * attention(32))  # layer 1 only


def test_the_frozen_cache_runs_the_forward_from_the_first_layer_a_method_touches() -> None:
    """With the cache, LoRA on layer 1 runs only layer 1 forward (layer 0's states are read); its backward is the
    uncached one's; a method on layer 0 gains nothing."""
    spec = methods.get("lora").to_dict()
    spec["layers"] = {"1": spec["layers"]["*"]}
    upper = peftlab.apply(peftlab.load_model("shape:tiny-bert", head="seq-cls", meta=True), Spec.from_dict(spec))
    cached, uncached = bench.predict(upper, 8, 32, cached=True)[0], predict(upper)
    assert uncached.forward - cached.forward == 8 * 32 * (LINEAR + attention(32))  # layer 0's forward, skipped
    assert cached.backward == uncached.backward
    assert bench.predict(pm("lora"), 8, 32, cached=True)[0] == predict(pm("lora"))


#: presets only encoder-decoders take (cross-attention tuning), which the cost model does not predict
ENCODER_DECODER_ONLY = {"cross-attn"}


@pytest.mark.parametrize("name", sorted(set(methods.METHODS) - ENCODER_DECODER_ONLY))
def test_every_preset_has_a_prediction(name: str, tmp_path) -> None:
    settings = TINY_SETTINGS.get(name, {})
    if name in NEEDS_FOLDERS:  # fuse: adapters trained on the real tiny shape
        settings = {"adapters": trained_adapters(make_model("tiny-bert", "seq-cls"), tmp_path)}
    got = predict(pm(name, **settings))
    assert got.forward >= floor(8, 32).forward or name == "head"


def test_a_kind_without_a_count_gets_no_prediction(monkeypatch) -> None:
    monkeypatch.setattr(IA3, "flops_per_token", PeftModule.flops_per_token)
    got, why = bench.predict(pm("ia3"), 8, 32)
    assert got is None and "ia3" in why and "flops_per_token" in why
    assert bench.predict(pm("lora"), 8, 32)[0] is not None


def test_encoder_decoders_get_no_prediction() -> None:
    model = peftlab.apply(peftlab.load_model("shape:tiny-t5", head="seq2seq", meta=True), methods.get("lora"))
    got, why = bench.predict(model, 8, 32)
    assert got is None and "encoder-decoder" in why


def test_oft_adds_its_block_rotation_the_extra_weight_product_and_its_series() -> None:
    tokens, base = 8 * 32, floor(8, 32)
    per_token = 2 * H * 8 + 2 * H * H  # x·R over blocks of 8, then W·(Rx − x)
    per_step = 2 * 3 * (H // 8) * 8**3  # the Cayley–Neumann series: 3 products of 8×8 blocks
    added = LAYERS * 2 * (tokens * per_token + per_step)  # q and v
    got = predict(pm("oft", block_size=8))
    assert (got.forward, got.backward) == (base.forward + added, base.backward + 2 * added)
