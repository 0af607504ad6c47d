"""What a model that has learned nothing scores: the best constant prediction's metrics, and the loss of
predicting the label prior. A run still at either after its first evaluation has not started to learn; a
search gives no credit for scores at or below the constant prediction."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from peftlab.train import metrics
from peftlab.train.tasks import Example, TaskInfo


def constant_scores(task: TaskInfo, rows: list[Example]) -> dict[str, float]:
    """The task's metrics on ``rows`` of the constant prediction that scores best on its main metric: one class
    for every example (the majority class for accuracy; the positive class for F1), or the mean for regression,
    whose correlations are then 0."""
    labels = [r["label"] for r in rows if r["label"] is not None]
    if not labels:
        raise ValueError(f"{task.name}: no labelled examples to compute a constant-prediction baseline on")
    if task.is_regression:
        return metrics.compute(task.metrics, [float(np.mean(labels))] * len(labels), labels)
    scores = [metrics.compute(task.metrics, [c] * len(labels), labels) for c in range(task.num_labels)]
    return max(scores, key=lambda s: s[task.main_metric])


def prior_loss(task: TaskInfo, rows: list[Example]) -> float | None:
    """The training loss of predicting the label prior of ``rows``: the entropy of the label frequencies
    (cross-entropy, nats) for classification, the labels' variance (MSE) for regression; None without labels.
    It compares with a classification or regression head's loss, not a text-to-text model's (whose loss is over
    the label words' tokens)."""
    labels = [r["label"] for r in rows if r["label"] is not None]
    if not labels:
        return None
    if task.is_regression:
        return float(np.var(labels))
    counts = Counter(int(label) for label in labels)
    n = len(labels)
    return -sum(c / n * math.log(c / n) for c in counts.values())
