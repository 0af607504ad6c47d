"""AdaLoRA, GLoRA, Intrinsic SAID and AdapterFusion (``fuse``): what each computes on tiny models, AdaLoRA against the
peft library step by step, their counts, and fuse's one-line refusals."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, make_batch, make_model, trained_adapters

import peftlab
from peftlab import methods
from peftlab.errors import SpecError
from peftlab.modules.intrinsic import Fastfood, fwht
from peftlab.modules.lowrank import AdaLoraSettings, budget
from peftlab.train import batch_loss

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _perturb(pm, scale: float = 0.1, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapters[pm.active_adapter].layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _query_io(model, pm, batch):
    """The first layer's query input and output on ``batch``."""
    seen = {}
    host = model.bert.encoder.layer[0].attention.self.query
    handle = host.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    with torch.no_grad():
        pm(**batch)
    handle.remove()
    return host, seen["x"], seen["y"]


# -- AdaLoRA -----------------------------------------------------------------------------------------------
def test_adalora_is_p_lambda_q_scaled_by_alpha_over_init_r() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.adalora(init_r=6, target_r=3, alpha=4.0, targets="q"))
    _perturb(pm)
    m = pm.adapters["default"].layers["0-q"]
    host, x, y = _query_io(model, pm, make_batch(model))
    delta = m.lora_B @ torch.diag(m.lora_E.view(-1)) @ m.lora_A * (4.0 / (6 + 1e-5))
    torch.testing.assert_close(y, F.linear(x, host.weight + delta, host.bias), rtol=1e-5, atol=1e-5)


def test_adalora_counts_full_p_lambda_q_and_the_merged_weights() -> None:
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.adalora(init_r=6, target_r=4, targets="qv"))
    row = pm.counts().per_kind["adalora"]
    per_matrix = 6 * (32 + 1 + 32)  # P (32 x 6), Λ (6), Q (6 x 32)
    assert row.trainable == row.stored == 2 * 2 * per_matrix
    assert row.changed == 2 * 2 * 32 * 32


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"target_r": 16}, "target_r \\(16\\) must not exceed init_r"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, "tinit \\(5\\) must be below total_step - tfinal"),
        ({"beta1": 1.5}, "beta1 must be a number"),
        ({"deltaT": 0}, "deltaT must be an integer"),
    ],
)
def test_adalora_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        methods.adalora(**settings)


def test_budget_schedule_is_cubic_from_init_to_target() -> None:
    s = AdaLoraSettings(init_r=12, target_r=4, tinit=2, tfinal=3, deltaT=2)
    n, total = 5, 15
    assert budget(s, n, 2, total) == (60, False)  # warm-up: the whole initial budget, no masking
    assert budget(s, n, 4, total) == (int(40 * (1 - 2 / 10) ** 3 + 20), True)
    assert budget(s, n, 5, total)[1] is False  # every deltaT steps
    assert budget(s, n, 13, total) == (20, True)  # the final phase


def _allocate_steps(pm, steps: range, total: int) -> None:
    """Drive the rank allocator with gradients that favour different singular values at different times."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for m in pm.adapters["default"].layers.values():
            for p in (m.lora_A, m.lora_E, m.lora_B):
                p.grad = torch.randn(p.shape, generator=g) * (1.0 + step * torch.rand(p.shape, generator=g))
        pm.after_step(step, total)


def test_a_checkpoint_keeps_the_allocators_statistics() -> None:
    """A resumed run masks by the importance smoothed since step 1 (the checkpoint's run state), as if never stopped;
    without it the allocator would start its averages afresh and keep other singular values."""
    from peftlab.train.checkpoint import load_run_state, run_state

    spec = methods.adalora(init_r=6, target_r=2, tinit=0, tfinal=0, beta1=0.95, beta2=0.95, targets="qv")

    def fresh():
        torch.manual_seed(0)
        pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), spec)
        with torch.no_grad():
            for m in pm.adapters["default"].layers.values():
                m.lora_E.normal_()
        return pm

    def masks(pm) -> list[list[bool]]:
        return [m.rank_mask.tolist() for m in pm.adapters["default"].layers.values()]

    whole = fresh()
    _allocate_steps(whole, range(1, 12), 12)
    cut = fresh()
    _allocate_steps(cut, range(1, 7), 12)
    state = run_state(cut)
    assert state and all("/" in k for k in state)
    resumed, restarted = fresh(), fresh()
    for pm in (resumed, restarted):  # the trainable tensors, as the checkpoint restores them
        with torch.no_grad():
            for a, b in zip(pm.adapters["default"].parameters(), cut.adapters["default"].parameters(), strict=True):
                a.copy_(b)
    load_run_state(resumed, state)
    _allocate_steps(resumed, range(7, 12), 12)
    _allocate_steps(restarted, range(7, 12), 12)
    assert masks(resumed) == masks(whole)
    assert masks(restarted) != masks(whole)


def test_a_run_resumed_in_the_final_phase_keeps_the_pruned_ranks() -> None:
    """Checkpoints keep Λ, not the allocator's mask: after the final step the pattern is read off Λ's zeros."""
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.adalora(init_r=4, target_r=2, targets="q", tfinal=3))
    modules = list(pm.adapters["default"].layers.values())
    with torch.no_grad():
        for m in modules:
            m.lora_E.copy_(torch.tensor([[0.5], [0.0], [0.3], [0.0]]) + 0.0)
    pm.after_step(9, 10)  # the final phase (after step 10 - 3)
    with torch.no_grad():
        for m in modules:
            m.lora_E.add_(1.0)  # what an optimiser step would revive
    pm.after_step(10, 10)
    for m in modules:
        assert m.rank_mask.tolist() == [True, False, True, False] and m.rank == 2


def _peft_adalora(model, **kw):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(target_modules=["query", "value"], **kw)
    return get_peft_model(copy.deepcopy(model), config)


def test_adalora_matches_peft_step_by_step() -> None:
    """The same model, weights, loss (orthogonality regulariser included) and optimiser: peft's ``update_and_allocate``
    and peftlab's per-step hook mask the same singular values to the same budget at every step."""
    pytest.importorskip("peft")
    settings = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 1, "total_step": 12, "lora_alpha": 8}
    model = make_model("tiny-bert", "seq-cls").eval()
    theirs = _peft_adalora(model, **settings).eval()
    mine = dict(settings, alpha=settings.pop("lora_alpha"))
    spec = methods.adalora(targets="qv", **mine)
    spec.train_head = False
    pm = peftlab.apply(model, spec)
    pm.eval()
    names = {}
    for name, module in theirs.named_modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            layer = int(name.split("layer.")[1].split(".")[0])
            site = "q" if name.endswith("query") else "v"
            names[f"{layer}-{site}"] = module
    assert len(names) == 4
    with torch.no_grad():
        for key, module in names.items():
            ours = pm.adapters["default"].layers[key]
            ours.lora_A.copy_(module.lora_A["default"])
            ours.lora_B.copy_(module.lora_B["default"])
            module.lora_E["default"].normal_(0, 0.1)
            ours.lora_E.copy_(module.lora_E["default"])
    batch = make_batch(model) | {"labels": torch.tensor([0, 1])}
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    opt_mine = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    objective = spec.training_loss()
    for step in range(1, 13):
        loss_theirs = theirs.base_model(**batch).loss  # AdaLoraModel.forward adds the regulariser
        loss_mine = batch_loss(pm, batch, objective, objective.default_weight)
        torch.testing.assert_close(loss_mine, loss_theirs, rtol=1e-5, atol=1e-6)
        for opt, loss in ((opt_theirs, loss_theirs), (opt_mine, loss_mine)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        theirs.base_model.update_and_allocate(step)
        pm.after_step(step, 12)
        for key, module in names.items():
            ours = pm.adapters["default"].layers[key]
            torch.testing.assert_close(ours.lora_E, module.lora_E["default"], rtol=1e-4, atol=1e-6)
    kept = sum(m.rank for m in pm.adapters["default"].layers.values())
    assert kept == 2 * 4  # target_r per matrix on average
    pattern = theirs.peft_config["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == kept


@pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")
def test_training_prunes_adalora_to_its_target_budget(tmp_path: Path) -> None:
    """``peftlab train`` calls the schedule once per optimiser step: at the end (evaluated once, so the final state is
    the best) the adapter keeps target_r singular values per matrix on average, the others zero in the saved Λ."""
    from peftlab.train import TrainConfig, train

    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.adalora(init_r=4, target_r=2, tinit=1, tfinal=2))
    config = TrainConfig(
        model="shape:tiny-bert", task="sst2", data_dir=str(DATA), k=32, dev_size=16, batch_size=8, max_length=32,
        progress=False, max_steps=8, eval_every=100, output=str(tmp_path / "run"), lr=1e-2,
    )  # fmt: skip
    record = train(methods.adalora(init_r=4, target_r=2, tinit=1, tfinal=2), config, model=pm)
    assert record.status in ("completed", "early-stopped")
    modules = list(pm.adapters["default"].layers.values())
    assert sum(m.rank for m in modules) == 2 * len(modules)
    for m in modules:
        assert torch.all(m.lora_E.view(-1)[~m.rank_mask] == 0) and m.rank == int(m.rank_mask.sum())
    loaded = peftlab.load(make_model("tiny-bert", "seq-cls"), tmp_path / "run" / "adapter")
    assert sum(m.rank for m in loaded.adapters["default"].layers.values()) == 2 * len(modules)


# -- GLoRA -------------------------------------------------------------------------------------------------
def test_glora_scales_and_shifts_weight_and_bias() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.glora(r=2, targets="q"))
    _perturb(pm)
    m = pm.adapters["default"].layers["0-q"]
    host, x, y = _query_io(model, pm, make_batch(model))
    w0, b0 = host.weight, host.bias
    a, b = m.glora_Au @ m.glora_Ad, m.glora_Bu @ m.glora_Bd
    expected = F.linear(x, w0 + w0 * a + b) + w0 @ m.glora_C + b0 * m.glora_D + m.glora_E + b0
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_glora_on_a_bias_free_host_has_weight_terms_only() -> None:
    pm = peftlab.apply(make_model("tiny-llama", "seq-cls"), methods.glora(r=2, targets="q"))
    m = pm.adapters["default"].layers["0-q"]
    assert {n for n, _ in m.named_parameters()} == {"glora_Ad", "glora_Au", "glora_Bd", "glora_Bu"}
    row = pm.counts().per_kind["glora"]
    assert row.changed == 2 * m.ref.weight.numel()


def test_glora_merges_into_weight_and_bias_and_unloads() -> None:
    model = make_model("tiny-bert", "seq-cls")
    batch = make_batch(model)
    pm = peftlab.apply(model, methods.glora(r=2))
    _perturb(pm)
    tuned = logits(pm, batch)
    plain = pm.merge_and_unload()
    torch.testing.assert_close(logits(plain, batch), tuned, rtol=1e-4, atol=1e-4)


# -- Intrinsic SAID ------------------------------------------------------------------------------------------
def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_fwht_is_the_hadamard_matrix() -> None:
    x = torch.randn(3, 16)
    torch.testing.assert_close(fwht(x), x @ _hadamard(16).T, rtol=1e-5, atol=1e-5)


def test_fastfood_is_s_h_g_pi_h_b_cut_to_d() -> None:
    ff = Fastfood(5, 12, seed=3, device=torch.device("cpu"))
    h = _hadamard(16)
    b = torch.diag(ff.signs.float())
    perm = torch.eye(16)[ff.perm.long()]
    v = (h @ torch.diag(ff.gauss) @ perm @ h @ b)[:12, :5] / ff.divisor
    theta = torch.randn(5)
    torch.testing.assert_close(ff(theta), v @ theta, rtol=1e-5, atol=1e-5)


def test_intrinsic_said_moves_every_weight_from_one_vector() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.intrinsic_said(d=20))
    adapter = pm.adapters["default"]
    theta = adapter.shared["said_theta"].theta
    matrices = len(adapter.layers)  # q, k, v, o, FFN in and out of 2 layers
    assert matrices == 12 and theta.numel() == 20 - matrices  # the paper's θ_d = [θ_(d-m), λ_1..λ_m]
    row = pm.counts().per_kind["intrinsic-said"]
    assert row.trainable == 20
    assert row.stored == 20  # the Fastfood transforms are drawn again from the seed
    assert row.changed == sum(m.ref.weight.numel() for m in adapter.layers.values())
    with torch.no_grad():
        theta.normal_()
    m = adapter.layers["0-q"]
    host, x, y = _query_io(model, pm, make_batch(model))
    delta = (m.said_lambda * m.fastfood(theta)).view(32, 32)
    torch.testing.assert_close(y, F.linear(x, host.weight + delta, host.bias), rtol=1e-5, atol=1e-5)
    assert (delta != 0).all()  # a dense update of the whole matrix


def test_intrinsic_said_places_its_projections_apart() -> None:
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.intrinsic_said(d=12, targets="qk"))
    layers = pm.adapters["default"].layers
    assert not torch.equal(layers["0-q"].fastfood.perm, layers["0-k"].fastfood.perm)
    with pytest.raises(SpecError, match="must share d, seed"):
        peftlab.apply(
            make_model("tiny-bert", "seq-cls"),
            peftlab.Spec.from_dict(
                {"layers": {"*": {"q": {"kind": "intrinsic-said", "d": 8}, "k": {"kind": "intrinsic-said", "d": 9}}}}
            ),
        )


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("intrinsic-said", {"d": 0}, "d must be an integer"),
        ("intrinsic-said", {"seed": -1}, "seed must be an integer"),
        ("glora", {"r": 0}, "r must be an integer"),
        ("fuse", {"adapters": "", "temperature": 0}, "fuse needs adapters"),
    ],
)
def test_settings_are_refused_in_one_line(name: str, settings: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        methods.get(name, **settings)
    assert "\n" not in str(e.value)


def test_intrinsic_said_needs_more_numbers_than_matrices() -> None:
    with pytest.raises(SpecError, match="d=12 must exceed the 12 weight matrices"):
        peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.intrinsic_said(d=12))


# -- fuse --------------------------------------------------------------------------------------------------
def test_fuse_mixes_frozen_components_with_a_learned_attention(tmp_path: Path) -> None:
    model = make_model("tiny-bert", "seq-cls")
    folders = trained_adapters(model, tmp_path)
    pm = peftlab.apply(model, methods.fuse(adapters=folders, temperature=2.0))
    fusion = pm.adapters["default"].layers["0-after_ffn"]
    loaded = [peftlab.load(make_model("tiny-bert", "seq-cls"), f) for f in folders]
    comps = [c.adapters["default"].layers["0-after_ffn"] for c in loaded]
    x = torch.randn(2, 3, 32)
    outs = torch.stack([c.transform(x) for c in comps], dim=-2)
    scores = (fusion.key(outs) @ fusion.query(x).unsqueeze(-1)).squeeze(-1) / 2.0
    expected = (torch.softmax(scores, -1).unsqueeze(-1) * fusion.value(outs)).sum(-2)
    torch.testing.assert_close(fusion.transform(x), expected, rtol=1e-5, atol=1e-5)
    trained = {n for n, p in pm.adapters["default"].layers.named_parameters() if p.requires_grad}
    assert {n.split(".")[1] for n in trained} == {"query", "key", "value"}  # the components are frozen buffers
    hidden, sites = 32, 2
    row = pm.counts().per_kind["fuse"]
    assert row.trainable == sites * 3 * (hidden * hidden + hidden)
    components = sum(2 * size * hidden + size + hidden for size in (8, 12))
    assert row.stored == row.trainable + sites * components


def test_a_saved_fusion_loads_without_its_component_folders(tmp_path: Path) -> None:
    model = make_model("tiny-bert", "seq-cls")
    batch = make_batch(model)
    pm = peftlab.apply(model, methods.fuse(adapters=trained_adapters(model, tmp_path / "parts")))
    _perturb(pm)
    tuned = logits(pm, batch)
    pm.save(tmp_path / "fusion")
    shutil.rmtree(tmp_path / "parts")
    loaded = peftlab.load(make_model("tiny-bert", "seq-cls"), tmp_path / "fusion")
    torch.testing.assert_close(logits(loaded, batch), tuned, rtol=1e-5, atol=1e-5)
    assert loaded.adapters["default"].spec.layers["*"]["after_ffn"].adapters == []


def test_fuse_refuses_mismatched_components_in_one_line(tmp_path: Path) -> None:
    model = make_model("tiny-bert", "seq-cls")
    good = trained_adapters(model, tmp_path / "good")
    peftlab.apply(copy.deepcopy(model), methods.lora()).save(tmp_path / "lora")
    peftlab.apply(copy.deepcopy(model), methods.houlsby(size=8)).save(tmp_path / "houlsby")
    other = make_model("tiny-roberta", "seq-cls")
    other_folder = trained_adapters(other, tmp_path / "other", count=1)[0]
    cases = [
        (None, "fuse needs adapters=\\[DIR, DIR, ...\\]"),
        (good[:1], "two or more saved adapter folders"),
        ([good[0], good[0]], "listed twice"),
        ([good[0], str(tmp_path / "lora")], "fuse composes bottleneck adapters .* holds lora"),
        ([good[0], str(tmp_path / "houlsby")], "places its adapters differently"),
        ([good[0], other_folder], "different base model"),
        ([good[0], str(tmp_path / "missing")], "fuse: .*missing"),
    ]
    for adapters, message in cases:
        with pytest.raises(SpecError, match=message) as e:
            methods.get("fuse", adapters=adapters)
        assert "\n" not in str(e.value)
    as_text = methods.get("fuse", adapters=f"[{good[0]},{good[1]}]")  # the command line's --set adapters=[D1,D2]
    assert as_text == methods.get("fuse", adapters=good)
    with pytest.raises(SpecError, match=r"fuse: .*different weights"):  # built on another base than the components'
        peftlab.apply(make_model("tiny-bert", "seq-cls", seed=1), methods.fuse(adapters=good))
