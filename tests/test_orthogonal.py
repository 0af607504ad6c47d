"""The multiplicative kinds (OFT, BOFT, HRA) beyond the method matrix: the matrices they build are orthogonal where
the papers say so, merging is W·Mᵀ, and the multiplicative dropout acts only in training."""

from __future__ import annotations

import pytest
import torch
from conftest import logits, make_batch, make_model

import peftlab
from peftlab import Spec, methods
from peftlab.modules.orthogonal import OftSettings


def _modules(pm: peftlab.PeftModel) -> list:
    return list(pm.adapters["default"].layers.values())


def _randomise(pm: peftlab.PeftModel, std: float = 0.2) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pm.adapters["default"].parameters():
            p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize(
    ("spec", "orthogonal"),
    [
        (lambda: Spec(layers={"*": {"q": OftSettings(block_size=8, cayley_neumann=False)}}), True),
        (lambda: methods.oft(block_size=8), False),  # peft's truncated series is only nearly orthogonal
        (lambda: methods.boft(block_size=4, butterfly_factor=3), True),
        (lambda: methods.hra(r=4), True),
        (lambda: methods.hra(r=3, apply_gs=True), True),
    ],
)
def test_rotations_and_merged_weights(spec, orthogonal: bool) -> None:
    pm = peftlab.apply(make_model("tiny-bert", "seq-cls"), spec())
    _randomise(pm)
    for m in _modules(pm):
        rot = m.rotation().detach()
        eye = torch.eye(rot.shape[0])
        assert torch.allclose(rot.T @ rot, eye, atol=1e-5) == orthogonal
        x = torch.randn(5, rot.shape[0])
        torch.testing.assert_close(m.rotate(x), x @ rot, atol=1e-5, rtol=0)
        w = m.ref.weight.detach().clone()
        scale = m.out_scale()
        expected = w @ rot.T if scale is None else scale.detach()[:, None] * (w @ rot.T)
        torch.testing.assert_close(m.weight_delta(), expected - w, atol=1e-5, rtol=0)


def test_oft_module_dropout_acts_only_in_training() -> None:
    """With 4 blocks and p=0.75 three blocks are the identity in each training pass; eval uses every block."""
    model = make_model("tiny-bert", "seq-cls")
    batch = make_batch(model)
    pm = peftlab.apply(model, methods.oft(block_size=0, r=4, module_dropout=0.75))
    _randomise(pm)
    evaluated = logits(pm, batch)
    torch.testing.assert_close(logits(pm, batch), evaluated, atol=0, rtol=0)
    pm.train()
    torch.manual_seed(0)
    trained = logits(pm, batch)
    pm.eval()
    assert not torch.allclose(trained, evaluated, atol=1e-4)
    m = _modules(pm)[0]
    dropped = m.blocks(drop=True)
    assert sum(torch.equal(b, torch.eye(8)) for b in dropped) == 3


def test_coft_keeps_every_block_within_eps() -> None:
    pm = peftlab.apply(make_model("tiny-llama", "causal-lm"), methods.oft(block_size=8, coft=True, eps=1e-2))
    _randomise(pm, std=1.0)
    logits(pm, make_batch(pm.base_model))  # the projection runs with the forward, as in peft
    for m in _modules(pm):
        skew_norm = (2 * m.oft_R.detach().pow(2).sum(dim=1)).sqrt()  # each entry sits twice in the skew matrix
        assert (skew_norm <= 1e-2 / m.oft_R.shape[0] ** 0.5 * (1 + 1e-5)).all()


def test_fused_slices_rotate_separately_and_unmerge_exactly() -> None:
    """GPT-2's c_attn: q and v get their own rotation of the shared input; k's third of the weight is untouched."""
    model = make_model("tiny-gpt2", "causal-lm")
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    pm = peftlab.apply(model, methods.hra(r=2))
    _randomise(pm)
    pm.merge()
    after = model.transformer.h[0].attn.c_attn.weight.detach()
    k = slice(32, 64)  # Conv1D stores (in, out): the k slice is a block of columns
    assert torch.equal(after[:, k], before[:, k])
    assert not torch.allclose(after[:, :32], before[:, :32]) and not torch.allclose(after[:, 64:], before[:, 64:])
    pm.unmerge()
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight, before, atol=1e-6, rtol=0)
