"""Where bottleneck adapters read and write (AdapterHub's placement options), the gates' mean over real tokens only,
and the UniPELT / AdapterDrop ablation presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch, make_model

import peftlab
from peftlab import Spec, methods
from peftlab.errors import SpecError
from peftlab.modules.base import Gate


def _perturb(pm, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.adapters[pm.active_adapter].parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


class Record:
    """Tensors seen by forward hooks, by name."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}
        self.handles: list = []

    def pre(self, module: torch.nn.Module, name: str) -> None:
        def hook(m, args, kwargs):
            self.seen[name] = (args, kwargs)

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def post(self, module: torch.nn.Module, name: str) -> None:
        def hook(m, args, out):
            self.seen[name] = out

        self.handles.append(module.register_forward_hook(hook))


def _bert_layer(pm, name: str, i: int = 1) -> tuple[Record, torch.nn.Module, torch.nn.Module]:
    """Record, on BERT layer ``i``: BertOutput's inputs (FFN hidden, residual), the layer's output and the
    adapter's input; returns the record, the BertOutput module and the adapter."""
    layer = pm.blocks[i].module
    adapter = pm.adapters["default"].layers[f"{i}-{name}"]
    rec = Record()
    rec.pre(layer.output, "output")
    rec.pre(layer.intermediate, "ffn_in")
    rec.post(layer, "layer")
    rec.pre(adapter.down, "adapter")
    return rec, layer.output, adapter


def _run(pm, batch) -> None:
    pm.eval()
    with torch.no_grad():
        pm(**batch)


def _ln(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _layer_out(rec: Record) -> torch.Tensor:
    out = rec.seen["layer"]
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", ["houlsby", "pfeiffer", "unipelt", "after-norm"])
def test_serial_placements_read_and_write_where_adapterhub_does(name: str) -> None:
    """On tiny BERT's FFN sub-layer (h: output.dense's output, r: the residual, LN: output.LayerNorm): Houlsby reads
    h and gives LN(h + f(h) + r); Pfeiffer and UniPELT read h_FN = LN(h + r) and give LN(h + r + f(h_FN)); the
    after-norm placement reads h_FN and gives h_FN + f(h_FN)."""
    model = make_model("tiny-bert", "seq-cls")
    if name == "after-norm":
        a = {"kind": "adapter", "size": 8, "original_ln_before": True, "original_ln_after": False}
        spec = Spec.from_dict({"layers": {"*": {"after_ffn": a | {"residual_before_ln": False}}}})
    else:
        spec = methods.get(name)
    pm = peftlab.apply(model, spec)
    _perturb(pm)
    rec, output, adapter = _bert_layer(pm, "after_ffn")
    _run(pm, make_batch(model))
    (inner, residual), _ = rec.seen["output"]
    h = output.dense.forward(
        inner
    )  # without peftlab's hook: the FFN output before dropout, residual and LayerNorm (dropout is off)
    h_fn = _ln(output.LayerNorm, h + residual)
    read = rec.seen["adapter"][0][0]
    if name == "houlsby":
        torch.testing.assert_close(read, h)
        want = _ln(output.LayerNorm, h + adapter._delta(h) + residual)
    elif name == "after-norm":
        torch.testing.assert_close(read, h_fn)
        want = h_fn + adapter._delta(h_fn)
    else:
        torch.testing.assert_close(read, h_fn)
        want = _ln(output.LayerNorm, h + residual + adapter._delta(h_fn))
    torch.testing.assert_close(_layer_out(rec), want)


def test_houlsby_keeps_its_attention_adapter_on_the_attention_output() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.houlsby(size=8))
    _perturb(pm)
    attn_out = pm.blocks[1].module.attention.output
    adapter = pm.adapters["default"].layers["1-after_attn"]
    rec = Record()
    rec.pre(attn_out, "out")
    rec.post(attn_out, "result")
    rec.pre(adapter.down, "adapter")
    _run(pm, make_batch(model))
    (inner, residual), _ = rec.seen["out"]
    h = attn_out.dense.forward(inner)
    torch.testing.assert_close(rec.seen["adapter"][0][0], h)
    torch.testing.assert_close(rec.seen["result"], _ln(attn_out.LayerNorm, h + adapter._delta(h) + residual))


@pytest.mark.parametrize("name", ["parallel", "mam"])
def test_parallel_adapters_read_the_ffn_input_and_write_beside_the_ffn(name: str) -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.get(name))
    _perturb(pm)
    rec, output, adapter = _bert_layer(pm, "beside_ffn")
    _run(pm, make_batch(model))
    (inner, residual), _ = rec.seen["output"]
    x = rec.seen["ffn_in"][0][0]
    torch.testing.assert_close(rec.seen["adapter"][0][0], x)
    h = output.dense.forward(inner)
    torch.testing.assert_close(_layer_out(rec), _ln(output.LayerNorm, h + adapter._delta(x) + residual))


def test_pfeiffer_reads_the_residual_stream_in_a_pre_norm_family() -> None:
    """GPT-2 has no LayerNorm after its residual: the adapter reads r + h (r: the stream entering the FFN, ln_2's
    input) and the stream leaving the block is r + h + f(r + h)."""
    model = make_model("tiny-gpt2", "causal-lm")
    pm = peftlab.apply(model, methods.pfeiffer(size=8))
    _perturb(pm)
    block = pm.blocks[1].module
    adapter = pm.adapters["default"].layers["1-after_ffn"]
    rec = Record()
    rec.pre(block.ln_2, "r")
    rec.pre(block.mlp.c_proj, "c_proj")
    rec.post(block, "layer")
    rec.pre(adapter.down, "adapter")
    _run(pm, make_batch(model))
    r = rec.seen["r"][0][0]
    h = block.mlp.c_proj.forward(rec.seen["c_proj"][0][0])  # forward: without peftlab's hook
    torch.testing.assert_close(rec.seen["adapter"][0][0], r + h)
    torch.testing.assert_close(_layer_out(rec), r + h + adapter._delta(r + h))


def _gates(pm) -> list[Gate]:
    return [m for m in pm.adapters["default"].modules() if isinstance(m, Gate)]


def _gate_values(pm, batch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [g.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone())) for g in _gates(pm)]
    _run(pm, batch)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(
    ("shape", "head", "name"),
    [("tiny-bert", "seq-cls", "unipelt"), ("tiny-t5", "seq2seq", "unipelt"), ("tiny-t5", "seq2seq", "unipelt-survey")],
)
def test_gates_average_over_real_tokens_only(shape: str, head: str, name: str) -> None:
    """The same sequence with and without trailing padding gets the same gate in every layer (adapter, prefix and
    LoRA gates; on T5 also cross-attention's, whose key and value gates average the encoder's real tokens), and the
    same output at its real positions."""
    model = make_model(shape, head)
    pm = peftlab.apply(model, methods.get(name, size=8, prefix_length=3, prefix_hidden=16, r=2))
    _perturb(pm)
    short = {k: v[:1, :5] for k, v in make_batch(model).items()}  # one sequence of 5 real tokens
    padded = {k: v.clone() for k, v in short.items()}
    padded["input_ids"] = F.pad(short["input_ids"], (0, 4), value=0)
    padded["attention_mask"] = F.pad(short["attention_mask"], (0, 4), value=0)
    plain, with_pad = _gate_values(pm, short), _gate_values(pm, padded)
    assert len(plain) == len(with_pad) >= 3 * 2
    for a, b in zip(plain, with_pad, strict=True):
        torch.testing.assert_close(a[:, : a.shape[1]], b[:, : a.shape[1]], rtol=1e-5, atol=1e-6)
    if head == "seq-cls":
        torch.testing.assert_close(pm(**short).logits, pm(**padded).logits, rtol=1e-4, atol=1e-5)


def test_decoder_gates_are_running_means_over_real_tokens() -> None:
    """In a decoder a position's gate averages the real tokens up to it: left padding does not move it, and the
    first real position's gate is its own sigmoid."""
    model = make_model("tiny-llama", "causal-lm")
    pm = peftlab.apply(model, methods.unipelt_ap(size=8, prefix_length=3, prefix_hidden=16))
    _perturb(pm)
    batch = {k: v[:1, :5].clone() for k, v in make_batch(model).items()}
    batch["attention_mask"][:, :2] = 0  # two left pads
    gate = pm.adapters["default"].layers["0-after_ffn"].gate
    seen: dict[str, torch.Tensor] = {}
    gate.register_forward_hook(lambda m, args, out: seen.update(x=args[0], g=out))
    _run(pm, batch)
    raw = torch.sigmoid(gate.proj(seen["x"]))[0, 2:, 0]
    want = raw.cumsum(0) / torch.arange(1, 4)
    torch.testing.assert_close(seen["g"][0, 2:, 0], want)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"original_ln_before": "yes"}, "original_ln_before must be true or false, got 'yes'"),
        ({"residual_before_ln": "post_add"}, "residual_before_ln must be true or false"),
        ({"original_ln_before": False, "original_ln_after": False}, "cannot both be false"),
        ({"original_ln_before": True, "residual_before_ln": False}, "need residual_before_ln true"),
        ({"original_ln_before": True, "original_ln_after": False}, "needs residual_before_ln false"),
    ],
)
def test_bad_placements_are_one_line_spec_errors(settings: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        Spec.from_dict({"layers": {"*": {"after_ffn": {"kind": "adapter", **settings}}}})
    assert "\n" not in str(e.value)


def test_a_parallel_adapter_takes_no_placement() -> None:
    spec = Spec.from_dict({"layers": {"*": {"beside_ffn": {"kind": "adapter", "original_ln_before": True}}}})
    with pytest.raises(SpecError, match="place serial adapters") as e:
        peftlab.apply(make_model("tiny-bert", "seq-cls"), spec)
    assert "\n" not in str(e.value)


def test_ablation_presets() -> None:
    model = make_model("tiny-bert", "seq-cls")
    ap = peftlab.apply(model, methods.get("unipelt-ap"))
    assert {m.kind for _, m in ap.adapters["default"].peft_modules()} == {"adapter", "prefix"} and ap.adapters[
        "default"
    ].spec.gates
    nogate = methods.get("unipelt-nogate")
    assert not nogate.gates and {s.kind for s in nogate.settings()} == {"adapter", "prefix", "lora"}
    assert methods.get("unipelt").layers["*"]["after_ffn"] == nogate.layers["*"]["after_ffn"]
    dropped = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.get("adapterdrop", drop=1))
    assert sorted(dropped.adapters["default"].layers) == ["1-after_ffn"]
    with pytest.raises(SpecError, match="beyond the model's depth"):
        peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.get("adapterdrop"))  # 5 of 2 layers


def test_the_mask_watch_is_not_where_an_adapter_acts() -> None:
    """The sequence view's hook on BertModel only reads the mask: a gated adapter on layer 1 still lets the frozen
    cache skip layer 0."""
    from peftlab.train.frozen import first_layer, probe

    spec = Spec.from_dict({"layers": {"1": {"after_ffn": {"kind": "adapter", "size": 8}}}, "gates": True})
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), spec)
    assert first_layer(pm, probe(pm))[0] == 1


@pytest.mark.parametrize(("shape", "head"), [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm")])
def test_beam_search_with_gates_gives_the_uncached_beams(shape: str, head: str) -> None:
    """Beam search reorders the cache's rows; the gates' running sums follow them (without that, the scores differ)."""
    model = make_model(shape, head)
    pm = peftlab.apply(model, methods.unipelt(size=8, prefix_length=3, prefix_hidden=16, r=2))
    _perturb(pm, scale=1.0)
    batch = make_batch(model)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    kw = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    kw |= {"output_scores": True, "return_dict_in_generate": True}
    cached = pm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True, **kw)
    plain = pm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["ln", "bitfit"])
def test_pfeiffer_reads_the_tuned_layernorm(kind: str) -> None:
    """With LayerNorm tuning or BitFit beside it, the adapter reads and the block gives the tuned LayerNorm's output:
    merging the tuned norm changes nothing."""
    model = make_model("tiny-bert", "seq-cls")
    spec = Spec.from_dict(
        {
            "layers": {
                "*": {
                    "after_ffn": {"kind": "adapter", "size": 8, "original_ln_before": True},
                    ("norm" if kind == "ln" else "bias"): kind,
                }
            }
        }
    )
    pm = peftlab.apply(model, spec)
    _perturb(pm)
    batch = make_batch(model)
    pm.eval()
    with torch.no_grad():
        unmerged = pm(**batch).logits
        pm.merge()
        merged = pm(**batch).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
