"""Shared fixtures: tiny random-init backbones of every family and a batch for each."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import settings

import peftlab

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: the workers share the cores, one thread each
    torch.set_num_threads(1)

settings.register_profile("peftlab", max_examples=30)  # tests/test_fuzz.py: a few dozen files of each kind
settings.register_profile("fuzz-long", max_examples=1000)
settings.load_profile("peftlab")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-long", action="store_true", help="many more generated examples in tests/test_fuzz.py")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--fuzz-long"):
        settings.load_profile("fuzz-long")


#: (shape, model class) pairs covering every family and every model class peftlab supports.
BACKBONES = [
    ("tiny-bert", "seq-cls"),
    ("tiny-roberta", "seq-cls"),
    ("tiny-llama", "seq-cls"),
    ("tiny-llama", "causal-lm"),
    ("tiny-qwen2", "seq-cls"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-t5", "seq2seq"),
]


#: Preset settings the tiny shapes need: AdapterDrop's default drops the adapters of the first 5 of their 2 layers;
#: tiny-llama's and tiny-qwen2's v projection (16 x 32) has 512 spectral entries, fewer than FourierFT's default 1000
#: frequencies (refused, as peft refuses it).
TINY_SETTINGS: dict[str, dict] = {"adapterdrop": {"drop": 1}, "fourierft": {"n_frequency": 256}}


#: Presets that compose saved adapters, so they need folders trained on the model: :func:`preset` makes them.
NEEDS_FOLDERS = {"fuse"}


def trained_adapters(model, folder, count: int = 2, seed: int = 3) -> list[str]:
    """``count`` Pfeiffer adapters (random, as if trained) on a copy of ``model``, saved under ``folder``."""
    import copy

    from peftlab import methods

    out = []
    for i in range(count):
        pm = peftlab.apply(copy.deepcopy(model), methods.pfeiffer(size=8 + 4 * i))
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for p in pm.adapters["default"].layers.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        out.append(str(pm.save(folder / f"component-{i}")))
    return out


def preset(name: str, model=None, folder=None):
    """The preset's spec, with the settings a tiny shape needs (``fuse``: two adapters trained on ``model``, saved
    under ``folder``)."""
    from peftlab import methods

    if name in NEEDS_FOLDERS:
        return methods.get(name, adapters=trained_adapters(model, folder))
    return methods.get(name, **TINY_SETTINGS.get(name, {}))


def make_model(shape: str, head: str, seed: int = 0):
    return peftlab.load_model(f"shape:{shape}", head=head, seed=seed)


def make_batch(model, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """A padded batch (the second row is shorter) with labels fitting the model class."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = ids[:, :4]
    return kw


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def tiny_bert():
    return make_model("tiny-bert", "seq-cls")


def keyword_task(folder: Path) -> Path:
    """A task a tiny random model learns in a few dozen steps: the label is one keyword among random words."""
    words = ["red", "blue", "tall", "small", "cat", "dog", "tree", "rock", "sky", "sea"]
    rng = random.Random(0)
    lines = [f"{' '.join(rng.sample(words, 3))} {'great' if i % 2 else 'awful'},{i % 2}\n" for i in range(96)]
    path = folder / "train.csv"
    path.write_text("text,label\n" + "".join(lines))
    return path
