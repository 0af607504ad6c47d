"""Sparse and structured selective kinds: counts, mask choice from data, LT-SFT, DiffPruning's penalty, files."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import logits, make_batch, make_model
from safetensors.torch import load_file

import peftlab
from peftlab import methods
from peftlab.errors import SpecError
from peftlab.modules.sparse import DiffPruning, L0Penalty, SparseDelta, site_view, top_positions


def _labelled(model, seed: int = 1) -> dict[str, torch.Tensor]:
    batch = make_batch(model, batch=4, seed=seed)
    return batch | {"labels": torch.tensor([0, 1, 1, 0])}


def _batches(model, n: int = 3):
    data = [_labelled(model, seed=s) for s in range(n)]
    return lambda: itertools.cycle(data)


def _deltas(pm, cls=SparseDelta) -> list:
    mods = [m for _, m in pm.adapters[pm.active_adapter].all_modules() if isinstance(m, cls)]
    return sorted(mods, key=lambda m: getattr(m, "position", 0))


def _linear_numel(pm) -> int:
    return sum(m.ref.weight.numel() for m in _deltas(pm))


def test_fishmask_counts_values_and_indices(tmp_path) -> None:
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.fishmask())
    k = round(0.005 * _linear_numel(pm))
    row = pm.counts().per_kind["fishmask"]
    assert (row.trainable, row.stored, row.changed) == (k, 2 * k, k)
    pm.save(tmp_path / "a")
    state = load_file(tmp_path / "a" / "adapter.safetensors")
    sparse = {key: t for key, t in state.items() if "fishmask" in key}
    assert {key: (t.numel(), t.dtype) for key, t in sparse.items()} == {
        "shared.fishmask_mask.indices": (k, torch.int32),
        "shared.fishmask_mask.values": (k, torch.float32),
    }


def test_diffpruning_counts_dense_training_sparse_result() -> None:
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.diffpruning(density=0.01))
    mods = _deltas(pm, DiffPruning)
    numel = sum(m.ref.weight.numel() for m in mods)
    k = sum(max(1, round(0.01 * m.ref.weight.numel())) for m in mods)
    row = pm.counts().per_kind["diffpruning"]
    assert (row.trainable, row.stored, row.changed) == (2 * numel, 2 * k, k)


def test_fishmask_picks_the_top_fisher_entries() -> None:
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.fishmask(density=0.02, samples=6))
    batches = _batches(model, n=2)
    random_mask = _deltas(pm)[0].mask.indices.clone()
    pm.prepare(batches)
    mask = _deltas(pm)[0].mask
    assert not torch.equal(mask.indices, random_mask) and not mask.values.any()

    # direct: per-example squared gradients of every placed weight, summed over the first 6 examples
    refs = [d.ref for d in _deltas(pm)]
    weights = list({id(r.module.weight): r.module.weight for r in refs}.values())
    sums = {id(w): torch.zeros_like(w) for w in weights}
    pm.eval()
    for w in weights:
        w.requires_grad_(True)
    rows = [{k: v[i : i + 1] for k, v in b.items()} for b in itertools.islice(batches(), 2) for i in range(4)][:6]
    for row in rows:
        for w, g in zip(weights, torch.autograd.grad(pm(**row).loss, weights), strict=True):
            sums[id(w)] += g.pow(2)
    scores = torch.cat([site_view(r, sums[id(r.module.weight)]).reshape(-1) for r in refs])
    chosen = mask.indices.long()
    others = torch.ones_like(scores, dtype=torch.bool)
    others[chosen] = False
    assert scores[chosen].min() >= scores[others].max()
    assert torch.equal(chosen, top_positions([scores], chosen.numel()))


def test_lt_sft_trains_only_its_mask() -> None:
    model = make_model("tiny-bert", "seq-cls")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftlab.apply(model, methods.lt_sft(density=0.01, steps=5, lr=1e-2))
    before = _deltas(pm)[0].mask.indices.clone()
    pm.prepare(_batches(model))
    mask = _deltas(pm)[0].mask
    assert not torch.equal(mask.indices, before)  # chosen by the short fine-tuning
    for k, v in model.state_dict().items():  # and every weight put back
        assert torch.equal(v, base[k]), k
    assert all(not p.requires_grad for p in model.parameters())

    params = [p for p in pm.adapters["default"].parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    pm.train()
    for batch in itertools.islice(_batches(model)(), 5):
        opt.zero_grad()
        pm(**batch).loss.backward()
        opt.step()
    pm.eval()
    pm.merge()
    moved = torch.cat([site_view(d.ref, d.ref.weight.detach()).reshape(-1) for d in _deltas(pm)])
    start = torch.cat([site_view(d.ref, base_weight(model, base, d)).reshape(-1) for d in _deltas(pm)])
    changed = (moved != start).nonzero().reshape(-1)
    assert changed.numel() > 0 and set(changed.tolist()) <= set(mask.indices.long().tolist())


def base_weight(model, base: dict[str, torch.Tensor], delta: SparseDelta) -> torch.Tensor:
    name = next(n for n, p in model.named_parameters() if p is delta.ref.module.weight)
    return base[name]


def _diffpruning_run(weight: float) -> tuple[float, float, list[DiffPruning]]:
    """Expected L0 before and after 10 steps of task loss plus ``weight`` times the penalty (same data, same seed)."""
    torch.manual_seed(0)
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.diffpruning(alpha_init=0.0))
    mods = _deltas(pm, DiffPruning)
    start = float(sum(m.expected_l0().detach() for m in mods))
    opt = torch.optim.AdamW([p for p in pm.adapters["default"].parameters() if p.requires_grad], lr=0.1)
    pm.train()
    for batch in itertools.islice(_batches(model)(), 10):
        opt.zero_grad()
        L0Penalty()(pm, batch, pm(**batch), weight).backward()
        opt.step()
    pm.eval()
    return start, float(sum(m.expected_l0().detach() for m in mods)), mods


def test_diffpruning_penalty_lowers_expected_l0() -> None:
    start, penalised, mods = _diffpruning_run(1e-3)
    _, free, _ = _diffpruning_run(0.0)
    assert penalised < 0.9 * start and penalised < 0.9 * free
    for m in mods:  # the final update: density of each weight, the largest |w ⊙ z|
        idx, values = m.final()
        assert idx.numel() == max(1, round(0.005 * m.ref.weight.numel())) and values.abs().sum() > 0


def test_diffpruning_second_phase_trains_the_fixed_mask_without_the_penalty() -> None:
    """From step ceil(total·(1 - fixed_fraction)) on: the update's entries are fixed (magnitude projection), their
    gates are constants that get no gradient, the penalty is gone, and the kept values go on training."""
    torch.manual_seed(0)
    model = make_model("tiny-bert", "seq-cls")
    pm = peftlab.apply(model, methods.diffpruning(alpha_init=0.0, fixed_fraction=0.4))
    mods = _deltas(pm, DiffPruning)
    opt = torch.optim.AdamW([p for p in pm.adapters["default"].parameters() if p.requires_grad], lr=0.05)
    pm.train()
    at_fix: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step, batch in enumerate(itertools.islice(_batches(model)(), 10), start=1):
        opt.zero_grad(set_to_none=True)
        out = pm(**batch)
        loss = L0Penalty()(pm, batch, out, 1e-3)
        assert (loss is out.loss) == (step > 6)  # fixed after step ceil(10 · 0.6) = 6
        loss.backward()
        if step > 6:
            assert all(m.log_alpha.grad is None for m in mods)
        opt.step()
        pm.after_step(step, 10)
        assert all(m.fixed == (step >= 6) for m in mods)
        if step == 6:
            at_fix = [(m.final()[0].clone(), m.final()[1].clone()) for m in mods]
            for m in mods:  # exactly the kept entries are open
                assert int((m._gate_mean() > 0).sum()) == m.values.numel()
    for m, (idx, values) in zip(mods, at_fix, strict=True):
        assert torch.equal(m.final()[0], idx)
        assert not torch.equal(m.final()[1], values)
        assert set(m.log_alpha.detach().unique().tolist()) <= {-10.0, 10.0}


def test_diffpruning_round_trip_keeps_the_sparse_update(tmp_path) -> None:
    model = make_model("tiny-bert", "seq-cls")
    batch = make_batch(model)
    pm = peftlab.apply(model, methods.diffpruning(density=0.05))
    with torch.no_grad():
        for m in _deltas(pm, DiffPruning):
            m.diff.normal_(0, 0.2)
    tuned = logits(pm, batch)
    pm.save(tmp_path / "a")
    stored = load_file(tmp_path / "a" / "adapter.safetensors")
    assert not any(k.endswith((".diff", ".log_alpha")) for k in stored)  # only indices and values
    loaded = peftlab.load(make_model("tiny-bert", "seq-cls"), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, batch), tuned, rtol=1e-5, atol=1e-5)
    # the dense parameters follow the loaded update, so training goes on from it
    loaded_mod = _deltas(loaded, DiffPruning)[0]
    loaded_mod.final()
    loaded_mod._sync()
    dense = (loaded_mod.diff * loaded_mod._gate_mean()).reshape(-1)
    assert int((dense != 0).sum()) <= loaded_mod.values.numel()
    torch.testing.assert_close(dense[loaded_mod.indices.long()], loaded_mod.values)


def test_cross_attention_is_refused_without_it() -> None:
    with pytest.raises(SpecError, match="exist in no layer of this bert-family model") as e:
        peftlab.apply(make_model("tiny-bert", "seq-cls"), methods.cross_attn())
    assert "\n" not in str(e.value)


def test_topk_layers_tunes_only_the_top_blocks() -> None:
    pm = peftlab.apply(make_model("tiny-t5", "seq2seq"), methods.topk_layers(k=1))
    layers = {key.split("-")[0] for key, m in pm.adapters["default"].all_modules() if m.kind == "unfreeze"}
    per_stack = len(pm.blocks) // 2
    assert layers == {str(per_stack - 1), str(2 * per_stack - 1), "model"}


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("fishmask", {"density": 0.0}, "density must be a number > 0.0"),
        ("fishmask", {"density": 1.5}, "density must be a number"),
        ("fishmask", {"samples": 0}, "samples must be an integer >= 1"),
        ("lt-sft", {"steps": 0}, "steps must be an integer >= 1"),
        ("lt-sft", {"lr": -1.0}, "lr must be a number > 0.0"),
        ("diffpruning", {"density": "0.1"}, "density must be a number"),
        ("diffpruning", {"alpha_init": 50.0}, "alpha_init must be a number"),
        ("diffpruning", {"fixed_fraction": 1.0}, "fixed_fraction must be below 1"),
        ("topk-layers", {"k": -1}, "top must be an integer >= 0"),
    ],
)
def test_bad_settings_are_one_line_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        methods.get(name, **kwargs)
    assert "\n" not in str(e.value)


def test_training_run_chooses_the_mask_from_its_data() -> None:
    """``Run`` calls the kinds' prepare hook with the run's batches before the first step."""
    from test_train import DATA, _config

    from peftlab.train.loop import Run

    if not (DATA / "glue" / "SST-2").is_dir():
        pytest.skip(f"no GLUE data under {DATA}")
    spec = methods.fishmask(samples=8)
    random_mask = peftlab.apply(make_model("tiny-bert", "seq-cls"), spec).adapters["default"].shared
    run = Run(methods.fishmask(samples=8), _config(max_steps=1), None)
    chosen = run.pm.adapters["default"].shared["fishmask_mask"].indices
    assert chosen.numel() == random_mask["fishmask_mask"].indices.numel()
    assert not torch.equal(chosen, random_mask["fishmask_mask"].indices)
