"""Quantized bases (QLoRA): tiny Llama with its block linears in NF4 or int8 through bitsandbytes' CPU backend.

Adapters must be the identity at init, train (outputs change, the loss falls), save and load, refuse to merge,
count the base honestly and export to peft with the same outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_batch
from torch import nn

import peftlab
from peftlab import methods
from peftlab.backbone.quant import dequantized_weight
from peftlab.cli import main
from peftlab.errors import PeftlabError, SpecError

bnb = pytest.importorskip("bitsandbytes", reason="quantized bases need bitsandbytes: pip install 'peftlab[quant]'")

KINDS = ("nf4", "int8")
QUANTIZED = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def _quantized(kind: str, seed: int = 0) -> nn.Module:
    return peftlab.load_model("shape:tiny-llama", head="causal-lm", seed=seed, quantize=kind)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def _train(pm: nn.Module, batch: dict[str, torch.Tensor], steps: int = 15, lr: float = 1e-2) -> list[float]:
    pm.train()
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = _loss(pm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pm.eval()
    return losses


@pytest.mark.parametrize("kind", KINDS)
def test_block_linears_are_quantized_the_rest_full_precision(kind: str) -> None:
    model = _quantized(kind)
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(proj, QUANTIZED[kind])
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "krona", "houlsby", "pfeiffer", "parallel", "ln"])
def test_identity_at_init_then_training_changes_outputs(kind: str, method: str) -> None:
    base = _quantized(kind)
    batch = make_batch(base)
    reference = _logits(base, batch)
    pm = peftlab.apply(base, methods.get(method, **({"targets": "all-linear"} if method == "lora" else {})))
    torch.testing.assert_close(_logits(pm, batch), reference, atol=1e-6, rtol=0)
    losses = _train(pm, batch, steps=5)
    assert not torch.allclose(_logits(pm, batch), reference, atol=1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_train_on_a_quantized_base(kind: str, method: str) -> None:
    base = _quantized(kind)
    batch = make_batch(base)
    pm = peftlab.apply(base, methods.get(method, length=3))
    losses = _train(pm, batch, steps=8, lr=3e-2)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_loss_falls_and_gradients_reach_every_layer(kind: str) -> None:
    pm = peftlab.apply(_quantized(kind), methods.lora(r=4, targets="all-linear"))
    batch = make_batch(pm.base_model)
    losses = _train(pm, batch, steps=20)
    assert losses[-1] < losses[0] - 0.3
    # the first layer's update needs the gradient to pass back through every quantized layer above it
    assert pm.adapters["default"].layers["0-q"].lora_B.abs().sum() > 0


def test_training_after_an_evaluation_keeps_its_gradients() -> None:
    """bitsandbytes repacks a 4-bit weight for inference on the first eval-mode call without gradients on
    AVX512-BF16 CPUs, and that layout has no backward; peftlab keeps every call on the trainable path."""
    pm = peftlab.apply(_quantized("nf4"), methods.lora(r=4))
    batch = make_batch(pm.base_model)
    pm.eval()
    first = _logits(pm, batch)
    _train(pm, batch, steps=2)
    assert pm.adapters["default"].layers["0-q"].lora_A.grad is not None
    pm.train()
    assert not torch.allclose(_logits(pm, batch), first)


@pytest.mark.parametrize("kind", KINDS)
def test_dora_magnitude_starts_at_the_dequantized_weight_norm(kind: str) -> None:
    base = _quantized(kind)
    pm = peftlab.apply(base, methods.dora(r=4))
    q = base.model.layers[0].self_attn.q_proj
    module = pm.adapters["default"].layers["0-q"]
    expected = dequantized_weight(q).norm(dim=1)
    torch.testing.assert_close(module.magnitude.detach(), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(kind: str, tmp_path: Path) -> None:
    pm = peftlab.apply(_quantized(kind), methods.lora(r=4, targets="all-linear"))
    batch = make_batch(pm.base_model)
    _train(pm, batch, steps=3)
    expected = _logits(pm, batch)
    pm.save(tmp_path / "a")
    loaded = peftlab.load(_quantized(kind), tmp_path / "a")
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-6, rtol=0)


def test_an_adapter_trained_on_nf4_loads_and_merges_on_the_full_precision_base(tmp_path: Path) -> None:
    """QLoRA's way to a merged model: train on the quantized base, merge into the full-precision one."""
    pm = peftlab.apply(_quantized("nf4"), methods.lora(r=4))
    batch = make_batch(pm.base_model)
    _train(pm, batch, steps=3)
    pm.save(tmp_path / "a")
    full = peftlab.load(peftlab.load_model("shape:tiny-llama", head="causal-lm"), tmp_path / "a")
    unmerged = _logits(full, batch)
    merged = full.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), unmerged, atol=1e-5, rtol=0)
    other = peftlab.load_model("shape:tiny-llama", head="causal-lm", seed=1, quantize="nf4")
    with pytest.raises(PeftlabError, match="different weights"):
        peftlab.load(other, tmp_path / "a")


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_refused_in_one_line_and_changes_nothing(kind: str) -> None:
    pm = peftlab.apply(_quantized(kind), methods.lora(r=4))
    batch = make_batch(pm.base_model)
    _train(pm, batch, steps=2)
    before = _logits(pm, batch)
    for call in (pm.merge, pm.merge_and_unload):
        with pytest.raises(PeftlabError, match=f"cannot merge into a base quantized to {kind}") as err:
            call()
        assert "\n" not in str(err.value)
    assert not any(m.merged for _, m in pm.adapters["default"].all_modules())
    torch.testing.assert_close(_logits(pm, batch), before, atol=0, rtol=0)


def test_adapters_that_never_merge_still_run_on_a_quantized_base() -> None:
    """A bottleneck adapter merges into nothing, so merging it has nothing to refuse; BitFit's biases are full
    precision and merge."""
    pm = peftlab.apply(_quantized("nf4"), methods.houlsby(size=8))
    pm.merge()  # nothing mergeable: a no-op, not an error
    assert not any(m.merged for _, m in pm.adapters["default"].all_modules())


@pytest.mark.parametrize("kind", KINDS)
def test_counts_are_in_values_and_the_size_in_stored_bytes(kind: str) -> None:
    spec = methods.lora(r=4, targets="all-linear")
    full = peftlab.apply(peftlab.load_model("shape:tiny-llama", head="causal-lm"), spec).counts()
    quantized = peftlab.apply(_quantized(kind), spec).counts()
    meta = peftlab.apply(
        peftlab.load_model("shape:tiny-llama", head="causal-lm", meta=True, quantize=kind), spec
    ).counts()
    assert quantized.backbone_params == full.backbone_params == meta.backbone_params
    assert quantized.trainable_params == full.trainable_params
    assert quantized.stored_params == full.stored_params
    # nothing merges into a quantized base, so what changes is the adapter itself
    assert quantized.changed_params == quantized.stored_params < full.changed_params
    assert quantized.quantize == kind and full.quantize is None
    assert quantized.backbone_bytes == meta.backbone_bytes  # the meta estimate is the real storage, byte for byte
    # the block linears (not embeddings, norms, head) shrink 8x (nf4, plus block scales) or 4x (int8, plus row scales)
    linear = sum(
        m.weight.numel()
        for m in peftlab.load_model("shape:tiny-llama", head="causal-lm").model.layers.modules()
        if isinstance(m, nn.Linear)
    )
    saved = full.backbone_bytes - quantized.backbone_bytes
    ratio = {"nf4": 4 - 0.5 - 4 / 64, "int8": 4 - 1}[kind]
    assert saved == pytest.approx(linear * ratio, rel=0.05)
    assert f"({kind})" in quantized.table().splitlines()[0]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_exports_to_peft_and_runs_there_on_the_same_quantized_base(kind: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    pm = peftlab.apply(_quantized(kind), methods.lora(r=4, targets="all-linear"))
    batch = make_batch(pm.base_model)
    _train(pm, batch, steps=3)
    expected = _logits(pm, batch)
    with pm.disable_adapters():
        reference = _logits(pm, batch)
    assert not torch.allclose(expected, reference, atol=1e-4)
    pm.save(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(_quantized(kind), tmp_path)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QUANTIZED[kind])  # peft's bitsandbytes LoRA layer, on the same base
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=0)


def test_full_fine_tuning_is_refused_on_a_quantized_base() -> None:
    with pytest.raises(SpecError, match="full fine-tuning cannot train a base quantized to nf4"):
        peftlab.apply(_quantized("nf4"), methods.full())


def test_a_bad_quantize_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PeftlabError, match="unknown --quantize 'fp4'; choose one of: nf4, int8"):
        peftlab.load_model("shape:tiny-llama", quantize="fp4")
    for command in (
        ["show", "--model", "shape:tiny-llama", "--method", "lora"],
        ["train", "--model", "shape:tiny-llama", "--task", "rte", "--method", "lora", "--output", "x"],
        ["generate", "--model", "shape:tiny-llama", "--prompt", "hi"],
        ["eval", "--model", "shape:tiny-llama", "--task", "rte", "--adapter", "x"],
    ):
        assert main([*command, "--quantize", "fp4"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unknown --quantize 'fp4'" in err


def test_quantizing_without_bitsandbytes_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(PeftlabError, match=r"--quantize needs bitsandbytes: pip install \"peftlab\[quant\]\""):
        peftlab.load_model("shape:tiny-llama", quantize="nf4")


def test_show_prints_the_quantized_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--model", "shape:tiny-llama", "--method", "lora", "--quantize", "int8", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"quantize": "int8"' in out and '"backbone_bytes": ' in out


def test_a_search_trains_its_trials_on_the_quantized_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``search --quantize`` stores the setting in the study's definition: every trial (and a later worker, and
    ``pareto retrain``) trains on the NF4 base, and each trial's record counts its quantized size."""
    from test_search import DATA

    from peftlab.cli import main

    if not (DATA / "glue" / "SST-2").is_dir():
        pytest.skip(f"no GLUE data under {DATA}")
    out = tmp_path / "s"
    flags = ["--model", "shape:tiny-llama", "--task", "sst2", "--data-dir", str(DATA), "--k", "32", "--dev-size", "16"]
    args = [*flags, "--sampler", "random", "--trials", "2", "--max-steps", "2", "--quantize", "nf4", "--no-plots"]
    assert main(["search", *args, "--output", str(out), "--no-progress"]) == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/record.json"))]
    assert len(records) == 2
    assert all(r["config"]["quantize"] == "nf4" and r["counts"]["quantize"] == "nf4" for r in records)
    capsys.readouterr()
    assert main(["pareto", "show", "--storage", str(out / "study.db"), "--study", "peftlab", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["definition"]["train"]["quantize"] == "nf4"
