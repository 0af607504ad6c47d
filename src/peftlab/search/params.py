"""A design space in Optuna's terms: its dimensions as distributions, a point as a trial's parameters and back.

An insertion bit or a size on a log scale is an integer *index* (``IntDistribution(0, n - 1)``); an S4 choice
(a grouping, a set of strategies) is its label (``CategoricalDistribution``), so that the Optuna dashboard
shows what was chosen. The search and the AutoPEFT sampler both speak it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from peftlab.core.spec import SpecError
from peftlab.space import SearchSpace


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """The Optuna distribution of every dimension of ``space``."""
    out: dict[str, BaseDistribution] = {}
    for d in space.dimensions():
        if d.type == "categorical":
            out[d.name] = CategoricalDistribution(d.labels())
        else:
            out[d.name] = IntDistribution(0, len(d.choices) - 1)
    return out


def suggest(trial: optuna.Trial, dists: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """A trial's parameters, asked of its sampler one dimension at a time."""
    params: dict[str, Any] = {}
    for name, d in dists.items():
        if isinstance(d, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, list(d.choices))
        else:
            params[name] = trial.suggest_int(name, d.low, d.high)
    return params


def to_vector(space: SearchSpace, params: Mapping[str, Any]) -> list[int]:
    """The point (choice indices) of a trial's parameters."""
    vector = []
    for d in space.dimensions():
        if d.name not in params:
            raise SpecError(f"the trial has no parameter '{d.name}': it was not made in this space")
        value = params[d.name]
        vector.append(d.labels().index(value) if d.type == "categorical" else int(value))
    return vector


def to_params(space: SearchSpace, vector: Sequence[int] | Sequence[float]) -> dict[str, Any]:
    """A trial's parameters from a point (the inverse of :func:`to_vector`)."""
    params: dict[str, Any] = {}
    for d, k in zip(space.dimensions(), vector, strict=True):
        params[d.name] = d.labels()[int(k)] if d.type == "categorical" else int(k)
    return params
