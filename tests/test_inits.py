"""LoRA's initialisations (PiSSA, OLoRA, EVA) against the real peft, and the training options LoRA+ and GaLore."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import keyword_task, logits, make_batch, make_model

import peftlab
from peftlab import methods
from peftlab.errors import PeftlabError, SpecError
from peftlab.formats.keys import module_key
from peftlab.optional import available
from peftlab.train import TrainConfig, train
from peftlab.train.checkpoint import trainable
from peftlab.train.eva import initialize_eva
from peftlab.train.optim import param_groups

peft = pytest.importorskip("peft")

#: tiny-llama's q and v projections (32 -> 32, 32 -> 16) by their peft names
LLAMA_QV = ["q_proj", "v_proj"]


def _peft_lora(init: str, r: int, alpha: float, rslora: bool = False):
    base = make_model("tiny-llama", "causal-lm")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=LLAMA_QV, init_lora_weights=init, use_rslora=rslora)
    return peft.get_peft_model(base, config)


def _peft_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of each layer's q and v in the peft model, keyed as peftlab's modules."""
    out = {}
    for i, layer in enumerate(model.base_model.model.model.layers):
        for site, lin in (("q", layer.self_attn.q_proj), ("v", layer.self_attn.v_proj)):
            out[module_key(i, site)] = (lin.lora_A["default"].weight, lin.lora_B["default"].weight)
    return out


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_pissa_and_olora_start_as_peft_and_leave_the_model_unchanged(init: str, rslora: bool, tmp_path: Path) -> None:
    base = make_model("tiny-llama", "causal-lm")
    batch = make_batch(base)
    reference = logits(base, batch)
    spec = methods.pissa(r=4, alpha=8.0, rslora=rslora) if init == "pissa" else methods.olora(r=4, alpha=8.0)
    pm = peftlab.apply(base, spec)
    torch.testing.assert_close(logits(pm, batch), reference, rtol=0, atol=1e-5)  # unchanged at init
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), make_model("tiny-llama", "causal-lm")
                                                  .state_dict().values(), strict=True))  # fmt: skip
    theirs = _peft_lora(init, 4, 8.0, rslora)
    torch.testing.assert_close(logits(theirs, batch), reference, rtol=0, atol=1e-4)  # peft's residual + adapter
    factors = _peft_factors(theirs)
    for key, module in pm.adapters["default"].layers.items():
        a, b = factors[key]
        # the same factors (singular vectors up to sign: the product B·A is sign-free)
        torch.testing.assert_close(module.lora_B @ module.lora_A, b @ a, rtol=0, atol=1e-5)
        torch.testing.assert_close(module.lora_A.abs(), a.abs(), rtol=0, atol=1e-5)
    # Train both the same way (the same new A, B): the models agree, and the exported plain LoRA (peft's
    # path_initial_model_for_weight_conversion) on the unchanged base gives the same outputs in peft.
    torch.manual_seed(3)
    with torch.no_grad():
        for key, module in pm.adapters["default"].layers.items():
            a, b = factors[key]
            da, db = torch.randn_like(a) * 0.2, torch.randn_like(b) * 0.2
            a.copy_(module.lora_A + da)
            b.copy_(module.lora_B + db)
            module.lora_A.copy_(a)
            module.lora_B.copy_(b)
    tuned = logits(pm, batch)
    assert not torch.allclose(tuned, reference, atol=1e-3)
    torch.testing.assert_close(logits(theirs, batch), tuned, rtol=0, atol=1e-4)
    pm.save(tmp_path / "export", format="peft")
    loaded = peft.PeftModel.from_pretrained(make_model("tiny-llama", "causal-lm"), tmp_path / "export")
    torch.testing.assert_close(logits(loaded, batch), tuned, rtol=0, atol=1e-5)
    # and peft's own conversion of its trained model agrees with peftlab's export
    theirs.peft_config["default"].init_lora_weights = True
    init_dir = tmp_path / "peft" / "initial"
    fresh = _peft_lora(init, 4, 8.0, rslora)
    fresh.peft_config["default"].init_lora_weights = True
    fresh.save_pretrained(init_dir)
    theirs.peft_config["default"].init_lora_weights = init
    theirs.save_pretrained(tmp_path / "peft" / "trained", path_initial_model_for_weight_conversion=str(init_dir))
    converted = peft.PeftModel.from_pretrained(make_model("tiny-llama", "causal-lm"), tmp_path / "peft" / "trained")
    torch.testing.assert_close(logits(converted, batch), tuned, rtol=0, atol=1e-5)


def test_pissa_counts_store_the_start_and_pissa_niter_keeps_the_model() -> None:
    pm = peftlab.apply(make_model("tiny-llama", "causal-lm"), methods.pissa(r=4))
    counts = pm.counts()
    assert counts.stored_params == 2 * counts.trainable_params  # A, B and the frozen A0, B0
    base = make_model("tiny-llama", "causal-lm")
    batch = make_batch(base)
    reference = logits(base, batch)
    pm = peftlab.apply(base, methods.pissa(r=4, niter=2))
    torch.testing.assert_close(logits(pm, batch), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: methods.lora(r=4) and peftlab.modules.linear.LoraSettings(init="svd").check_at(), "init must be"),
        (lambda: peftlab.modules.linear.LoraSettings(init="pissa_niter_0").check_at(), "init must be"),
        (lambda: peftlab.modules.linear.LoraSettings(init="olora", dora=True).check_at(), "cannot be combined"),
        (lambda: methods.eva(rho=0.5), "eva_rho must be"),
        (lambda: peftlab.apply(make_model("tiny-llama", "causal-lm"), methods.pissa(r=64)), "needs r <="),
    ],
)
def test_bad_inits_are_one_line_errors(make, message: str) -> None:
    with pytest.raises(SpecError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_eva_sets_a_from_the_input_components_and_redistributes_ranks(tmp_path: Path) -> None:
    base = make_model("tiny-llama", "causal-lm")
    pm = peftlab.apply(base, methods.eva(r=4, rho=2.0, targets="all-linear"))
    batches = [make_batch(base, batch=4, length=9, seed=s) for s in range(3)]
    reference = [logits(base, b) for b in batches]
    ranks = initialize_eva(pm, batches)
    sites = len(ranks)
    assert sum(ranks.values()) == 4 * sites and max(ranks.values()) <= 8  # budget r per site, at most r·rho
    assert len(set(ranks.values())) > 1  # redistributed
    for b, ref in zip(batches, reference, strict=True):
        torch.testing.assert_close(logits(pm, b), ref, rtol=0, atol=1e-6)  # B is zero: the model is unchanged
    # A's rows are the top principal directions of the site's (centred) inputs over the real tokens
    layer0 = pm.blocks[0].linear("q").module
    seen: list[torch.Tensor] = []
    h = layer0.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with pm.disable_adapters(), torch.no_grad():
        rows = []
        for b in batches:
            pm(**b)
            rows.append(seen.pop()[b["attention_mask"].bool()])
    h.remove()
    x = torch.cat(rows).double()
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    a = pm.adapters["default"].layers["0-q"].lora_A
    r = ranks["0-q"]
    if r:
        cos = (a.double() @ vh[:r].T).abs().diagonal()
        assert torch.all(cos > 0.999), cos
    # the redistributed ranks save and load; the scaling stays alpha/r (alpha scaled with the rank, as peft's)
    for key, module in pm.adapters["default"].layers.items():
        assert module.lora_A.shape[0] == ranks[key] and module.scaling == pytest.approx(16.0 / 4)
    _perturb = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.adapters["default"].parameters():
            p.add_(torch.randn(p.shape, generator=_perturb) * 0.1)
    pm.save(tmp_path / "b")
    pm.save(tmp_path / "peft", format="peft")
    loaded = peftlab.load(make_model("tiny-llama", "causal-lm"), tmp_path / "b")
    torch.testing.assert_close(logits(loaded, batches[0]), logits(pm, batches[0]), rtol=0, atol=1e-5)
    in_peft = peft.PeftModel.from_pretrained(make_model("tiny-llama", "causal-lm"), tmp_path / "peft")
    torch.testing.assert_close(logits(in_peft, batches[0]), logits(pm, batches[0]), rtol=0, atol=1e-5)


def _config(tmp_path: Path, **kw) -> TrainConfig:
    base = {
        "model": "shape:tiny-bert", "task": "keyword", "train_file": str(keyword_task(tmp_path)), "dev_size": 32,
        "batch_size": 8, "max_length": 16, "max_steps": 8, "eval_every": 8, "lr": 1e-2, "warmup_ratio": 0.0,
        "dropout": 0.0, "progress": False,
    }  # fmt: skip
    return TrainConfig(**(base | kw))


def test_training_runs_eva_on_the_first_batches(tmp_path: Path) -> None:
    record = train(methods.eva(r=4), _config(tmp_path, init_batches=2, output=str(tmp_path / "run")))
    assert record.status == "completed"
    ranks = record.counts["eva_ranks"]
    assert sum(ranks.values()) == 4 * len(ranks)
    assert record.counts["trainable_params"] == sum(ranks.values()) * (32 + 32) + 66  # A, B and the head


def test_loraplus_gives_b_the_ratio_times_the_rate_and_trains(tmp_path: Path) -> None:
    from peftlab.train.loop import Run

    run = Run(methods.lora(r=4), _config(tmp_path, loraplus_ratio=16.0), None)
    groups = run.opt.param_groups
    b_ids = {id(m.lora_B) for _, m in run.pm.adapters["default"].layers.items()}
    fast = [g for g in groups if g.get("loraplus")]
    assert len(fast) == 1 and {id(p) for p in fast[0]["params"]} == b_ids
    assert fast[0]["lr"] == pytest.approx(16 * 1e-2)
    assert all(g["lr"] == pytest.approx(1e-2) and not b_ids & {id(p) for p in g["params"]} for g in groups
               if not g.get("loraplus"))  # fmt: skip
    run.loop(None)
    record = run.finish()
    assert record.status == "completed" and run.losses[-1] < run.losses[0]


@pytest.mark.parametrize(("setting", "message"), [
    ({"loraplus_ratio": 0.0}, "loraplus_ratio must be a number > 0"),
    ({"optimizer": "sgd"}, "optimizer must be adamw or galore"),
    ({"galore_rank": 0}, "galore_rank must be >= 1"),
])  # fmt: skip
def test_bad_training_options_are_one_line_errors(setting: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(PeftlabError, match=message) as err:
        train(methods.lora(), _config(tmp_path, **setting))
    assert "\n" not in str(err.value)


def test_loraplus_needs_lora(tmp_path: Path) -> None:
    with pytest.raises(PeftlabError, match="no LoRA module"):
        train(methods.bitfit(), _config(tmp_path, loraplus_ratio=16.0))


def test_cli_refuses_a_zero_loraplus_ratio(tmp_path: Path, capsys) -> None:
    from peftlab.cli import main

    args = ["train", "--model", "shape:tiny-bert", "--task", "keyword", "--train-file", str(keyword_task(tmp_path))]
    assert main([*args, "--method", "lora", "--loraplus-ratio", "0", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "loraplus_ratio must be a number > 0" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not available("galore_torch"), reason="galore-torch is not installed")
def test_galore_projects_the_linear_weights_and_trains_full_fine_tuning(tmp_path: Path) -> None:
    from peftlab.train.loop import Run

    config = _config(tmp_path, optimizer="galore", galore_rank=8, galore_update_gap=8, max_steps=32, eval_every=32)
    run = Run(methods.full(), config, None)
    projected = [g for g in run.opt.param_groups if "rank" in g]
    assert len(projected) == 1 and all(p.dim() == 2 and min(p.shape) > 8 for p in projected[0]["params"])
    assert type(run.opt).__module__.startswith("galore_torch")
    run.loop(None)
    record = run.finish()
    assert record.status == "completed"
    assert sum(run.losses[-8:]) < sum(run.losses[:8])
    # with an adapter nothing is wide enough to project: the groups are plain AdamW's
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.lora(r=4))
    assert not any("rank" in g for g in param_groups(pm, trainable(pm), 1e-3, config))
