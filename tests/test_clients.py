"""Real clients of a peftlab model, unchanged: transformers' Trainer and generate, trl's SFTTrainer, and peft loading an
exported adapter and generating the same tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

import peftlab
from peftlab import methods

datasets = pytest.importorskip("datasets")
WORDS = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(125))]  # tiny-llama's 128 ids


def _tokenizer() -> PreTrainedTokenizerFast:
    """A real transformers tokenizer (word level) over tiny-llama's vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _prompts(n: int = 64) -> list[tuple[str, str]]:
    """Prompts of two words and the same one-word completion: learnable in a few dozen steps."""
    return [(f"w{3 + i % 50} w{5 + i % 40}", "w100") for i in range(n)]


def _frozen_state(pm: peftlab.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pm.base_model.state_dict().items()}


def _assert_backbone_unchanged(pm: peftlab.PeftModel, before: dict[str, torch.Tensor]) -> None:
    for k, v in pm.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _greedy(pm: torch.nn.Module, tok: PreTrainedTokenizerFast, prompt: str, use_cache: bool = True) -> str:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                      pad_token_id=0, eos_token_id=2, use_cache=use_cache)  # fmt: skip
    return tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def test_transformers_trainer_trains_a_peftlab_model(tmp_path) -> None:
    tok = _tokenizer()
    pm = peftlab.apply(make_model("tiny-llama", "causal-lm"), methods.get("lora", targets="all-linear"))
    before = _frozen_state(pm)
    rows = []
    for prompt, completion in _prompts():
        p, c = tok(prompt)["input_ids"], tok(completion)["input_ids"] + [2]
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], logging_steps=10, save_strategy="no", use_cpu=True)  # fmt: skip
    trainer = Trainer(model=pm, args=args, train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    _assert_backbone_unchanged(pm, before)
    assert _greedy(pm, tok, "w7 w9") == "w100"


@pytest.mark.parametrize("name", ["lora", "prompt"])
def test_trl_sft_trainer_trains_a_peftlab_model(name: str, tmp_path) -> None:
    """SFTTrainer patches the forward of the model it is given with its fused LM head (as it patches the base model
    of a peft model); peftlab's hooks, prompts included, still run, and generation afterwards is unharmed."""
    trl = pytest.importorskip("trl")
    tok = _tokenizer()
    spec = methods.get("lora", targets="all-linear") if name == "lora" else methods.get("prompt", length=4)
    pm = peftlab.apply(make_model("tiny-llama", "causal-lm"), spec)
    before = _frozen_state(pm)
    initial = [p.detach().clone() for p in pm.adapters["default"].parameters()]
    data = datasets.Dataset.from_list([{"prompt": p, "completion": " " + c} for p, c in _prompts()])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-2,
                         report_to=[], logging_steps=10, save_strategy="no", use_cpu=True, max_length=32)  # fmt: skip
    trainer = trl.SFTTrainer(model=pm, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    _assert_backbone_unchanged(pm, before)
    assert all(not torch.equal(a, b) for a, b in zip(initial, pm.adapters["default"].parameters(), strict=True))
    assert _greedy(pm, tok, "w7 w9") == _greedy(pm, tok, "w7 w9", use_cache=False)
    if name == "lora":  # a soft prompt moves a random tiny model's outputs too little to flip them in 40 steps
        assert _greedy(pm, tok, "w7 w9") == "w100"


def test_peft_generates_the_same_tokens_from_an_exported_adapter(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    pm = peftlab.apply(make_model("tiny-llama", "causal-lm"), methods.get("lora", r=4, targets="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.adapters["default"].parameters():
            p.normal_(0.0, 0.3)
    ids = torch.tensor([[1, 5, 9, 17, 33], [1, 40, 41, 42, 43]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    ours = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert not torch.equal(ours, make_model("tiny-llama", "causal-lm").generate(input_ids=ids, **kw))
    pm.save(tmp_path, format="peft")
    theirs = peft.PeftModel.from_pretrained(make_model("tiny-llama", "causal-lm"), tmp_path)
    assert torch.equal(theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw), ours)
