"""The peft format both ways: what peftlab exports runs in peft (and transformers) with the same outputs, and
what peft saves runs in peftlab with the same outputs. Adapters get random weights so that they change the
model; every comparison is on logits."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import logits, make_batch, make_model
from torch import nn

import peftlab
from peftlab.core.spec import Spec
from peftlab.errors import AdapterLoadError, PeftlabError
from peftlab.modules.linear import LoraSettings
from peftlab.modules.orthogonal import OftSettings
from peftlab.modules.reparam import FourierFTSettings, LohaSettings, LokrSettings
from peftlab.modules.whole import head_copy

peft = pytest.importorskip("peft")

HEADS = {"tiny-bert": "seq-cls", "tiny-llama": "causal-lm", "tiny-t5": "seq2seq", "tiny-gpt2": "causal-lm"}
ATOL = 1e-5


def _base(name: str, zero_positions: bool = False) -> nn.Module:
    """A tiny model; every call with the same name gives the same weights.

    ``zero_positions``: peft feeds prefixes as past key/values, so it starts BERT's (absolute) positions after
    the prefix, where peftlab starts them at 0. That cannot be converted away (interop warns about it);
    with the position embeddings zeroed the two conventions give the same numbers, and everything else
    about the prefix (layout, heads, mask) is compared exactly.
    """
    model = make_model(name, HEADS[name])
    if zero_positions:
        with torch.no_grad():
            model.bert.embeddings.position_embeddings.weight.zero_()
    return model


def _randomise(params: Iterable[nn.Parameter], seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.3)


def _peft_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a peft model; skips (naming both versions) where peft itself cannot run the adapter.

    peft 0.21 gives BERT its prefixes only through a ``past_key_values`` argument of the forward, which
    transformers 5.24 renamed ``cache``; peft then refuses prefix tuning on BERT before anything of peftlab's runs.
    """
    try:
        return logits(model, batch)
    except ValueError as err:
        if "does not support past key values" not in str(err):
            raise
        import transformers

        pytest.skip(
            f"peft {peft.__version__} cannot run prefix tuning on this model with transformers "
            f"{transformers.__version__}: {err}"
        )


def _per_site_lora() -> Spec:
    """LoRA on every linear site, with r, alpha and rsLoRA changed at some (peft's rank/alpha_pattern)."""
    common = LoraSettings(r=4, alpha=8.0)
    changed = {"q": LoraSettings(r=2, alpha=3.0, rslora=True), "v": LoraSettings(r=4, alpha=5.0)}
    return Spec(layers={"*": dict.fromkeys(("q", "k", "v", "o", "ffn_in", "ffn_out"), common), "1": changed})


def _per_site(common: object, changed: dict[str, object]) -> Spec:
    """A kind at q, v and the FFN of every layer, with other settings at some sites of layer 1 (peft's patterns)."""
    return Spec(layers={"*": dict.fromkeys(("q", "v", "ffn_in", "ffn_out"), common), "1": changed})


class _TorchBlockDiag:
    """Stands in for peft's BOFT CUDA extension (each factor's blocks as one block-diagonal matrix): without it peft
    runs one butterfly factor whatever its config says, so more than one can only be compared with it in place."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


@pytest.fixture
def boft_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peft.tuners.boft.layer, "_FBD_CUDA", _TorchBlockDiag())


_OFT_SITES = ["q", "v", "o", "ffn_in", "ffn_out"]


def _exact_oft() -> Spec:
    """OFT with the exact Cayley transform, a fixed number of blocks sharing one block, and COFT's projection (eps
    wide enough that the rotation still changes the outputs)."""
    s = OftSettings(r=4, block_size=0, cayley_neumann=False, block_share=True, coft=True, eps=0.5)
    return Spec(layers={"*": dict.fromkeys(["q", "k", "v", "o", "ffn_gate", "ffn_in", "ffn_out"], s)})


EXPORTS: dict[str, tuple[str, Callable[[], Spec]]] = {
    # AdaLoRA: before pruning (all init_r singular values) and pruned (test_adalora_export_keeps_the_pruned_ranks)
    "bert-adalora": ("tiny-bert", lambda: peftlab.methods.adalora(init_r=4, target_r=2, targets=["q", "v", "ffn_out"])),
    "llama-adalora": ("tiny-llama", lambda: peftlab.methods.adalora(init_r=3, target_r=2, total_step=50)),
    "bert-lora": ("tiny-bert", _per_site_lora),
    "bert-ia3": ("tiny-bert", peftlab.methods.ia3),
    "bert-prefix": ("tiny-bert", lambda: peftlab.methods.prefix(length=3, hidden=8)),
    "bert-prompt": ("tiny-bert", lambda: peftlab.methods.prompt(length=3)),
    "llama-lora": ("tiny-llama", lambda: peftlab.methods.lora(r=4, targets="all-linear")),
    # LN tuning: every norm of the blocks, the embedding norm (BERT) and the final norms (Llama; T5's two stacks)
    "bert-ln": ("tiny-bert", peftlab.methods.ln),
    "llama-ln": ("tiny-llama", peftlab.methods.ln),
    "t5-ln": ("tiny-t5", peftlab.methods.ln),
    # DoRA: the magnitude vector per output row (GPT-2's Conv1D stores its weight transposed)
    "bert-dora": ("tiny-bert", lambda: peftlab.methods.dora(r=4, targets=["q", "v", "ffn_in"])),
    "llama-dora": ("tiny-llama", lambda: peftlab.methods.dora(r=2, targets="all-linear")),
    "gpt2-dora": ("tiny-gpt2", lambda: peftlab.methods.dora(r=2, targets=["o", "ffn_in", "ffn_out"])),
    # Llama: grouped-query attention, and rotary positions (keys are rotated by the prefix length on export).
    "llama-prefix": ("tiny-llama", lambda: peftlab.methods.prefix(length=3, hidden=8)),
    "t5-lora": ("tiny-t5", lambda: peftlab.methods.lora(r=4, targets=["q", "v", "cross_v", "ffn_out"])),
    # VeRA: one pair of projections sized to the largest site (the FFN's 64 wide sides), sliced per site.
    "bert-vera": ("tiny-bert", lambda: peftlab.methods.vera(r=4, targets=["q", "v", "ffn_in", "ffn_out"])),
    "llama-vera": ("tiny-llama", lambda: peftlab.methods.vera(r=4, targets="all-linear", seed=3)),
    "llama-vera-unsaved": ("tiny-llama", lambda: peftlab.methods.vera(r=4, seed=3, save_projection=False)),
    "gpt2-vera": ("tiny-gpt2", lambda: peftlab.methods.vera(r=4, targets=["o", "ffn_in", "ffn_out"])),
    "bert-fourierft": (
        "tiny-bert",
        lambda: _per_site(FourierFTSettings(n_frequency=50), {"q": FourierFTSettings(n_frequency=20)}),
    ),
    "llama-fourierft": ("tiny-llama", lambda: peftlab.methods.fourierft(n_frequency=100, targets="all-linear")),
    "gpt2-fourierft": ("tiny-gpt2", lambda: peftlab.methods.fourierft(n_frequency=100, targets=["o", "ffn_out"])),
    "bert-loha": (
        "tiny-bert",
        lambda: _per_site(LohaSettings(r=4), {"q": LohaSettings(r=2, alpha=3.0), "v": LohaSettings(r=4, alpha=5.0)}),
    ),
    "llama-loha": ("tiny-llama", lambda: peftlab.methods.loha(r=2, targets="all-linear")),
    "t5-loha": ("tiny-t5", lambda: peftlab.methods.loha(r=2, targets=["q", "v", "cross_v", "ffn_out"])),
    # LoKr: W2 low rank at r=2, full at r=8 (the FFN's 8 x 8 W2); W1 low rank with decompose_both at r=1.
    "bert-lokr": (
        "tiny-bert",
        lambda: _per_site(LokrSettings(r=2), {"q": LokrSettings(r=8, alpha=3.0), "v": LokrSettings(r=1)}),
    ),
    "llama-lokr": (
        "tiny-llama",
        lambda: peftlab.methods.lokr(r=1, targets="all-linear", decompose_both=True, decompose_factor=4),
    ),
    # PiSSA / OLoRA export as the plain rank-2r LoRA peft's path_initial_model_for_weight_conversion writes, which
    # applies to the unchanged base; EVA (here without data: its plain start) exports as LoRA.
    "llama-pissa": ("tiny-llama", lambda: peftlab.methods.pissa(r=4, targets="all-linear")),
    "bert-olora": ("tiny-bert", lambda: peftlab.methods.olora(r=4, targets=["q", "v", "ffn_in", "ffn_out"])),
    "t5-pissa": ("tiny-t5", lambda: peftlab.methods.pissa(r=2, rslora=True, targets=["q", "v", "cross_v"])),
    "llama-eva": ("tiny-llama", lambda: peftlab.methods.eva(r=4)),
    "bert-oft": ("tiny-bert", lambda: peftlab.methods.oft(block_size=8, targets=_OFT_SITES)),
    "llama-oft-exact-coft-shared": ("tiny-llama", _exact_oft),
    "t5-oft": ("tiny-t5", lambda: peftlab.methods.oft(block_size=8, targets=["q", "v", "cross_v", "ffn_out"])),
    "bert-boft": ("tiny-bert", lambda: peftlab.methods.boft(block_size=4, butterfly_factor=2, targets=_OFT_SITES)),
    "llama-boft-block-num": (
        "tiny-llama",
        lambda: peftlab.methods.boft(block_size=0, block_num=8, butterfly_factor=3, targets="all-linear"),
    ),
    "bert-boft-one-factor": ("tiny-bert", lambda: peftlab.methods.boft(block_size=8, butterfly_factor=1)),
    "bert-hra": ("tiny-bert", lambda: peftlab.methods.hra(r=4, targets=_OFT_SITES)),
    "llama-hra-gs": ("tiny-llama", lambda: peftlab.methods.hra(r=5, apply_gs=True, targets="all-linear")),
    "t5-hra": ("tiny-t5", lambda: peftlab.methods.hra(r=2, targets=["q", "v", "cross_v", "ffn_out"])),
}


@pytest.mark.parametrize("case", EXPORTS)
@pytest.mark.usefixtures("boft_blocks")
def test_export_runs_in_peft_with_the_same_outputs(case: str, tmp_path: Path) -> None:
    name, make = EXPORTS[case]
    absolute_prefix = case == "bert-prefix"
    base = _base(name, absolute_prefix)
    batch = make_batch(base)
    reference = logits(base, batch)
    pm = peftlab.apply(base, make())
    _randomise(pm.adapters["default"].parameters())
    expected = logits(pm, batch)
    assert not torch.allclose(expected, reference, atol=1e-3)
    warns = pytest.warns(UserWarning, match="absolute position") if absolute_prefix else nullcontext()
    with warns:
        pm.save(tmp_path, format="peft")
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    loaded = peft.PeftModel.from_pretrained(_base(name, absolute_prefix), tmp_path)
    torch.testing.assert_close(_peft_logits(loaded, batch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_adalora_export_keeps_the_pruned_ranks(name: str, tmp_path: Path) -> None:
    """A pruned AdaLoRA adapter exports as peft saves one: each module's tensors cut to its kept singular values, listed
    in ``rank_pattern``; peft resizes its modules by the pattern and gives the same outputs."""
    base = _base(name)
    batch = make_batch(base)
    pm = peftlab.apply(base, peftlab.methods.adalora(init_r=4, target_r=2, targets=["q", "v", "o"]))
    _randomise(pm.adapters["default"].parameters())
    modules = list(pm.adapters["default"].layers.values())
    for i, m in enumerate(modules):  # ranks 4, 3, 2, 1, ... kept
        m.set_mask(torch.arange(4) < 4 - i % 4)
    expected = logits(pm, batch)
    pm.save(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(sum(v) for v in config["rank_pattern"].values()) == sorted(m.rank for m in modules)
    loaded = peft.PeftModel.from_pretrained(_base(name), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)
    ranks = [m.lora_E["default"].shape[0] for m in loaded.modules() if hasattr(m, "lora_E") and m.lora_E]
    assert sorted(ranks) == sorted(m.rank for m in modules)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_lora_export_loads_with_transformers_load_adapter(name: str, tmp_path: Path) -> None:
    """transformers wraps the seq-cls head in peft's ModulesToSaveWrapper, so the trained head loads too."""
    pm = peftlab.apply(_base(name), peftlab.methods.lora(r=4, targets="all-linear"))
    _randomise(pm.adapters["default"].parameters())
    pm.save(tmp_path, format="peft")
    model = _base(name)
    model.load_adapter(str(tmp_path))
    batch = make_batch(model)
    torch.testing.assert_close(logits(model, batch), logits(pm, batch), atol=ATOL, rtol=0)


IMPORTS: dict[str, tuple[str, Callable[[], object]]] = {
    "bert-lora": (
        "tiny-bert",
        lambda: peft.LoraConfig(
            task_type="SEQ_CLS",
            r=4,
            lora_alpha=8,
            target_modules=["query", "value", "intermediate.dense"],
            rank_pattern={r"layer\.1\.attention\.self\.query": 2},
            alpha_pattern={"value": 3},
        ),
    ),
    # A regular expression for targets; feedforward (input-scaled) modules are the FFN output projections.
    "bert-ia3": (
        "tiny-bert",
        lambda: peft.IA3Config(
            task_type="SEQ_CLS",
            target_modules=r".*\.(key|value|\d+\.output\.dense)",
            feedforward_modules=r".*\.\d+\.output\.dense",
        ),
    ),
    "bert-prefix": ("tiny-bert", lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "bert-prompt": ("tiny-bert", lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "llama-dora": (
        "tiny-llama",
        lambda: peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    # the blocks' norms only (no final norm): a spec of "norm" sites
    "llama-ln": (
        "tiny-llama",
        lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
    ),
    "bert-ln": ("tiny-bert", lambda: peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"])),
    # AdaLoRA before any pruning (all init_r singular values); pruned: test_pruned_peft_adalora_imports_its_ranks
    "llama-adalora": (
        "tiny-llama",
        lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=20, target_modules=["q_proj", "v_proj", "o_proj"]),
    ),
    "llama-lora": (
        "tiny-llama",
        lambda: peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=4,
            target_modules=["q_proj", "v_proj", "down_proj"],
            layers_to_transform=[1],
            use_rslora=True,
        ),
    ),
    "llama-ia3": ("tiny-llama", lambda: peft.IA3Config(task_type="CAUSAL_LM")),
    "llama-prefix": ("tiny-llama", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    # "q" and "v" name the self- and the cross-attention projections of both stacks.
    "t5-lora": ("tiny-t5", lambda: peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules=["q", "v"])),
    "bert-vera": (
        "tiny-bert",
        lambda: peft.VeraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value", "intermediate.dense"]),
    ),
    # Without the projections in the file: both libraries draw them again from projection_prng_key.
    "llama-vera-unsaved": (
        "tiny-llama",
        lambda: peft.VeraConfig(
            task_type="CAUSAL_LM",
            r=4,
            target_modules=["q_proj", "v_proj"],
            save_projection=False,
            projection_prng_key=5,
        ),
    ),
    "bert-fourierft": (
        "tiny-bert",
        lambda: peft.FourierFTConfig(
            task_type="SEQ_CLS",
            n_frequency=40,
            target_modules=["query", "value"],
            scaling=100.0,
            n_frequency_pattern={r"layer\.1\.attention\.self\.query": 20},
            random_loc_seed=3,
        ),
    ),
    "bert-loha": (
        "tiny-bert",
        lambda: peft.LoHaConfig(
            task_type="SEQ_CLS",
            r=4,
            alpha=8,
            target_modules=["query", "value", "output.dense"],
            rank_pattern={r"layer\.1\.attention\.self\.query": 2},
            alpha_pattern={"value": 3},
        ),
    ),
    "llama-lokr": (
        "tiny-llama",
        lambda: peft.LoKrConfig(
            task_type="CAUSAL_LM",
            r=1,
            target_modules=["q_proj", "v_proj", "down_proj"],
            decompose_both=True,
            rank_pattern={"down_proj": 8},
        ),
    ),
    "t5-lokr": ("tiny-t5", lambda: peft.LoKrConfig(task_type="SEQ_2_SEQ_LM", r=2, target_modules=["q", "v"])),
    "bert-oft": (
        "tiny-bert",
        lambda: peft.OFTConfig(
            task_type="SEQ_CLS", oft_block_size=8, target_modules=["query", "value", "intermediate.dense"]
        ),
    ),
    "llama-oft-exact": (
        "tiny-llama",
        lambda: peft.OFTConfig(
            task_type="CAUSAL_LM", r=4, oft_block_size=0, use_cayley_neumann=False, coft=True, eps=0.5
        ),
    ),
    "bert-boft": (
        "tiny-bert",
        lambda: peft.BOFTConfig(
            task_type="SEQ_CLS", boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["query", "value"]
        ),
    ),
    "llama-boft": (
        "tiny-llama",
        lambda: peft.BOFTConfig(task_type="CAUSAL_LM", boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2),
    ),
    "bert-hra": ("tiny-bert", lambda: peft.HRAConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])),
    "llama-hra-gs": ("tiny-llama", lambda: peft.HRAConfig(task_type="CAUSAL_LM", r=3, apply_GS=True)),
}


@pytest.mark.parametrize("case", IMPORTS)
@pytest.mark.usefixtures("boft_blocks")
def test_peft_adapter_runs_in_peftlab_with_the_same_outputs(case: str, tmp_path: Path) -> None:
    name, make = IMPORTS[case]
    absolute_prefix = case == "bert-prefix"
    made = peft.get_peft_model(_base(name, absolute_prefix), make())
    _randomise(p for p in made.parameters() if p.requires_grad)
    batch = make_batch(made)
    expected = _peft_logits(made, batch)
    made.save_pretrained(tmp_path)
    warns = pytest.warns(UserWarning, match="absolute position") if absolute_prefix else nullcontext()
    with warns:
        pm = peftlab.load(_base(name, absolute_prefix), tmp_path)
    assert isinstance(pm, peftlab.PeftModel)
    assert (head_copy(pm.adapters["default"]) is not None) == (HEADS[name] == "seq-cls")
    torch.testing.assert_close(logits(pm, batch), expected, atol=ATOL, rtol=0)


REFUSED_EXPORTS: dict[str, tuple[str, Callable[[], Spec], str]] = {
    "houlsby": (
        "tiny-bert",
        lambda: peftlab.methods.houlsby(size=4),
        r"'adapter' modules \(at after_attn, after_ffn\).*holds LoRA",
    ),
    "dora-on-some-sites": (
        "tiny-bert",
        lambda: Spec(layers={"*": {"q": LoraSettings(r=2, dora=True), "v": LoraSettings(r=2)}}),
        "one use_dora for all modules",
    ),
    "unipelt": ("tiny-bert", lambda: peftlab.methods.unipelt(size=4, prefix_length=2, r=2), "gates"),
    "prefix-some-layers": ("tiny-bert", lambda: peftlab.methods.prefix(length=2, layers=[0]), "every layer"),
    # peft's T5 prefixes reach the decoder's self-attention only; peftlab's also the encoder and the cross-attention.
    "t5-prefix-cross": ("tiny-t5", lambda: peftlab.methods.prefix(length=2, hidden=8), "cross-attention"),
    "gpt2-fused-qv": ("tiny-gpt2", lambda: peftlab.methods.lora(r=2), "fused projection 'transformer.h.0.attn.c_attn'"),
    "gpt2-fused-vera": ("tiny-gpt2", lambda: peftlab.methods.vera(r=2), "fused projection"),
    "gpt2-loha-conv1d": ("tiny-gpt2", lambda: peftlab.methods.loha(targets=["o"]), "does not take transformers'"),
    "fourierft-two-scalings": (
        "tiny-bert",
        lambda: _per_site(FourierFTSettings(n_frequency=8), {"q": FourierFTSettings(n_frequency=8, scaling=2.0)}),
        "one scaling for all modules",
    ),
    "lokr-two-factors": (
        "tiny-bert",
        lambda: _per_site(LokrSettings(), {"q": LokrSettings(decompose_factor=2)}),
        "one decompose_factor",
    ),
    # peftlab rotates q's and v's inputs separately; peft would rotate c_attn's input once for q, k and v.
    "gpt2-fused-oft": ("tiny-gpt2", lambda: peftlab.methods.oft(block_size=4), "fused projection"),
    # peft 0.21 builds OFT, BOFT and HRA on torch Linear layers only; peftlab also on GPT-2's Conv1D.
    "gpt2-hra-conv1d": ("tiny-gpt2", lambda: peftlab.methods.hra(r=2, targets="o"), "HRA takes torch Linear"),
    "gpt2-boft-conv1d": ("tiny-gpt2", lambda: peftlab.methods.boft(targets="o"), "BOFT takes torch Linear"),
    "oft-two-settings": (
        "tiny-bert",
        lambda: Spec(layers={"*": {"q": OftSettings(block_size=4), "v": OftSettings(block_size=8)}}),
        "one setting for all modules",
    ),
}


@pytest.mark.parametrize("case", REFUSED_EXPORTS)
def test_export_refuses_what_peft_cannot_hold(case: str, tmp_path: Path) -> None:
    name, make, message = REFUSED_EXPORTS[case]
    pm = peftlab.apply(_base(name), make())
    with pytest.raises(PeftlabError, match=message):
        pm.save(tmp_path / "out", format="peft")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_import_refuses_ia3_that_scales_an_attention_input(tmp_path: Path) -> None:
    """peft's default (IA)3 for BERT input-scales attention.output.dense too (it ends with 'output.dense')."""
    peft.get_peft_model(_base("tiny-bert"), peft.IA3Config(task_type="SEQ_CLS")).save_pretrained(tmp_path)
    where = r"input of 'bert.encoder.layer.0.attention.output.dense' \(site 'o'\)"
    with pytest.raises(AdapterLoadError, match=where):
        peftlab.load(_base("tiny-bert"), tmp_path)


def test_import_refuses_unsupported_options_and_types(tmp_path: Path) -> None:
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"], lora_bias=True)
    peft.get_peft_model(_base("tiny-bert"), config).save_pretrained(tmp_path / "bias")
    with pytest.raises(AdapterLoadError, match="lora_bias=True"):
        peftlab.load(_base("tiny-bert"), tmp_path / "bias")
    (tmp_path / "poly").mkdir()  # a peft type peftlab has no kind for (AdaLoRA was, until it had one)
    (tmp_path / "poly" / "adapter_config.json").write_text(json.dumps({"peft_type": "POLY"}))
    expected = (
        "LORA, ADALORA, LN_TUNING, IA3, VERA, FOURIERFT, LOHA, LOKR, OFT, BOFT, HRA, PREFIX_TUNING, PROMPT_TUNING"
    )
    with pytest.raises(AdapterLoadError, match=expected):
        peftlab.load(_base("tiny-bert"), tmp_path / "poly")


def test_ln_import_refuses_a_block_with_some_of_its_norms(tmp_path: Path) -> None:
    """peftlab's LN tuning trains every norm of a block together: the FFN's LayerNorm alone is refused in one line."""
    config = peft.LNTuningConfig(task_type="SEQ_CLS", target_modules=r".*\.\d+\.output\.LayerNorm")
    peft.get_peft_model(_base("tiny-bert"), config).save_pretrained(tmp_path)
    with pytest.raises(
        AdapterLoadError, match=r"leaves out 'bert\.encoder\.layer\.0\.attention\.output\.LayerNorm'"
    ) as e:
        peftlab.load(_base("tiny-bert"), tmp_path)
    assert "\n" not in str(e.value)


def test_pruned_peft_adalora_imports_its_ranks(tmp_path: Path) -> None:
    """peft prunes by its own allocator (update_and_allocate through the final phase) and saves each module cut to its
    kept ranks, listed in rank_pattern; peftlab puts them back in place, the pruned ones as zeros of Λ."""
    base = _base("tiny-bert")
    config = peft.AdaLoraConfig(
        task_type="SEQ_CLS", init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6, target_modules=["query", "value"]
    )
    made = peft.get_peft_model(base, config)
    _randomise(p for p in made.parameters() if p.requires_grad)
    opt = torch.optim.SGD([p for p in made.parameters() if p.requires_grad], lr=0.01)
    labelled = make_batch(made) | {"labels": torch.tensor([0, 1])}
    for step in range(6):
        made(**labelled).loss.backward()
        opt.step()
        made.base_model.update_and_allocate(step)
        opt.zero_grad()
    made.eval()
    batch = make_batch(made)
    expected = logits(made, batch)
    made.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and sum(sum(v) for v in pattern.values()) == 2 * len(pattern)  # target_r on average
    pm = peftlab.load(_base("tiny-bert"), tmp_path)
    torch.testing.assert_close(logits(pm, batch), expected, atol=ATOL, rtol=0)
    ranks = sorted(m.rank for m in pm.adapters["default"].layers.values())
    assert ranks == sorted(sum(v) for v in pattern.values())
    assert pm.adapters["default"].spec.method == "adalora"


def test_boft_import_follows_the_factors_peft_ran(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without its CUDA extension peft builds, runs and saves one butterfly factor though its config asks for two."""
    monkeypatch.setattr(peft.tuners.boft.layer, "get_fbd_cuda", lambda: None)
    config = peft.BOFTConfig(
        task_type="SEQ_CLS", boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["query", "value"]
    )
    made = peft.get_peft_model(_base("tiny-bert"), config)
    _randomise(p for p in made.parameters() if p.requires_grad)
    batch = make_batch(made)
    expected = logits(made, batch)
    made.save_pretrained(tmp_path)
    pm = peftlab.load(_base("tiny-bert"), tmp_path)
    assert {s.butterfly_factor for s in pm.adapters["default"].spec.resolve(2, ["encoder"] * 2)[0].values()} == {1}
    torch.testing.assert_close(logits(pm, batch), expected, atol=ATOL, rtol=0)
