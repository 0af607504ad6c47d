"""Every method on every backbone family: the contract each module must keep."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKBONES, logits, make_batch, make_model, preset

import peftlab
from peftlab import methods
from peftlab.errors import AdapterLoadError, SpecError

#: Methods whose modules start as the identity (the model is unchanged before training).
NOT_IDENTITY = {
    "prefix", "prompt", "mam", "unipelt", "unipelt-ap", "unipelt-nogate", "krona-res", "adaptive-prefix", "fuse",
    "prefix-survey", "mam-survey", "unipelt-survey", "sparse-adapter",
}  # fmt: skip
#: Methods that need bias terms (Llama, Qwen2's MLP and T5 have none or too few).
NEEDS_BIAS = {"bitfit"}
BIAS_FREE = {"tiny-llama", "tiny-t5"}
#: Methods that tune cross-attention, which only encoder-decoders (T5) have.
NEEDS_CROSS_ATTENTION = {"cross-attn"}
WITH_CROSS_ATTENTION = {"tiny-t5"}

CASES = [
    pytest.param(shape, head, name, id=f"{shape}-{head}-{name}")
    for shape, head in BACKBONES
    for name in methods.METHODS
]


def _applicable(shape: str, head: str, name: str) -> bool:
    if name in NEEDS_BIAS and shape in BIAS_FREE:
        return False
    if name in NEEDS_CROSS_ATTENTION and shape not in WITH_CROSS_ATTENTION:
        return False
    # An LM head is not a task head: "head" alone trains nothing there.
    return not (name == "head" and head in ("causal-lm", "seq2seq"))


def _perturb(pm) -> None:
    """Move every adapter parameter away from its (often identity) initial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pm.adapters[pm.active_adapter].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("shape", "head", "name"), CASES)
def test_method_contract(shape: str, head: str, name: str, tmp_path) -> None:
    model = make_model(shape, head)
    batch = make_batch(model)
    base_out = logits(model, batch)
    if not _applicable(shape, head, name):
        with pytest.raises(SpecError):
            peftlab.apply(model, preset(name))
        return
    pm = peftlab.apply(model, preset(name, model, tmp_path))

    # Identity at init for modules designed to start as the identity.
    out = logits(pm, batch)
    if name not in NOT_IDENTITY:
        torch.testing.assert_close(out, base_out, rtol=0, atol=1e-5)

    # Forward + backward; exactly the intended parameters get gradients.
    pm.train()
    pm(**batch).logits.float().pow(2).mean().backward()
    pm.eval()
    intended = {id(p) for p in (model.parameters() if name == "full" else pm.adapters["default"].parameters())}
    for pname, p in pm.named_parameters():
        assert p.requires_grad == (id(p) in intended), pname
        assert (p.grad is not None) == p.requires_grad, pname
    if name != "full":
        assert all(p.grad is None for p in model.parameters())

    _perturb(pm)
    tuned = logits(pm, batch)
    if name != "full":
        # Decoder LMs with a soft prompt also return logits for the prompt positions (as peft does).
        comparable = tuned[:, -base_out.shape[1] :] if tuned.dim() == 3 else tuned
        assert not torch.allclose(comparable, base_out, atol=1e-4), "perturbed adapter should change the output"

    # Merged outputs equal unmerged ones; unmerge restores the backbone exactly (up to float error).
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm.merge()
    torch.testing.assert_close(logits(pm, batch), tuned, rtol=1e-4, atol=1e-4)
    pm.unmerge()
    torch.testing.assert_close(logits(pm, batch), tuned, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-5)

    # Save -> load on a fresh copy of the same base gives identical outputs.
    pm.save(tmp_path / "adapter")
    fresh = make_model(shape, head)
    loaded = peftlab.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "head"), BACKBONES)
def test_wrong_base_is_refused(shape: str, head: str, tmp_path) -> None:
    pm = peftlab.apply(make_model(shape, head), methods.lora())
    pm.save(tmp_path / "a")
    other = make_model(shape, head, seed=1)  # same architecture, different weights
    with pytest.raises(AdapterLoadError, match="different weights"):
        peftlab.load(other, tmp_path / "a")
    different = make_model("tiny-bert" if shape != "tiny-bert" else "tiny-roberta", "seq-cls")
    with pytest.raises(AdapterLoadError, match="different base model"):
        peftlab.load(different, tmp_path / "a")


#: Methods whose cached generation may differ from uncached generation (none: UniPELT's gates are running means over
#: the real tokens in decoders, continued across cached steps).
SEQUENCE_GATED: set[str] = set()
#: the backbones that generate: Llama and GPT-2 language models, T5 text-to-text
GENERATORS = [(shape, head) for shape, head in BACKBONES if head in ("causal-lm", "seq2seq")]
GENERATION_CASES = [
    pytest.param(shape, head, name, id=f"{shape}-{name}")
    for shape, head in GENERATORS
    for name in methods.METHODS
    if _applicable(shape, head, name)
]


def _generate(pm, batch: dict[str, torch.Tensor], use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits they were chosen from (the KV cache on, as generation runs it)."""
    out = pm.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None, use_cache=use_cache,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize(("shape", "head", "name"), GENERATION_CASES)
def test_method_generation_contract(shape: str, head: str, name: str, tmp_path) -> None:
    """The generation row: identity at init, a changed adapter changes what is generated, the same with and without the
    KV cache, merged generations are the unmerged ones, and a saved adapter generates the same after loading."""
    model = make_model(shape, head)
    batch = make_batch(model)
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # decoders generate from left-padded prompts
    batch.pop("decoder_input_ids", None)
    base_ids, base_logits = _generate(model, batch)
    pm = peftlab.apply(model, preset(name, model, tmp_path))
    ids, _ = _generate(pm, batch)
    if name not in NOT_IDENTITY:
        assert torch.equal(ids, base_ids)
    _perturb(pm)
    tuned_ids, tuned_logits = _generate(pm, batch)
    if name not in SEQUENCE_GATED:
        uncached_ids, uncached_logits = _generate(pm, batch, use_cache=False)  # each module sees each position once
        assert torch.equal(uncached_ids, tuned_ids)
        torch.testing.assert_close(uncached_logits, tuned_logits, rtol=1e-4, atol=1e-4)
    if name != "full":
        assert not torch.allclose(tuned_logits, base_logits, atol=1e-4), "a changed adapter must change generation"
    pm.merge()
    merged_ids, merged_logits = _generate(pm, batch)
    assert torch.equal(merged_ids, tuned_ids)
    torch.testing.assert_close(merged_logits, tuned_logits, rtol=1e-4, atol=1e-4)
    pm.unmerge()
    pm.save(tmp_path / "adapter")
    loaded = peftlab.load(make_model(shape, head), tmp_path / "adapter")
    loaded_ids, loaded_logits = _generate(loaded, batch)
    assert torch.equal(loaded_ids, tuned_ids)
    torch.testing.assert_close(loaded_logits, tuned_logits, rtol=1e-5, atol=1e-5)
