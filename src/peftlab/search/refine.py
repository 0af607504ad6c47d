"""S4's progressive greedy refinement (Chen et al. 2023) of a design space, run on a search's machinery.

Each stage is one dimension of the S4 space (grouping, allocation, tuned groups, then each group's
strategies). The stage's candidates are the sub-spaces that fix that dimension to each of its values; from
each candidate ``samples`` points are drawn (the rest of the space random), trained at low fidelity (sample n
with the training seed + n, so that a candidate narrowed to one point is measured over seeds) and scored on the
dev split; the candidate whose scores are best (by mean, then median, then the first) becomes
the space of the next stage. After the last stage every dimension holds one value: that design, sized to
the budget on the model, is the result.

With a handful of samples per candidate this compares small samples, not the score distributions the paper
estimated from 100 models per candidate: the result says which design won here, at this fidelity. Each stage
reports its margin (the chosen mean minus the runner-up's) in standard errors of that difference, so a choice
inside the noise is seen as one: give ``samples`` enough for the margins that matter to clear 2 sigma.

Every evaluation is a trial of an Optuna study (sampler ``s4-refine``), so a killed refinement resumes where it
stopped and ``peftlab pareto`` and the dashboard read it like any search.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from peftlab.atomic import write_json
from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError
from peftlab.search.params import to_params
from peftlab.search.storage import open_storage
from peftlab.search.study import TRAIN_SEED_ATTR, CostModel, Objective, SearchConfig, create_study, fail_stale
from peftlab.space import DesignSpace


@dataclass
class Stage:
    """One greedy step: the candidates' values and dev scores, and the value kept."""

    name: str
    values: list[str]
    scores: list[list[float]]
    chosen: str
    skipped: str | None = None

    def margin(self) -> tuple[float, float | None] | None:
        """The chosen candidate's mean minus the runner-up's, and that margin in standard errors of the difference
        (sqrt(se_chosen^2 + se_runner_up^2); None with fewer than 2 samples on either side, where no spread is
        known); None without a runner-up. Under 2 sigma, the stage's choice cannot be told from noise."""
        scored = [(v, s) for v, s in zip(self.values, self.scores, strict=True) if s]
        if self.skipped or len(scored) < 2:
            return None
        best = next(s for v, s in scored if v == self.chosen)
        runner_up = max((s for v, s in scored if v != self.chosen), key=_key)
        diff = statistics.mean(best) - statistics.mean(runner_up)
        if min(len(best), len(runner_up)) < 2:
            return diff, None
        se = (_sem(best) ** 2 + _sem(runner_up) ** 2) ** 0.5
        return diff, (diff / se if se > 0 else float("inf"))

    def to_dict(self) -> dict[str, Any]:
        margin = self.margin()
        return {
            "stage": self.name,
            "chosen": self.chosen,
            "skipped": self.skipped,
            "margin": margin[0] if margin else None,
            "margin_sigma": margin[1] if margin else None,
            "candidates": [
                {"value": v, "scores": s, "mean": _mean(s), "median": _median(s), "sem": _sem(s)}
                for v, s in zip(self.values, self.scores, strict=True)
            ],
        }


@dataclass
class Refinement:
    """The stages in order and the final design and spec."""

    stages: list[Stage] = field(default_factory=list)
    design: dict[str, str] = field(default_factory=dict)
    spec: Spec | None = None
    stored_percent: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [s.to_dict() for s in self.stages],
            "design": self.design,
            "stored_percent": self.stored_percent,
            "spec": self.spec.to_dict() if self.spec else None,
        }


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _sem(xs: list[float]) -> float | None:
    """The standard error of the mean (None below 2 samples)."""
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else None


def _key(scores: list[float]) -> tuple[float, float]:
    return (statistics.mean(scores), statistics.median(scores)) if scores else (float("-inf"), float("-inf"))


def refine(
    config: SearchConfig,
    samples: int = 2,
    stages: list[str] | None = None,
    on_trial: Callable[[FrozenTrial], None] | None = None,
) -> Refinement:
    """Refine ``config.space`` (an S4 design space) stage by stage; ``config.sampler`` is ignored."""
    if samples < 1:
        raise PeftlabError(f"samples must be >= 1, got {samples}")
    config.sampler = "s4-refine"  # recorded in the study; no sampler draws the points, the stages do
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study, space = create_study(config)
    if not isinstance(space, DesignSpace):
        raise PeftlabError(f"S4 refinement needs an S4 design space (type s4), not a '{space.type}' space")
    order = space.stages()
    unknown = [s for s in stages or [] if s not in order]
    if unknown:
        raise PeftlabError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(order)}")
    full = space
    # Heartbeats mark a killed run's trial stale; it is not queued again: its (stage, candidate, sample) is.
    storage = open_storage(config.storage_url, heartbeat=config.heartbeat, retry=False)
    study = optuna.load_study(study_name=config.study, storage=storage)
    adopted: set[int] = set()  # running trials given a heartbeat (see search.fail_stale)
    objective = Objective(config, full, CostModel.for_search(config))
    result = Refinement()
    for stage in stages or order:
        candidates = space.candidates(stage)
        values = [d.labels()[0] for d in (c.dimensions()[order.index(stage)] for c in candidates)]
        skip = _skip(space, stage)
        if skip:  # fixed to its first value without training: it cannot change the model
            result.stages.append(Stage(stage, values, [[] for _ in values], values[0], skip))
            space = candidates[0]
            continue
        scores: list[list[float]] = []
        for k, candidate in enumerate(candidates):
            rng = random.Random(f"{config.seed}/{stage}/{values[k]}")
            points = [candidate.random_vector(rng) for _ in range(samples)]
            got = []
            for n, point in enumerate(points):
                # each sample its own training seed: a candidate whose space is one point (late stages) is then
                # measured over seeds, not the same run repeated
                seed = config.train.get("seed", 0) + n
                attrs = {"stage": stage, "candidate": values[k], "sample": n, TRAIN_SEED_ATTR: seed}
                trial = _evaluate(study, storage, adopted, objective, to_params(candidate, point), attrs, on_trial)
                if trial.state == TrialState.COMPLETE:
                    got.append(trial.values[0])
            scores.append(got)
        best = max(range(len(candidates)), key=lambda i: _key(scores[i]))
        result.stages.append(Stage(stage, values, scores, values[best]))
        space = candidates[best]
    result.design = {d.name: d.labels()[0] for d in space.dimensions() if len(d.choices) == 1}
    for st in result.stages:
        if st.skipped and st.skipped != "one value":
            result.design[st.name] = f"- ({st.skipped})"
    if all(len(d.choices) == 1 for d in space.dimensions()):
        result.spec = space.decode([0] * len(space.dimensions()))
        result.stored_percent = objective.cost.stored(result.spec)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "refine.json", result.to_dict())
    if result.spec is not None:
        result.spec.save(out / "spec.json")
    return result


def _skip(space: DesignSpace, stage: str) -> str | None:
    """Why a stage has nothing to decide: one candidate, or the strategies of a group that is not tuned."""
    if len(space.candidates(stage)) == 1:
        return "one value"
    if stage.startswith("strategies_g") and len(space.tuned) == 1:
        group = int(stage.removeprefix("strategies_g"))
        if group not in space.tuned[0]:
            return f"group {group} is not tuned"
    return None


def _evaluate(
    study: optuna.Study,
    storage: RDBStorage,
    adopted: set[int],
    objective: Objective,
    params: dict[str, Any],
    attrs: dict[str, Any],
    on_trial: Callable[[FrozenTrial], None] | None,
) -> FrozenTrial:
    """The finished trial of this (stage, candidate, sample), run now if the study does not hold it yet."""
    for t in study.get_trials(deepcopy=False):
        if all(t.user_attrs.get(k) == v for k, v in attrs.items()) and t.user_attrs.get("status"):
            return t
    fail_stale(study, storage, adopted)
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False)
    callbacks = [lambda s, t: on_trial(t)] if on_trial else []
    study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks)
    return study.get_trials(deepcopy=False)[-1]
