"""The test split, held out of the search: trials are chosen on dev alone and do not score test; once the trials
are done, the Pareto set is scored on test from the adapters its trials saved.

Optuna refuses to change a finished trial, so these scores are study user attributes, one per trial (one key
each: workers that score at the same time never overwrite each other); :func:`trial_test` reads a trial's test
scores from either place (trials of searches with ``score_test`` carry their own).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from peftlab.train import TrainConfig
from peftlab.train.evaluation import score_saved

log = logging.getLogger("peftlab.search")

#: The study user attribute holding trial N's test scores: f"{TEST_ATTR}{N:05d}"
TEST_ATTR = "peftlab_test_"


def trial_test(study_attrs: Mapping[str, Any], trial: FrozenTrial) -> dict[str, float] | None:
    """A trial's test scores (``study_attrs``: the study's user attributes), or None when it has none."""
    return trial.user_attrs.get("test") or study_attrs.get(f"{TEST_ATTR}{trial.number:05d}")


def score_front(study: optuna.Study, front: Sequence[FrozenTrial], definition: Mapping[str, Any]) -> list[int]:
    """Score on test each trial of ``front`` that has no test scores yet, from its saved adapter; returns the
    numbers of those whose adapter is not on this machine (a worker elsewhere trained them)."""
    attrs = study.user_attrs
    todo = [t for t in front if trial_test(attrs, t) is None]
    if not todo:
        return []
    config = TrainConfig(model=definition["model"], task=definition["task"], progress=False, **definition["train"])
    missing = []
    for t in todo:
        run = t.user_attrs.get("run")
        adapter = Path(run) / "adapter" if run else None
        if adapter is None or not adapter.is_dir():
            missing.append(t.number)
            continue
        study.set_user_attr(f"{TEST_ATTR}{t.number:05d}", score_saved(config, adapter))
    if missing:
        log.warning("Pareto trials %s not scored on test: their adapters are not on this machine", missing)
    return missing
