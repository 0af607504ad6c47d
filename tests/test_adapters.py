"""Several named adapters on one model, switching, unloading, safe saving, and the transformers Trainer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, make_batch, make_model

import peftlab
from peftlab import methods
from peftlab.errors import AdapterLoadError, PeftlabError, SpecError


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_named_adapters_switch_and_disable(tiny_bert) -> None:
    batch = make_batch(tiny_bert)
    base = logits(tiny_bert, batch)
    pm = peftlab.apply(tiny_bert, methods.lora(), adapter_name="a")
    _perturb(pm.adapters["a"], 1)
    pm.add_adapter("b", methods.pfeiffer())
    _perturb(pm.adapters["b"], 2)
    out_a = logits(pm, batch)
    pm.set_adapter("b")
    out_b = logits(pm, batch)
    assert not torch.allclose(out_a, out_b)
    assert all(p.requires_grad for p in pm.adapters["b"].parameters())
    assert not any(p.requires_grad for p in pm.adapters["a"].parameters())
    with pm.disable_adapters():
        torch.testing.assert_close(logits(pm, batch), base)
    pm.set_adapter("a")
    torch.testing.assert_close(logits(pm, batch), out_a)
    pm.delete_adapter("b")
    assert list(pm.adapters) == ["a"]


def test_switching_while_merged_is_refused(tiny_bert) -> None:
    pm = peftlab.apply(tiny_bert, methods.lora(), adapter_name="a")
    pm.add_adapter("b", methods.lora(r=4))
    pm.merge()
    with pytest.raises(SpecError, match="adapter 'a' is merged; call unmerge"):
        pm.set_adapter("b")
    pm.unmerge()
    pm.set_adapter("b")


def test_adapter_name_and_duplicates(tiny_bert) -> None:
    pm = peftlab.apply(tiny_bert, methods.lora())
    with pytest.raises(SpecError, match="already exists"):
        pm.add_adapter("default", methods.lora())
    with pytest.raises(SpecError, match="is not valid"):
        pm.add_adapter("has space", methods.lora())
    with pytest.raises(SpecError, match="no adapter named 'x'"):
        pm.set_adapter("x")
    with pytest.raises(SpecError, match="already has peftlab adapters"):
        peftlab.apply(pm, methods.lora())


def test_merge_and_unload_gives_a_plain_model(tiny_bert) -> None:
    batch = make_batch(tiny_bert)
    pm = peftlab.apply(tiny_bert, methods.lora(targets="all-linear"))
    _perturb(pm.adapters["default"], 3)
    tuned = logits(pm, batch)
    plain = pm.merge_and_unload()
    assert type(plain).__name__ == "BertForSequenceClassification"
    assert not plain._forward_hooks and not plain.classifier._forward_hooks
    torch.testing.assert_close(logits(plain, batch), tuned, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_refuses_unmergeable_modules(tiny_bert) -> None:
    pm = peftlab.apply(tiny_bert, methods.pfeiffer())
    with pytest.raises(SpecError, match="cannot be merged"):
        pm.merge_and_unload()


def test_merged_model_runs_without_hooks(tiny_bert) -> None:
    pm = peftlab.apply(tiny_bert, methods.ia3())
    pm.merge()
    hooked = [n for n, m in tiny_bert.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == ["classifier"]  # only the adapter's own head copy remains


def test_save_never_overwrites(tiny_bert, tmp_path) -> None:
    pm = peftlab.apply(tiny_bert, methods.lora())
    target = tmp_path / "adapter"
    pm.save(target)
    before = (target / "adapter.safetensors").read_bytes()
    _perturb(pm.adapters["default"], 4)
    with pytest.raises(PeftlabError, match="is not empty"):
        pm.save(target)
    assert (target / "adapter.safetensors").read_bytes() == before
    pm.save(target, overwrite=True)
    assert (target / "adapter.safetensors").read_bytes() != before


def test_saved_folder_is_safetensors_and_json(tiny_bert, tmp_path) -> None:
    pm = peftlab.apply(tiny_bert, methods.unipelt())
    pm.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors", "peftlab_adapter.json"]
    meta = json.loads((tmp_path / "a" / "peftlab_adapter.json").read_text())
    assert meta["spec"]["method"] == "unipelt"
    assert meta["spec"]["layers"]["*"]["attn"]["reparam"] is False  # stored as key/values
    assert meta["fingerprint"]["weights_sha256"]


def test_loading_adds_a_named_adapter(tiny_bert, tmp_path) -> None:
    batch = make_batch(tiny_bert)
    pm = peftlab.apply(tiny_bert, methods.prefix())
    pm.save(tmp_path / "p")
    expected = logits(pm, batch)
    other = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.lora())
    peftlab.load(other, tmp_path / "p", adapter_name="prefix")
    assert other.active_adapter == "prefix"
    torch.testing.assert_close(logits(other, batch), expected)


@pytest.mark.parametrize("fmt", ["peftlab", "peft"])
def test_a_failed_load_leaves_no_half_loaded_adapter(tiny_bert, tmp_path, fmt: str) -> None:
    """Both formats: tensors that do not fit the spec are refused, and the model is as it was before the load."""
    saved = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.lora(r=4))
    saved.save(tmp_path / "a", format=fmt)
    config = tmp_path / "a" / ("peftlab_adapter.json" if fmt == "peftlab" else "adapter_config.json")
    data = json.loads(config.read_text())
    if fmt == "peftlab":
        data["spec"]["layers"]["*"]["q"]["r"] = 8
    else:
        data["r"] = 8
    config.write_text(json.dumps(data))
    batch = make_batch(tiny_bert)
    pm = peftlab.apply(tiny_bert, methods.ia3())
    before = logits(pm, batch)
    with pytest.raises(AdapterLoadError, match="shape"):
        peftlab.load(pm, tmp_path / "a", adapter_name="broken")
    assert list(pm.adapters) == ["default"] and pm.active_adapter == "default"
    torch.testing.assert_close(logits(pm, batch), before)


def test_loading_bad_folders(tiny_bert, tmp_path) -> None:
    with pytest.raises(AdapterLoadError, match="does not exist"):
        peftlab.load(tiny_bert, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="neither a peftlab adapter"):
        peftlab.load(tiny_bert, tmp_path / "empty")
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.lora())
    pm.save(tmp_path / "ok")
    (tmp_path / "ok" / "peftlab_adapter.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match=r"peftlab adapter description .* is not valid JSON"):
        peftlab.load(tiny_bert, tmp_path / "ok")


def test_transformers_trainer_trains_only_the_adapter(tiny_bert, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    pm = peftlab.apply(tiny_bert, methods.lora())
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 128, (8,), generator=g).tolist(), "labels": i % 2} for i in range(16)]
    frozen = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    start = {k: v.clone() for k, v in pm.adapters["default"].state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    Trainer(model=pm, args=args, train_dataset=rows).train()
    for k, v in tiny_bert.state_dict().items():
        torch.testing.assert_close(v, frozen[k])
    changed = [k for k, v in pm.adapters["default"].state_dict().items() if not torch.equal(v, start[k])]
    assert any("lora_B" in k for k in changed)


@pytest.mark.parametrize(
    ("shape", "head"), [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm"), ("tiny-t5", "seq2seq")]
)
@pytest.mark.parametrize("name", ["lora", "prefix", "prompt", "unipelt"])
def test_generation_with_cache_matches_without(shape: str, head: str, name: str) -> None:
    """Prefixes and prompts must be seen exactly once whether or not generate() reuses a cache."""
    pm = peftlab.apply(make_model(shape, head), methods.get(name))
    _perturb(pm.adapters["default"], 5)
    batch = make_batch(pm.base_model)
    batch.pop("decoder_input_ids", None)
    kw = {"max_new_tokens": 4, "do_sample": False}
    with_cache = pm.generate(**batch, **kw)
    without = pm.generate(**batch, use_cache=False, **kw)
    assert torch.equal(with_cache, without)
