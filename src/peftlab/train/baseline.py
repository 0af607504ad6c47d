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


#: A dev score within this of the constant prediction's is the constant prediction's: the same predictions give
#: the same metric up to float rounding, and any real improvement is at least one example (>= 1 / dev size).
SCORE_TOLERANCE = 1e-9
#: A mean training loss above (1 - this) x the label prior is still at the prior: a random head starts above it,
#: a model that learned only the label frequencies sits on it, and one that uses its inputs goes below it. The loss
#: judged is the mean over the later half of the steps so far (the first steps sit at the prior in every run).
LOSS_TOLERANCE = 0.01


def hopeless(metric: str, score: float, baseline: float, loss: float | None, prior: float | None) -> str | None:
    """Why a run has not started to learn at its first evaluation, or None. Both signals must agree: its dev
    ``score`` at or below the constant prediction's ``baseline`` AND its recent mean training ``loss`` still at the
    label ``prior``. A merely slow run (loss already falling, predictions not yet flipped) goes on;
    with no comparable loss (``prior`` None: text-to-text, or an extra training objective) the score decides."""
    if score > baseline + SCORE_TOLERANCE:
        return None
    reason = f"dev {metric} {score:.4f} <= constant prediction's {baseline:.4f}"
    if prior is None or loss is None:
        return reason
    if loss < (1 - LOSS_TOLERANCE) * prior:
        return None
    return f"{reason} and mean training loss {loss:.4f} still at the label prior's {prior:.4f}"
