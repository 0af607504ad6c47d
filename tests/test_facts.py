"""The facts with one owner each: atomic writes, the model-type table and the named checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab import atomic
from peftlab.backbone.anatomy import FAMILIES, MODEL_TYPES, anatomy_for, model_type_facts
from peftlab.backbone.zoo import CHECKPOINTS, SHAPES


def _fail(path: Path) -> None:
    path.write_text("half")
    raise RuntimeError("disk full")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = atomic.write_json(tmp_path / "record.json", {"step": 1})
    with pytest.raises(RuntimeError):
        atomic.write_with(target, _fail)
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_folder_write_moves_no_file_in(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    with pytest.raises(RuntimeError):
        atomic.write_files(folder, {"a.json": lambda p: p.write_text("{}"), "b.bin": _fail})
    assert list(folder.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_every_model_type_has_one_family_and_its_facts() -> None:
    assert len(MODEL_TYPES) == sum(len(a.model_types) for a in FAMILIES)
    for name, facts in MODEL_TYPES.items():
        assert anatomy_for(name).family and facts.architecture in ("encoder", "decoder", "seq2seq")
    assert {n for n, t in MODEL_TYPES.items() if t.decoder_only} == {"llama", "qwen2", "mistral", "qwen3", "gpt2"}
    assert {n for n, t in MODEL_TYPES.items() if t.seq2seq} == {"t5", "mt5"}
    assert model_type_facts("mistral").default_head == "causal-lm" and model_type_facts("qwen3").task_head == "seq-cls"
    assert model_type_facts("roberta").position_offset(SHAPES["tiny-roberta"]) == 2
    assert model_type_facts("bert").position_offset(SHAPES["tiny-bert"]) == 0


def test_named_checkpoints_and_shapes_are_of_supported_model_types() -> None:
    for name, checkpoint in CHECKPOINTS.items():
        assert checkpoint.model_type in MODEL_TYPES, name
    for name, config in SHAPES.items():
        assert config.model_type in MODEL_TYPES, name


def test_every_t5_shape_can_train_a_seq2seq_head() -> None:
    """T5's decoder starts from the pad token: transformers 5 no longer defaults decoder_start_token_id, and without
    it the shifted labels of a training step cannot be built (T5-Base's shape failed on GSM8K)."""
    import copy

    import torch
    from transformers import T5ForConditionalGeneration

    for name, config in SHAPES.items():
        if config.model_type == "t5":
            assert (config.decoder_start_token_id, config.pad_token_id, config.eos_token_id) == (0, 0, 1), name
    small = copy.deepcopy(SHAPES["t5-base"])  # T5-Base's config at a size that builds at once
    small.update({"num_layers": 1, "num_decoder_layers": 1, "d_model": 16, "d_ff": 32, "num_heads": 2, "d_kv": 8})
    small.vocab_size = 64
    out = T5ForConditionalGeneration(small)(input_ids=torch.tensor([[5, 6, 1]]), labels=torch.tensor([[7, 1]]))
    assert torch.isfinite(out.loss)
