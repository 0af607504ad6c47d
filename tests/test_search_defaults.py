"""A search's defaults are the AutoPEFT paper's method: the autopeft sampler (tpe, said in one line, without
BoTorch), low-fidelity trials, a reference point at the constant prediction's score that reaches the sampler,
and NUTS settings that reach the GP fit."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch

import peftlab.optional
from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.search import results
from peftlab.search import study as study_module
from peftlab.search.pareto import hypervolume_history
from peftlab.search.study import SearchConfig, create_study, load_study, run_search
from peftlab.train import TrainConfig
from peftlab.train.data import task_splits

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")
HAS_BO = all(importlib.util.find_spec(m) is not None for m in ("botorch", "jax", "numpyro"))
needs_bo = pytest.mark.skipif(not HAS_BO, reason='needs BoTorch with NumPyro: pip install "botorch[fully-bayesian]"')
TRAIN = {"data_dir": str(DATA), "k": 32, "dev_size": 16, "batch_size": 8, "max_length": 24}
FLAGS = ["--model", "shape:tiny-bert", "--task", "sst2", "--data-dir", str(DATA), "--k", "32", "--dev-size", "16"]
FLAGS += ["--batch-size", "8", "--max-length", "24", "--no-plots", "--trials", "1"]


def _trial_config(output: Path) -> dict:
    """The TrainConfig the search's first trial ran with (from its record)."""
    study, _ = load_study(str(output / "study.db"), "peftlab")
    return json.loads((Path(study.trials[0].user_attrs["run"]) / "record.json").read_text())["config"]


@needs_bo
def test_the_default_sampler_is_autopeft_with_botorch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["search", *FLAGS, "--max-steps", "1", "--output", str(out)]) == 0
    assert capsys.readouterr().err == ""
    _, definition = load_study(str(out / "study.db"), "peftlab")
    assert definition["sampler"] == "autopeft"
    assert definition["nuts"] == {"warmup_steps": 64, "num_samples": 32, "thinning": 4}
    config = _trial_config(out)  # the user's budget wins over the low-fidelity default
    assert (config["max_steps"], config["fraction"], config["epochs"]) == (1, None, 3.0)


def test_without_botorch_tpe_in_one_line_and_low_fidelity_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = peftlab.optional.available
    monkeypatch.setattr(peftlab.optional, "available", lambda name: name != "botorch" and real(name))
    out = tmp_path / "s"
    assert main(["search", *FLAGS, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "tpe" in err and "BoTorch" in err, err
    _, definition = load_study(str(out / "study.db"), "peftlab")
    assert definition["sampler"] == "tpe" and definition["nuts"] is None
    assert definition["train"]["fraction"] == 0.05 and definition["train"]["epochs"] == 20.0
    config = _trial_config(out)  # AutoPEFT's low fidelity: 5% of 20 epochs
    assert (config["max_steps"], config["fraction"], config["epochs"]) == (None, 0.05, 20.0)
    # an explicit sampler is used as given, without a word
    out = tmp_path / "r"
    assert main(["search", *FLAGS, "--sampler", "random", "--max-steps", "1", "--output", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert load_study(str(out / "study.db"), "peftlab")[1]["sampler"] == "random"


def test_the_default_reference_point_is_the_constant_predictions_dev_score(tmp_path: Path) -> None:
    config = SearchConfig(model="shape:tiny-bert", task="sst2", sampler="random", output=str(tmp_path), train=TRAIN)
    study, _ = create_study(config)
    _, splits = task_splits(TrainConfig(model="shape:tiny-bert", task="sst2", **TRAIN))
    majority = max(Counter(r["label"] for r in splits.dev).values()) / len(splits.dev)  # SST-2's main metric: accuracy
    ref = study_module.definition_of(study)["ref_point"]
    assert ref[0] == pytest.approx(majority) and ref[0] >= 0.5


def test_search_settings_are_validated_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags, message in (
        (["--nuts-warmup", "0"], "nuts_warmup must be >= 1, got 0"),
        (["--nuts-samples", "8", "--nuts-thinning", "16"], "nuts_thinning (16) keeps every n-th of nuts_samples (8)"),
    ):
        assert main(["search", *FLAGS, "--sampler", "autopeft", *flags, "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(PeftlabError, match="nuts_thinning must be >= 1"):
        SearchConfig(model="shape:tiny-bert", task="sst2", nuts_thinning=0).check()


def _watch_autopeft(monkeypatch: pytest.MonkeyPatch) -> tuple[list[optuna.samplers.BaseSampler], list[dict]]:
    """The samplers a search makes, and the settings of each NUTS fit, which returns dummy samples in milliseconds
    (as tests/test_bo.py) instead of running the chain."""
    bo = peftlab.optional.require("peftlab.search.bo", "this test")
    samplers: list[optuna.samplers.BaseSampler] = []
    fits: list[dict] = []

    def fake_nuts(model, seed=0, **kw):
        fits.append(kw)
        model.train()
        model.load_mcmc_samples(model.pyro_model.get_dummy_mcmc_samples(4, dtype=torch.double))
        model.eval()

    make = study_module.make_sampler
    monkeypatch.setattr(bo, "fit_saas_nuts", fake_nuts)
    monkeypatch.setattr(study_module, "make_sampler", lambda *a, **kw: samplers.append(make(*a, **kw)) or samplers[-1])
    return samplers, fits


@needs_bo
def test_reference_point_and_nuts_settings_reach_the_autopeft_sampler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study's reference point is the sampler's (the latency objective's, which the study has none for, is
    inferred), and the NUTS settings are the fit's."""
    samplers, fits = _watch_autopeft(monkeypatch)
    config = SearchConfig(
        model="shape:tiny-bert",
        task="sst2",
        sampler="autopeft",
        objectives=("score", "stored", "latency"),
        ref_point=(0.6, 5.0),
        trials=3,
        startup_trials=2,
        output=str(tmp_path),
        train=TRAIN | {"max_steps": 1},
        nuts_warmup=7,
        nuts_samples=9,
        nuts_thinning=3,
    )
    study = run_search(config)
    definition = study_module.definition_of(study)
    assert definition["ref_point"] == [0.6, 5.0]
    assert definition["nuts"] == {"warmup_steps": 7, "num_samples": 9, "thinning": 3}
    step = samplers[-1].last_step
    assert step, "the sampler made no BO step"
    assert step["ref_point"][:2] == pytest.approx([0.6, 5.0]) and len(step["ref_point"]) == 3
    assert fits and all((f["warmup_steps"], f["num_samples"], f["thinning"]) == (7, 9, 3) for f in fits)


def test_hypervolume_on_a_log_cost_axis_by_hand() -> None:
    """Two points against (0.5, 10): linear, the costlier better point holds most of the area; on log10 the cheap
    one's decade counts as much as the rest."""
    points = [(0.7, 0.01), (0.9, 1.0)]
    linear = hypervolume_history(points, (0.5, 10.0))[-1]
    log = hypervolume_history(points, (0.5, 10.0), "log")[-1]
    assert linear == pytest.approx((1.0 - 0.01) * 0.2 + (10.0 - 1.0) * 0.4)
    assert log == pytest.approx((0 - (-2)) * 0.2 + (1 - 0) * 0.4)
    assert hypervolume_history([(0.7, 0.0)], (0.5, 10.0), "log")[-1] == pytest.approx((1 + 6) * 0.2)  # 0 -> 1e-6 %


def test_cost_scale_is_validated_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PeftlabError, match="unknown cost scale 'cubic'; one of linear, log"):
        SearchConfig(model="shape:tiny-bert", task="sst2", cost_scale="cubic").check()
    with pytest.raises(PeftlabError, match="a log cost axis needs a reference cost above 0"):
        SearchConfig(model="shape:tiny-bert", task="sst2", cost_scale="log", ref_point=(0.5, 0.0)).check()
    with pytest.raises(SystemExit) as stop:
        main(["search", *FLAGS, "--cost-scale", "cubic"])
    assert stop.value.code == 2 and "invalid choice: 'cubic'" in capsys.readouterr().err


@needs_bo
def test_a_log_cost_scale_reaches_the_autopeft_sampler_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler's hypervolume axis is log10 of the cost (its reference point's cost included), the study keeps
    the scale, its report measures on it, and a resumed search with another scale is refused."""
    samplers, _ = _watch_autopeft(monkeypatch)
    config = SearchConfig(
        model="shape:tiny-bert",
        task="sst2",
        sampler="autopeft",
        ref_point=(0.6, 5.0),
        cost_scale="log",
        trials=3,
        startup_trials=2,
        output=str(tmp_path),
        train=TRAIN | {"max_steps": 1},
    )
    study = run_search(config)
    assert study_module.definition_of(study)["cost_scale"] == "log"
    step = samplers[-1].last_step
    assert step["ref_point"] == pytest.approx([0.6, math.log10(5.0)])
    points = study_module.finished_points(study)
    assert results.summary(study)["hypervolume"] == pytest.approx(hypervolume_history(points, (0.6, 5.0), "log")[-1])
    with pytest.raises(PeftlabError, match="cost_scale: 'log' → 'linear'"):
        create_study(replace(config, cost_scale="linear"))
