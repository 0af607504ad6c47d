"""What a model that learned nothing scores: constant predictions and the label prior, on real task data."""

from __future__ import annotations

import math
import os

import pytest

from peftlab.train.baseline import constant_scores, hopeless, prior_loss
from peftlab.train.tasks import Example, get_task, make_splits


def _rows(labels: list) -> list[Example]:
    return [{"text": "x", "text_pair": None, "label": y} for y in labels]


def test_constant_prediction_scores() -> None:
    rte = get_task("rte")  # accuracy: the majority class
    assert constant_scores(rte, _rows([0, 0, 0, 1]))["accuracy"] == 0.75
    mrpc = get_task("mrpc")  # main metric F1: always the positive class, even where it is the minority
    scores = constant_scores(mrpc, _rows([0, 0, 0, 1]))
    assert scores["f1"] == pytest.approx(2 * 1 / (2 * 1 + 3)) and scores["accuracy"] == 0.25
    assert constant_scores(get_task("cola"), _rows([0, 1, 1]))["mcc"] == 0.0
    assert constant_scores(get_task("stsb"), _rows([1.0, 2.0, 4.5]))["spearman"] == 0.0


def test_prior_loss_is_the_label_entropy_or_variance() -> None:
    assert prior_loss(get_task("rte"), _rows([0, 1, 0, 1])) == pytest.approx(math.log(2))
    assert prior_loss(get_task("rte"), _rows([1, 1])) == 0.0
    assert prior_loss(get_task("stsb"), _rows([1.0, 3.0])) == pytest.approx(1.0)
    assert prior_loss(get_task("rte"), _rows([None])) is None


@pytest.mark.real
def test_real_dev_split_baselines() -> None:
    """SST-2's dev split is nearly balanced: the majority class scores just over a half."""
    if not os.environ.get("PEFTLAB_DATA_DIR"):
        pytest.skip("no task data folder (set PEFTLAB_DATA_DIR)")
    task = get_task("sst2")
    splits = make_splits(task.name, None, None, 0, None)
    acc = constant_scores(task, splits.dev)["accuracy"]
    assert 0.5 <= acc < 0.6
    assert 0.6 < prior_loss(task, splits.train) <= math.log(2)


def test_hopeless_needs_the_score_and_the_loss_to_agree() -> None:
    # Learned nothing: the constant prediction's score and a loss still at the prior (a random head starts above it).
    reason = hopeless("accuracy", 0.5, 0.5, 0.70, math.log(2))
    assert reason is not None and "accuracy 0.5000 <= constant prediction's 0.5000" in reason and "0.6931" in reason
    # Merely slow: predictions not flipped yet, but the loss is already on its way below the prior.
    assert hopeless("accuracy", 0.4, 0.5, 0.66, math.log(2)) is None
    # Above the constant prediction: learning, whatever the loss says.
    assert hopeless("accuracy", 0.5 + 1e-6, 0.5, 0.70, math.log(2)) is None
    # Text-to-text (no comparable loss): the score decides.
    assert hopeless("f1", 0.5, 0.6, None, None) is not None
