"""GLUE / SuperGLUE evaluation metrics in plain numpy.

Implemented here rather than imported from scikit-learn / scipy so that training and evaluation need
only numpy at runtime; the test-suite checks every metric against the reference implementations.

All metrics take ``preds`` and ``labels`` as equal-length 1-D sequences. Classification metrics expect
class ids. Where a reference implementation would warn and return NaN or 0 for a degenerate input
(constant predictions, no positive examples), these functions return ``0.0`` so that a model-selection
loop never has to handle NaN; each docstring says when that happens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "METRICS",
    "accuracy",
    "compute",
    "f1",
    "macro_f1",
    "matthews_corr",
    "oriented",
    "pearson",
    "spearman",
]


def _pair(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Flatten both inputs and reject mismatched or empty ones, which would otherwise give silent NaN."""
    p = np.asarray(preds).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the label."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1(preds: ArrayLike, labels: ArrayLike) -> float:
    """Binary F1 of the positive class 1 (GLUE's MRPC / QQP convention).

    Returns 0.0 when class 1 occurs in neither preds nor labels (F1 undefined), as scikit-learn does.
    """
    p, y = _pair(preds, labels)
    return _class_f1(p, y, 1)


def _class_f1(p: np.ndarray, y: np.ndarray, cls: object) -> float:
    """F1 of one class as 2·TP / (2·TP + FP + FN); 0.0 when the class is absent from both."""
    tp = int(np.sum((p == cls) & (y == cls)))
    fp = int(np.sum((p == cls) & (y != cls)))
    fn = int(np.sum((p != cls) & (y == cls)))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def macro_f1(preds: ArrayLike, labels: ArrayLike) -> float:
    """Unweighted mean of per-class F1 over every class seen in preds or labels (CB's second metric).

    A class that is predicted but never correct, or present but never predicted, contributes 0.0.
    """
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    return float(np.mean([_class_f1(p, y, c) for c in classes]))


def matthews_corr(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (multi-class form, as in scikit-learn), CoLA's metric.

    Returns 0.0 when either preds or labels are constant, where the coefficient is 0/0.
    """
    p, y = _pair(preds, labels)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    y_idx, p_idx = inverse[: y.size], inverse[y.size :]
    conf = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(conf, (y_idx, p_idx), 1.0)
    true_sum, pred_sum = conf.sum(axis=1), conf.sum(axis=0)
    n, correct = conf.sum(), np.trace(conf)
    cov_yp = correct * n - true_sum @ pred_sum
    cov_pp = n * n - pred_sum @ pred_sum
    cov_yy = n * n - true_sum @ true_sum
    if cov_pp * cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_yy * cov_pp))


def pearson(preds: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation, STS-B's secondary metric.

    Undefined when preds or labels are constant (zero variance); returns 0.0 there, where scipy
    returns NaN with a warning.
    """
    p, y = _pair(preds, labels)
    p = p.astype(np.float64) - p.mean()
    y = y.astype(np.float64) - y.mean()
    denom = np.sqrt((p @ p) * (y @ y))
    if denom == 0:
        return 0.0
    return float(np.clip((p @ y) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method='average')``)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(preds: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation (Pearson on tie-averaged ranks), STS-B's main metric.

    Returns 0.0 when preds or labels are constant, where the coefficient is undefined.
    """
    p, y = _pair(preds, labels)
    return pearson(_average_ranks(p), _average_ranks(y))


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "mcc": matthews_corr,
    "pearson": pearson,
    "spearman": spearman,
}
"""Metric name (as used in ``TaskInfo.metrics``) → function."""

_REGRESSION_METRICS = frozenset({"pearson", "spearman"})


def compute(task_metrics: Sequence[str], preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Compute each named metric, so a trainer can evaluate any task from its ``TaskInfo.metrics``.

    ``preds`` may be class ids, or a ``(n, num_classes)`` array of scores/logits, whose argmax is taken
    for classification metrics; a ``(n, 1)`` regression output is flattened.
    """
    unknown = [m for m in task_metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {sorted(METRICS)}")
    scores = np.asarray(preds)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    out: dict[str, float] = {}
    for name in task_metrics:
        if scores.ndim == 2 and name in _REGRESSION_METRICS:
            raise ValueError(f"metric {name!r} needs one score per example, got shape {scores.shape}")
        p = scores.argmax(axis=-1) if scores.ndim == 2 else scores
        out[name] = METRICS[name](p, labels)
    return out


def oriented(name: str, value: float) -> float:
    """A metric as a score, higher is better: minus the loss (a generative task chosen by its dev loss), any other
    metric as it is. Model selection, searches and their tables compare these."""
    return -value if name == "loss" else value
