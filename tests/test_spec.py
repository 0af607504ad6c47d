"""The spec: JSON round trip, selector resolution, and one clear error per kind of mistake."""

from __future__ import annotations

import pytest
from conftest import NEEDS_FOLDERS, make_model, preset

import peftlab
from peftlab import Spec, methods
from peftlab.errors import SpecError


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_json_round_trip(name: str, tmp_path) -> None:
    spec = preset(name, make_model("tiny-bert", "seq-cls"), tmp_path) if name in NEEDS_FOLDERS else methods.get(name)
    again = Spec.from_json(spec.to_json())
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_selectors_resolve_in_order() -> None:
    spec = Spec.from_dict(
        {
            "layers": {
                "*": {"q": {"kind": "lora", "r": 4}},
                "1-2": {"q": {"kind": "lora", "r": 8}, "after_ffn": "adapter"},
                "2": {"q": None},
            }
        }
    )
    per_layer = spec.resolve(4, ["layers"] * 4)
    assert per_layer[0]["q"].r == 4 and "after_ffn" not in per_layer[0]
    assert per_layer[1]["q"].r == 8 and per_layer[1]["after_ffn"].size == 48
    assert "q" not in per_layer[2] and "after_ffn" in per_layer[2]
    assert per_layer[3]["q"].r == 4


def test_stack_selectors_on_t5() -> None:
    spec = Spec.from_dict({"layers": {"decoder": {"v": "lora"}}})
    pm = peftlab.apply(make_model("tiny-t5", "seq2seq"), spec)
    assert sorted(pm.adapters["default"].layers) == ["2-v", "3-v"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"layers": {"*": {"qq": "lora"}}}, "unknown site 'qq'; sites are: q, k"),
        ({"layers": {"*": {"q": "lorax"}}}, "unknown module kind 'lorax'; known kinds:"),
        ({"layers": {"*": {"q": {"kind": "lora", "r": 0}}}}, r"lora r must be an integer in \[1, 4096\], got 0"),
        ({"layers": {"*": {"q": {"kind": "lora", "rank": 4}}}}, "'lora' has no setting 'rank'; its settings are"),
        ({"layers": {"*": {"q": "adapter"}}}, "a 'adapter' module cannot sit at site 'q'; it fits at: after_attn"),
        (
            {"layers": {"*": {"after_ffn": {"kind": "adapter", "activation": "elu"}}}},
            "activation must be one of relu, gelu, silu, tanh",
        ),
        ({"layers": {"first": {"q": "lora"}}}, "layer selector 'first' is not valid"),
        ({"gates": "yes"}, "gates must be true or false"),
        ({"extra": 1}, "unknown spec field"),
        ({"model": {"input": {"kind": "prompt", "length": -1}}}, "prompt length must be an integer"),
        ({"peftlab_spec": 9}, "spec version 9 is not supported"),
        ({"layers": {"*": {"q": {"kind": "oft", "r": 4}}}}, "oft takes exactly one of r and block_size"),
        ({"layers": {"*": {"q": {"kind": "oft", "coft": 1}}}}, "oft coft must be true or false, got 1"),
        ({"layers": {"*": {"q": {"kind": "oft", "eps": 0}}}}, "oft eps must be a number > 0.0, got 0"),
        ({"layers": {"*": {"q": {"kind": "boft", "block_size": 0}}}}, "boft takes exactly one of block_size and"),
        (
            {"layers": {"*": {"q": {"kind": "boft", "butterfly_factor": 0}}}},
            r"boft butterfly_factor must be an integer in \[1, 32\], got 0",
        ),
        ({"layers": {"*": {"q": {"kind": "hra", "r": 0}}}}, r"hra r must be an integer in \[1, 4096\], got 0"),
        ({"layers": {"*": {"q": {"kind": "hra", "apply_gs": "yes"}}}}, "hra apply_gs must be true or false"),
        ({"layers": {"*": {"after_ffn": "hra"}}}, "a 'hra' module cannot sit at site 'after_ffn'; it fits at: cross_k"),
    ],
)
def test_bad_specs_get_one_clear_error(data: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        Spec.from_dict(data)
    assert "\n" not in str(info.value)


def test_model_dependent_errors(tiny_bert) -> None:
    with pytest.raises(SpecError, match=r"layer selector '5' is beyond the model's depth: it has 2 layers \(0-1\)"):
        peftlab.apply(tiny_bert, Spec.from_dict({"layers": {"5": {"q": "lora"}}}))
    with pytest.raises(SpecError, match=r"bitfit needs bias terms.*Llama and T5 are bias-free"):
        peftlab.apply(make_model("tiny-llama", "seq-cls"), methods.bitfit())
    with pytest.raises(SpecError, match="compacter n=5 must divide the hidden size 32"):
        peftlab.apply(tiny_bert, methods.compacter(size=10, n=5))
    with pytest.raises(SpecError, match="exist in no layer"):
        peftlab.apply(tiny_bert, Spec.from_dict({"layers": {"*": {"cross_q": "lora"}}}))
    with pytest.raises(SpecError, match="this model has no decoder stack"):
        peftlab.apply(tiny_bert, Spec.from_dict({"layers": {"decoder": {"q": "lora"}}}))
    with pytest.raises(SpecError, match="trains nothing"):
        peftlab.apply(make_model("tiny-gpt2", "causal-lm"), methods.head())


def test_method_argument_errors() -> None:
    with pytest.raises(SpecError, match="unknown method 'loraa'; methods are: lora, dora"):
        methods.get("loraa")
    with pytest.raises(SpecError, match=r"method 'lora'.*unexpected keyword argument 'rank'"):
        methods.get("lora", rank=4)
    with pytest.raises(SpecError, match="unknown target"):
        methods.lora(targets="qx")


def test_all_linear_targets_every_linear_the_block_has(tiny_bert) -> None:
    pm = peftlab.apply(tiny_bert, methods.lora(targets="all-linear"))
    sites = {k.split("-", 1)[1] for k in pm.adapters["default"].layers}
    assert sites == {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    llama = peftlab.apply(make_model("tiny-llama", "causal-lm"), methods.lora(targets="all-linear"))
    assert {k.split("-", 1)[1] for k in llama.adapters["default"].layers} == sites | {"ffn_gate"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "vera", "r": 0}, r"vera r must be an integer in \[1, 65536\], got 0"),
        ({"kind": "vera", "d_initial": -0.1}, "vera d_initial must be a number >= 0.0, got -0.1"),
        ({"kind": "vera", "seed": "x"}, "vera seed must be an integer >= 0, got 'x'"),
        ({"kind": "vera", "save_projection": "yes"}, "vera save_projection must be true or false"),
        ({"kind": "fourierft", "n_frequency": 0}, "fourierft n_frequency must be an integer >= 1, got 0"),
        ({"kind": "fourierft", "scaling": 0}, "fourierft scaling must be a number > 0.0, got 0"),
        ({"kind": "fourierft", "init": "uniform"}, "fourierft init must be one of normal, zeros, got 'uniform'"),
        ({"kind": "loha", "r": 1.5}, r"loha r must be an integer in \[1, 4096\], got 1.5"),
        ({"kind": "loha", "alpha": 0}, "loha alpha must be a number > 0.0, got 0"),
        ({"kind": "lokr", "decompose_factor": 0}, r"lokr decompose_factor \(or -1\) must be an integer >= 1, got 0"),
        ({"kind": "lokr", "decompose_both": 1}, "lokr decompose_both must be true or false, got 1"),
    ],
)
def test_bad_settings_of_the_peft_kinds_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        Spec.from_dict({"layers": {"*": {"q": settings}}})
    assert "\n" not in str(info.value)


def test_peft_kinds_refuse_what_the_model_cannot_take() -> None:
    llama = make_model("tiny-llama", "seq-cls")
    with pytest.raises(SpecError, match=r"layer 0 site 'v'.*n_frequency=1000 is more than the 512 spectral entries"):
        peftlab.apply(llama, methods.fourierft())
    two_ranks = Spec.from_dict({"layers": {"*": {"q": {"kind": "vera", "r": 4}, "v": {"kind": "vera", "r": 8}}}})
    with pytest.raises(SpecError, match="all vera sites of one adapter must share r, seed, save_projection"):
        peftlab.apply(llama, two_ranks)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (lambda: methods.oft(block_size=5), "layer site q: oft block_size=5 must divide the input width 32"),
        (lambda: methods.oft(block_size=0, r=32), "oft blocks of size 1 have no rotation"),
        (lambda: methods.boft(block_size=0, block_num=6), "boft block_num=6 must divide the input width 32"),
        (
            lambda: methods.boft(block_size=4, butterfly_factor=5),
            r"boft block_size × 2\^\(butterfly_factor-1\) = 64 must divide the input width 32",
        ),
        (lambda: methods.hra(r=40), "hra r=40 must be at most the input width 32"),
    ],
)
def test_orthogonal_sizes_that_do_not_fit_the_model(tiny_bert, spec, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        peftlab.apply(tiny_bert, spec())
    assert "\n" not in str(info.value)


def test_two_kinds_with_their_own_training_objectives_are_refused() -> None:
    both = Spec.from_dict(
        {"layers": {"*": {"after_ffn": {"kind": "adamix"}, "q": {"kind": "adalora"}}}}
    )  # fmt: skip
    with pytest.raises(SpecError, match="adalora and adamix each bring their own training objective"):
        both.training_loss()
    assert Spec.from_dict({"layers": {"*": {"after_ffn": {"kind": "adamix"}}}}).training_loss() is not None
