"""The numpy metrics must agree with scikit-learn / scipy, which the runtime does not depend on."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from peftlab.train import metrics
from peftlab.train.generative import score_texts
from peftlab.train.tasks import TASKS, TaskInfo

skm = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _sk_f1(p: np.ndarray, y: np.ndarray) -> float:
    return skm.f1_score(y, p, pos_label=1, zero_division=0.0)


def _sk_macro_f1(p: np.ndarray, y: np.ndarray) -> float:
    return skm.f1_score(y, p, average="macro", zero_division=0.0)


REFERENCE = {
    "accuracy": lambda p, y: skm.accuracy_score(y, p),
    "f1": _sk_f1,
    "macro_f1": _sk_macro_f1,
    "mcc": lambda p, y: skm.matthews_corrcoef(y, p),
    "pearson": lambda p, y: stats.pearsonr(p, y).statistic,
    "spearman": lambda p, y: stats.spearmanr(p, y).statistic,
}

FIXED_CLASS = (np.array([1, 0, 1, 1, 0, 0, 1, 2, 2, 0]), np.array([1, 0, 0, 1, 0, 1, 1, 2, 0, 0]))
FIXED_BINARY = (np.array([1, 1, 0, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 1, 1, 0, 1, 0]))
FIXED_REG = (np.array([0.1, 2.5, 2.5, 4.0, 3.3, 1.0, 1.0]), np.array([0.0, 2.0, 3.0, 5.0, 3.0, 1.5, 0.5]))


@pytest.mark.parametrize("name", ["accuracy", "f1", "mcc"])
def test_binary_fixed(name: str) -> None:
    p, y = FIXED_BINARY
    assert metrics.METRICS[name](p, y) == pytest.approx(REFERENCE[name](p, y), abs=1e-12)


def test_fixed_values_by_hand() -> None:
    p, y = FIXED_BINARY  # TP=3, FP=1, FN=1, TN=3
    assert metrics.accuracy(p, y) == 0.75
    assert metrics.f1(p, y) == 0.75
    assert metrics.matthews_corr(p, y) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["accuracy", "macro_f1", "mcc"])
def test_multiclass_fixed(name: str) -> None:
    p, y = FIXED_CLASS
    assert metrics.METRICS[name](p, y) == pytest.approx(REFERENCE[name](p, y), abs=1e-12)


@pytest.mark.parametrize("name", ["pearson", "spearman"])
def test_regression_fixed_with_ties(name: str) -> None:
    p, y = FIXED_REG
    assert metrics.METRICS[name](p, y) == pytest.approx(REFERENCE[name](p, y), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_random_predictions_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y2, p2 = rng.integers(0, 2, n), rng.integers(0, 2, n)
    y3, p3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
    yr = rng.uniform(0, 5, n).round(1)  # rounding creates ties for Spearman
    pr = (yr + rng.normal(0, 1.5, n)).round(1)
    for name in ("accuracy", "f1", "mcc"):
        assert metrics.METRICS[name](p2, y2) == pytest.approx(REFERENCE[name](p2, y2), abs=1e-10)
    for name in ("accuracy", "macro_f1", "mcc"):
        assert metrics.METRICS[name](p3, y3) == pytest.approx(REFERENCE[name](p3, y3), abs=1e-10)
    for name in ("pearson", "spearman"):
        assert metrics.METRICS[name](pr, yr) == pytest.approx(REFERENCE[name](pr, yr), abs=1e-10)


def test_constant_predictions() -> None:
    y = np.array([0, 1, 1, 0, 1])
    const = np.ones_like(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics.matthews_corr(const, y) == skm.matthews_corrcoef(y, const) == 0.0
        assert np.isnan(stats.pearsonr(const.astype(float), y.astype(float)).statistic)
        # No positives anywhere: F1 undefined, both give 0.
        zeros = np.zeros_like(y)
        assert metrics.f1(zeros, zeros) == _sk_f1(zeros, zeros) == 0.0
    # Pearson / Spearman are undefined for zero variance; ours returns 0.0 where scipy gives NaN.
    assert metrics.pearson(const, y) == 0.0
    assert metrics.spearman(const, y) == 0.0
    assert metrics.pearson(y, const) == 0.0


def test_perfect_and_inverted() -> None:
    y = np.array([0.0, 1.0, 2.5, 4.0])
    assert metrics.pearson(y, y) == pytest.approx(1.0)
    assert metrics.spearman(-y, y) == pytest.approx(-1.0)
    assert metrics.matthews_corr([1, 0, 1], [0, 1, 0]) == pytest.approx(-1.0)


def test_compute_takes_logits_and_regression_columns() -> None:
    logits = np.array([[2.0, 0.1], [0.3, 0.9], [1.0, -1.0], [0.0, 5.0]])
    labels = [0, 1, 1, 1]
    out = metrics.compute(["accuracy", "f1"], logits, labels)
    assert out == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    reg = metrics.compute(["pearson", "spearman"], np.array([[0.5], [1.5], [2.0]]), [0.0, 1.0, 3.0])
    assert reg["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one score per example"):
        metrics.compute(["pearson"], logits, labels)


def test_compute_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.compute(["accuracy"], [1, 0], [1])
    with pytest.raises(ValueError, match="zero examples"):
        metrics.compute(["accuracy"], [], [])


@pytest.mark.parametrize("info", TASKS.values(), ids=list(TASKS))
def test_every_task_metric_is_computable(info: TaskInfo) -> None:
    assert info.main_metric in info.metrics
    if info.generative:  # scored on generated text
        out = score_texts(info.generation.scoring, ["yes", "#### 4", "a cat"], ["yes", "4", "the cat"])
        assert set(out) == set(info.metrics) and all(0.0 <= v <= 1.0 for v in out.values())
        return
    rng = np.random.default_rng(0)
    if info.is_regression:
        labels = rng.uniform(0, 5, 20)
        preds = labels + rng.normal(0, 1, 20)
    else:
        labels = rng.integers(0, info.num_labels, 20)
        preds = rng.normal(size=(20, info.num_labels))
    out = metrics.compute(info.metrics, preds, labels)
    assert set(out) == set(info.metrics)
    assert all(-1.0 <= v <= 1.0 for v in out.values())
