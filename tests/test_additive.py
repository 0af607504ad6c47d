"""Additive kinds: Ladder Side-Tuning, SparseAdapter, KronA^B_res, adaptive prefix tuning and SPoT's --init-from.

What each computes, on tiny models; the method × backbone matrix (tests/test_matrix.py) covers identity at init,
training, merging, saving and cached generation for every preset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, make_batch, make_model
from safetensors.torch import load_file

import peftlab
from peftlab import Spec, methods
from peftlab.bench import flops
from peftlab.errors import AdapterLoadError, PeftlabError, SpecError
from peftlab.formats.loading import init_from
from peftlab.modules.bottleneck import KronaRes, KronaResSettings, SparseAdapter, SparseAdapterSettings
from peftlab.modules.prefix import AdaptivePrefix
from peftlab.modules.side import LadderSide, LstSettings
from peftlab.space import Backbone

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _side(pm) -> LadderSide:
    return pm.adapters["default"].layers["model-side"]


def _perturb(module: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


# -- Ladder Side-Tuning ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "head"), [("tiny-bert", "seq-cls"), ("tiny-llama", "causal-lm")])
def test_lst_backbone_gets_no_gradient_and_keeps_no_graph(shape: str, head: str) -> None:
    """The ladders read detached states: no block input or output (but the last, where the side network writes)
    requires grad, so the backbone's forward records no graph; only the side network and the head get gradients."""
    model = make_model(shape, head)
    pm = peftlab.apply(model, methods.lst())
    _perturb(_side(pm))
    seen: list[tuple[str, bool]] = []
    blocks = [b.module for b in pm.blocks]
    handles = []
    for i, block in enumerate(blocks):

        def pre(module, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            seen.append((f"in {i}", x.requires_grad))

        def post(module, args, out, i=i):
            y = out[0] if isinstance(out, tuple) else out
            seen.append((f"out {i}", y.requires_grad))

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    pm.train()
    pm(**make_batch(model)).logits.float().pow(2).mean().backward()
    for h in handles:
        h.remove()
    last = f"out {len(blocks) - 1}"
    assert [name for name, grad in seen if grad] == [last], seen
    assert all(p.grad is None for p in model.parameters())
    side = _side(pm)
    assert all(p.grad is not None for p in side.parameters())
    assert all(float(d.weight.grad.abs().sum()) > 0 for d in side.down)  # every ladder learns


def test_lst_computes_the_ladders_and_adds_the_side_output_to_the_final_state() -> None:
    model = make_model("tiny-bert", "seq-cls")
    batch = make_batch(model)
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[1:]  # each block's output
    pm = peftlab.apply(model, methods.lst(reduction=4))
    side = _side(pm)
    _perturb(side)
    with torch.no_grad():
        s = None
        for i, h in enumerate(states):
            mu = torch.sigmoid(side.alpha[i] / 0.1)
            z = mu * side.down[i](h) + (0 if s is None else (1 - mu) * s)
            b = side.side[i]
            s = z + b.fc2(F.gelu(b.fc1(b.norm(z))))
        expected = states[-1] + side.up(s)
        got = pm(**batch, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lst_counts_the_side_network() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.lst(reduction=4))
    h, layers, inner = model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size
    w, f = h // 4, inner // 4
    per_layer = (h * w + w) + 1 + 2 * w + (w * f + f) + (f * w + w)  # ladder, gate, norm, FFN
    expected = layers * per_layer + w * h + h
    row = pm.counts().per_kind["lst"]
    assert row.trainable == row.stored == row.changed == expected
    assert sum(p.numel() for p in _side(pm).parameters()) == expected


def test_lst_is_predicted_below_the_frozen_floor() -> None:
    """The floor back-propagates through every block; LST through its side network only."""
    model = peftlab.load_model("shape:tiny-llama", head="seq-cls", meta=True)
    floor, _ = flops.predict_floor(Backbone.of(model), 8, 32)
    lst, why = flops.predict(peftlab.apply(model, methods.lst()), 8, 32)
    assert why is None and lst.total < floor.total and lst.backward < 0.1 * floor.backward
    assert lst.forward > floor.forward  # the side network's own work comes on top of the backbone's forward


def test_lst_on_t5_sits_beside_the_decoder() -> None:
    model = make_model("tiny-t5", "seq2seq")
    pm = peftlab.apply(model, methods.lst())
    decoder = [b for b in pm.blocks if b.stack.path.startswith("decoder")]
    assert len(_side(pm).down) == len(decoder)
    assert set(map(id, pm.hooks.hosts("default"))) == {id(b.module) for b in decoder}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reduction": 0}, "reduction must be an integer"),
        ({"temperature": 0}, "temperature must be a number > 0"),
        ({"activation": "swish"}, "activation must be one of"),
    ],
)
def test_lst_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        methods.lst(**settings)
    assert "\n" not in str(err.value)


def test_lst_too_narrow_is_refused() -> None:
    with pytest.raises(SpecError, match="reduction 4096 leaves no width"):
        peftlab.apply(make_model("tiny-bert", "seq-cls"), Spec(model={"side": LstSettings(reduction=4096)}))


def test_lst_is_a_model_level_site_only() -> None:
    with pytest.raises(SpecError, match="cannot sit at site 'after_ffn'"):
        Spec(layers={"*": {"after_ffn": LstSettings()}})


# -- SparseAdapter ----------------------------------------------------------------------------------------------------


def _sparse(pm) -> list[SparseAdapter]:
    return [m for _, m in pm.adapters["default"].peft_modules() if isinstance(m, SparseAdapter)]


@pytest.mark.parametrize("prune", ["random", "snip"])
def test_sparse_adapter_keeps_a_fixed_fraction_and_counts_only_it(prune: str, tmp_path) -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.sparse_adapter(size=16, sparsity=0.75, prune=prune))
    h = model.config.hidden_size
    kept = 2 * (h * 16 - round(0.75 * h * 16))  # down and up
    modules = _sparse(pm)
    for m in modules:
        assert int(m.down_mask.sum()) + int(m.up_mask.sum()) == kept
    row = pm.counts().per_kind["sparse-adapter"]
    assert row.trainable == row.changed == len(modules) * (kept + 16 + h)
    # the file holds the kept entries only (and under SNIP their positions, chosen from data)
    assert row.stored == row.trainable + (len(modules) * kept if prune == "snip" else 0)
    _perturb(pm.adapters["default"])
    pm.save(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter.safetensors")
    weights = {k: v for k, v in saved.items() if k.endswith("_weight")}
    assert sum(v.numel() for v in weights.values()) == len(modules) * kept
    assert sum(v.numel() for k, v in saved.items() if k.startswith("layers.")) == row.stored


def _labelled_batches(model, n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [make_batch(model, batch=4, seed=s) | {"labels": torch.tensor([0, 1, 1, 0])} for s in range(n)]


def test_sparse_adapter_snip_keeps_the_entries_the_loss_is_most_sensitive_to(tmp_path) -> None:
    """SNIP scores |w·∂L/∂w| with every entry in place, summed over the first ``samples`` examples (eval mode), and
    each matrix keeps its top share; the chosen positions go into the file, so loading restores them."""
    model = make_model("tiny-bert", "seq-cls")
    spec = methods.sparse_adapter(size=16, sparsity=0.5, samples=8)  # two batches of 4
    pm = peftlab.apply(model, spec)
    seeded = [(m.down_mask.clone(), m.up_mask.clone()) for m in _sparse(pm)]
    batches = _labelled_batches(model)
    # the reference: the dense adapter's gradients, computed here by hand
    reference = peftlab.apply(make_model("tiny-bert", "seq-cls"), spec)
    for m in _sparse(reference):
        m.densify()
    weights = [w for m in _sparse(reference) for w in (m.down_weight, m.up_weight)]
    reference.eval()
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches[:2]:
        for t, g in zip(total, torch.autograd.grad(reference(**batch).loss, weights), strict=True):
            t += g
    pm.train()
    pm.prepare(lambda: iter(batches))
    assert pm.training  # the mode is given back
    for i, m in enumerate(_sparse(pm)):
        for w, g, mask, keep in zip(weights[2 * i : 2 * i + 2], total[2 * i : 2 * i + 2],
                                    (m.down_mask, m.up_mask), m.keep, strict=True):  # fmt: skip
            score = (w.detach() * g).abs()
            assert int(mask.sum()) == keep
            assert float(score[mask].min()) >= float(score[~mask].max())
        assert float((m.down_weight.detach()[~m.down_mask]).abs().sum()) == 0.0
        assert float((m.up_weight.detach()[~m.up_mask]).abs().sum()) == 0.0
    assert any(not torch.equal(m.down_mask, d) for m, (d, _) in zip(_sparse(pm), seeded, strict=True))
    _perturb(pm.adapters["default"])
    pm.eval()
    batch = make_batch(model)
    out = logits(pm, batch)
    pm.save(tmp_path / "snip")
    loaded = peftlab.load(make_model("tiny-bert", "seq-cls"), tmp_path / "snip")
    for a, b in zip(_sparse(pm), _sparse(loaded), strict=True):
        assert torch.equal(a.down_mask, b.down_mask) and torch.equal(a.up_mask, b.up_mask)
    torch.testing.assert_close(logits(loaded, batch), out)


def test_sparse_adapter_pruned_entries_get_no_gradient_and_stay_out() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.sparse_adapter(size=16))
    m = _sparse(pm)[0]
    _perturb(pm.adapters["default"])  # pruned entries hold values now: the mask must keep them out
    batch = make_batch(model)
    out = logits(pm, batch)
    with torch.no_grad():
        m.down_weight[~m.down_mask] += 100.0
        m.up_weight[~m.up_mask] += 100.0
    torch.testing.assert_close(logits(pm, batch), out)
    pm(**batch).logits.pow(2).mean().backward()
    assert float(m.down_weight.grad[~m.down_mask].abs().sum()) == 0.0
    assert float(m.up_weight.grad[~m.up_mask].abs().sum()) == 0.0
    assert float(m.up_weight.grad[m.up_mask].abs().sum()) > 0.0


def test_sparse_adapter_magnitude_keeps_the_largest_initial_weights() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.sparse_adapter(size=16, prune="magnitude"))
    m = _sparse(pm)[0]
    w = m.down_weight.detach().abs()
    assert float(w[m.down_mask].min()) >= float(w[~m.down_mask].max())
    spec = methods.sparse_adapter(size=16, prune="magnitude")
    again = _sparse(peftlab.apply(make_model("tiny-bert", "seq-cls"), spec))
    assert torch.equal(again[0].down_mask, m.down_mask)  # the seed fixes weights and mask: loading rebuilds them


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sparsity": 1.0}, "sparsity must be below 1"),
        ({"sparsity": -0.1}, "sparsity must be a number"),
        ({"prune": "grasp"}, "prune must be one of snip, random, magnitude"),
        ({"samples": 0}, "samples must be"),
    ],
)
def test_sparse_adapter_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        SparseAdapterSettings(**settings).check_at()
    assert "\n" not in str(err.value)


# -- KronA^B_res ------------------------------------------------------------------------------------------------------


def test_krona_res_computes_scaled_kronecker_plus_residual_beside_the_ffn() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.krona_res(scale=2.0))
    m = next(m for _, m in pm.adapters["default"].peft_modules() if isinstance(m, KronaRes))
    _perturb(m)
    x = torch.randn(3, 5, model.config.hidden_size)
    expected = 2.0 * x @ torch.kron(m.krona_A, m.krona_B).T + x
    torch.testing.assert_close(m.transform(x), expected, rtol=1e-5, atol=1e-5)
    h = model.config.hidden_size
    row = pm.counts().per_kind["krona-res"]
    assert row.trainable == row.stored == model.config.num_hidden_layers * (m.krona_A.numel() + m.krona_B.numel())
    assert m.krona_A.numel() * m.krona_B.numel() == h * h


def test_krona_res_without_residual_starts_unchanged() -> None:
    model = make_model("tiny-bert", "seq-cls")
    batch = make_batch(model)
    base = logits(model, batch)
    torch.testing.assert_close(logits(peftlab.apply(model, methods.krona_res(residual=False)), batch), base)


def test_krona_res_factors_must_divide_the_hidden_size() -> None:
    spec = Spec(layers={"*": {"beside_ffn": KronaResSettings(a_out=5)}})
    with pytest.raises(SpecError, match="must divide the hidden size"):
        peftlab.apply(make_model("tiny-bert", "seq-cls"), spec)
    with pytest.raises(SpecError, match="cannot sit at site 'q'"):
        Spec(layers={"*": {"q": KronaResSettings()}})


# -- adaptive prefix tuning -----------------------------------------------------------------------------------------


def test_adaptive_prefix_gates_scale_each_prefix_token() -> None:
    """Encoder: the key/values are λ · mean over real tokens of sigmoid(W x) per prefix token."""
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.adaptive_prefix(length=4, hidden=8))
    m = next(m for _, m in pm.adapters["default"].peft_modules() if isinstance(m, AdaptivePrefix))
    _perturb(m)
    batch = make_batch(model)
    captured = {}
    host = pm.blocks[0].sub(pm.blocks[0].stack.attention)

    def capture(mod, args, kwargs) -> None:
        captured.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = host.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        pm(**batch)
        handle.remove()
        x, mask = captured["x"], batch["attention_mask"].float()
        pm(**batch)  # leaves the layer's sequence view on this batch's mask
        m._gate_input = x
        captured["kv"] = m.key_values(x.shape[0], x.dtype)
        g = torch.sigmoid(m.token_gate(x))  # (batch, positions, length)
        gate = m.layer_gate * (g * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        kv = m.prefix_kv()
        k, v, none = captured["kv"]
    assert none is None
    torch.testing.assert_close(k, kv[0].unsqueeze(0) * gate[:, None, :, None])
    torch.testing.assert_close(v, kv[1].unsqueeze(0) * gate[:, None, :, None])


def test_adaptive_prefix_gates_ignore_padding() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.adaptive_prefix(length=4, hidden=8))
    _perturb(pm.adapters["default"])
    batch = make_batch(model)
    padded = logits(pm, batch)[1]
    n = int(batch["attention_mask"][1].sum())
    alone = logits(pm, {"input_ids": batch["input_ids"][1:, :n], "attention_mask": batch["attention_mask"][1:, :n]})
    torch.testing.assert_close(padded, alone[0], rtol=1e-4, atol=1e-4)


def test_adaptive_prefix_counts_its_gates() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.adaptive_prefix(length=4, hidden=8))
    h, layers = model.config.hidden_size, model.config.num_hidden_layers
    row = pm.counts().per_kind["adaptive-prefix"]
    assert row.stored == layers * (2 * 4 * h + (h * 4 + 4) + 1)  # key/values, token gates, layer gate


# -- SPoT: --init-from ------------------------------------------------------------------------------------------------


def _saved_prompt(tmp_path: Path, length: int = 5) -> tuple[Path, torch.Tensor]:
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.prompt(length=length))
    _perturb(pm.adapters["default"])
    pm.save(tmp_path / "source")
    return tmp_path / "source", pm.adapters["default"].layers["model-input"].prompt.detach().clone()


def test_init_from_copies_the_prompt_and_not_the_head(tmp_path) -> None:
    source, prompt = _saved_prompt(tmp_path)
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.prompt(length=5))
    head = {k: v.clone() for k, v in pm.adapters["default"].parts["head"].state_dict().items()}
    assert init_from(pm, source) == ["layers.model-input.prompt"]
    torch.testing.assert_close(pm.adapters["default"].layers["model-input"].prompt, prompt)
    for k, v in pm.adapters["default"].parts["head"].state_dict().items():
        assert torch.equal(v, head[k])


def test_init_from_refuses_other_shapes_and_other_specs(tmp_path) -> None:
    source, _ = _saved_prompt(tmp_path)
    longer = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.prompt(length=8))
    with pytest.raises(AdapterLoadError, match=r"prompt has shape \(5, 32\), this spec's is \(8, 32\)"):
        init_from(longer, source)
    lora = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.lora())
    with pytest.raises(AdapterLoadError, match="holds no tensor of this spec"):
        init_from(lora, source)
    with pytest.raises(AdapterLoadError, match="not a peftlab adapter folder"):
        init_from(lora, tmp_path)
    other = peftlab.apply(make_model("tiny-bert", "seq-cls", seed=1), methods.prompt(length=5))
    with pytest.raises(AdapterLoadError, match="different weights"):
        init_from(other, source)


@pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")
def test_train_init_from_starts_the_prompt_from_the_source(tmp_path) -> None:
    """SPoT end to end: ``peftlab train --method prompt --init-from`` (one step at a negligible rate)."""
    from peftlab.cli import main

    source, prompt = _saved_prompt(tmp_path)
    argv = ["train", "--model", "shape:tiny-bert", "--task", "sst2", "--data-dir", str(DATA), "--k", "16"]
    argv += ["--method", "prompt", "--set", "length=5", "--max-steps", "1", "--lr", "1e-12", "--batch-size", "4"]
    argv += ["--max-length", "16", "--no-progress", "--output", str(tmp_path / "run"), "--init-from", str(source)]
    assert main(argv) == 0
    trained = load_file(tmp_path / "run" / "adapter" / "adapter.safetensors")["layers.model-input.prompt"]
    torch.testing.assert_close(trained, prompt, rtol=0, atol=1e-6)
    with pytest.raises(PeftlabError, match="is not a folder"):
        from peftlab.train import TrainConfig

        TrainConfig(model="shape:tiny-bert", task="sst2", init_from=str(tmp_path / "missing")).check()


@pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")
def test_lst_refuses_gradient_checkpointing() -> None:
    """Checkpointing recomputes blocks in the backward pass; LST has no backward there, and its hooks would rerun."""
    from peftlab.train import TrainConfig, train

    config = TrainConfig(
        model="shape:tiny-bert", task="sst2", data_dir=str(DATA), k=16, max_steps=1, progress=False,
        gradient_checkpointing=True,
    )  # fmt: skip
    with pytest.raises(PeftlabError, match="lst back-propagates through no backbone block"):
        train(methods.lst(), config)


def test_bench_plans_lst_below_the_floor() -> None:
    """``peftlab bench`` sets every row against the floor: LST's predicted step is below it (measured on MiniLM, 8×128
    on one CPU thread: 0.51 of the floor's step, its training step 0.93 of its own forward against the floor's 1.74)."""
    from peftlab import bench

    config = bench.BenchConfig(model="shape:tiny-llama", methods=["lst"], full=False, output="unused", seq=32)
    _, plans = bench.plan(config)
    total = {name: p.flops["forward"] + p.flops["backward"] for name, p in plans.items()}
    assert total["lst"] < total["floor"]
    assert plans["lst"].counts["trainable_params"] > 0 and not plans["lst"].mergeable
