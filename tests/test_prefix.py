"""Prefix tuning's locations on encoder-decoders (Li & Liang 2021, AdapterHub): encoder self-attention, decoder
self-attention and decoder cross-attention, each reparameterised by an embedding and MLP of its own. The method ×
backbone matrix (tests/test_matrix.py) covers training, saving and cached generation of every prefix preset."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, make_batch, make_model

import peftlab
from peftlab import Spec, methods
from peftlab.modules.base import Gate
from peftlab.modules.prefix import PrefixSettings


def _cross_only(**kw: object) -> Spec:
    return Spec(layers={"*": {"cross_attn": PrefixSettings(**kw)}})


def test_t5_prefix_has_three_locations_with_a_pool_each() -> None:
    pm = peftlab.apply(make_model("tiny-t5", "seq2seq"), methods.prefix(length=3, hidden=8))
    adapter = pm.adapters["default"]
    pools = {k: v for k, v in adapter.shared.items() if k.startswith("prefix_pool")}
    assert set(pools) == {"prefix_pool_encoder", "prefix_pool_decoder", "prefix_pool_cross"}
    assert len({id(p) for p in pools.values()}) == 3
    cross = [i for i, b in enumerate(pm.blocks) if b.stack.cross_attention is not None]
    assert cross and sorted(k for k in adapter.layers if k.endswith("-cross_attn")) == [
        f"{i}-cross_attn" for i in cross
    ]
    for i, block in enumerate(pm.blocks):
        location = block.stack.path.split(".")[0]  # encoder or decoder
        assert adapter.layers[f"{i}-attn"]._pool[0] is pools[f"prefix_pool_{location}"]
    for i in cross:
        assert adapter.layers[f"{i}-cross_attn"]._pool[0] is pools["prefix_pool_cross"]


def test_single_stack_models_keep_one_pool_and_no_cross_prefix() -> None:
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.prefix(length=3, hidden=8))
    adapter = pm.adapters["default"]
    assert [k for k in adapter.shared if k.startswith("prefix_pool")] == ["prefix_pool"]
    assert not [k for k in adapter.layers if k.endswith("cross_attn")]


def test_a_cross_prefix_alone_acts_through_the_cross_attention() -> None:
    """Without any self-attention prefix, the decoder's cross-attention prefix still changes the output, and changing
    its key/values changes it again; the encoder's output is untouched."""
    model = make_model("tiny-t5", "seq2seq")
    batch = make_batch(model)
    base = logits(model, batch)
    encoded = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pm = peftlab.apply(model, _cross_only(length=3, reparam=False))
    with torch.no_grad():
        again = pm.base_model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(again[0], encoded[0], rtol=1e-5, atol=1e-5)  # no prefix in the encoder
        first = logits(pm, batch)
        assert not torch.allclose(first, base, atol=1e-4)
        module = next(m for k, m in pm.adapters["default"].layers.items() if k.endswith("-cross_attn"))
        module.kv.add_(torch.randn_like(module.kv))
        assert not torch.allclose(logits(pm, batch), first, atol=1e-4)


def test_the_cross_prefix_is_prepended_to_the_encoder_keys_and_values() -> None:
    """The cross-attention of the first decoder block, recomputed by hand: softmax(q·[P_k; K]ᵀ + mask)·[P_v; V]
    (T5 scales no scores and has no position bias in cross-attention), padded encoder positions masked out."""
    model = make_model("tiny-t5", "seq2seq")
    batch = make_batch(model)
    pm = peftlab.apply(model, _cross_only(length=3, reparam=False))
    with torch.no_grad():
        for p in pm.adapters["default"].parameters():
            p.normal_()  # prefixes that matter in the average
    block = next(b for b in pm.blocks if b.stack.cross_attention is not None)
    attention = block.attention("cross_attn")
    seen: dict[str, torch.Tensor] = {}

    def pre(module, args, kwargs) -> None:
        seen["x"], seen["enc"] = args[0] if args else kwargs["hidden_states"], kwargs["key_value_states"]

    handles = [
        attention.register_forward_pre_hook(pre, with_kwargs=True),
        attention.register_forward_hook(lambda m, a, out: seen.update(out=out[0])),
    ]
    with torch.no_grad():
        pm(**batch)
        for h in handles:
            h.remove()
        b, heads, d = seen["x"].shape[0], attention.n_heads, attention.key_value_proj_dim

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, d).transpose(1, 2)

        kv = pm.adapters["default"].layers[f"{block.index}-cross_attn"].prefix_kv()
        q = split(attention.q(seen["x"]))
        k = torch.cat([kv[0].expand(b, -1, -1, -1), split(attention.k(seen["enc"]))], dim=2)
        v = torch.cat([kv[1].expand(b, -1, -1, -1), split(attention.v(seen["enc"]))], dim=2)
        mask = torch.cat([torch.ones(b, 3), batch["attention_mask"].float()], dim=1)
        scores = q @ k.transpose(-1, -2) + (1 - mask)[:, None, None, :] * torch.finfo(q.dtype).min
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, heads * d)
    torch.testing.assert_close(seen["out"], attention.o(out), rtol=1e-5, atol=1e-5)


def test_cross_prefix_generation_is_the_same_with_and_without_the_cache(tmp_path) -> None:
    """The cache holds the encoder's key/values only: the cross prefix is prepended at every step either way, and a
    saved cross prefix generates the same after loading."""
    model = make_model("tiny-t5", "seq2seq")
    batch = make_batch(model)
    pm = peftlab.apply(model, _cross_only(length=3, hidden=8))
    with torch.no_grad():
        for p in pm.adapters["default"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    kw |= {"output_logits": True, "return_dict_in_generate": True}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    cached, plain = pm.generate(**inputs, use_cache=True, **kw), pm.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)
    pm.save(tmp_path / "a")
    loaded = peftlab.load(make_model("tiny-t5", "seq2seq"), tmp_path / "a")
    again = loaded.generate(**inputs, use_cache=True, **kw)
    torch.testing.assert_close(torch.stack(again.logits), torch.stack(cached.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "per_site"), [("unipelt", False), ("unipelt-survey", True)])
def test_lora_gates_per_layer_or_per_site(name: str, per_site: bool) -> None:
    """UniPELT shares one LoRA gate per layer among the updates reading the same input; AdapterHub's layout
    (``unipelt-survey``) has one per LoRA site, cross-attention's included, each averaging its own input's real
    tokens (the encoder's for cross-attention's key and value)."""
    pm = peftlab.apply(make_model("tiny-t5", "seq2seq"), methods.get(name))
    adapter = pm.adapters["default"]
    gates = {k for k, v in adapter.shared.items() if isinstance(v, Gate)}
    n_enc = sum(b.stack.cross_attention is None for b in pm.blocks)
    n_dec = len(pm.blocks) - n_enc
    if per_site:
        assert len(gates) == 2 * n_enc + 4 * n_dec
        cross_v = adapter.shared[f"lora_gate_{n_enc}_cross_v"]
        assert not cross_v._view[0].causal  # the encoder's view
        assert adapter.shared[f"lora_gate_{n_enc}_cross_q"]._view[0].causal
    else:
        assert gates == {f"lora_gate_{i}" for i in range(len(pm.blocks))}
