"""The AutoPEFT sampler: BO beats random search on a synthetic problem over the real BERT-base AutoPEFT space,
batches hold no repeats, running trials are pending, budgets hold, S4 spaces work, and the BoTorch-less error.

The synthetic problem (see :func:`score`): the real AutoPEFT space of BERT-base (12 insertion bits, serial /
parallel adapter and prefix sizes on 0, 1, ..., 512), the exact cost of a point (the trainable parameters of
its modules at its layers, counted on the meta device by ``Backbone.strategy_cost``, as % of the backbone),
and a score with diminishing returns, an interaction and irrelevant dimensions (layers 0-3 and the prefix
size do nothing: what SAAS priors are for).
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import torch

import peftlab
from peftlab import search
from peftlab.pareto import hypervolume
from peftlab.space import Backbone, load_space

HAS_BO = all(importlib.util.find_spec(m) is not None for m in ("botorch", "jax", "numpyro"))
needs_bo = pytest.mark.skipif(not HAS_BO, reason='needs BoTorch with NumPyro: pip install "botorch[fully-bayesian]"')

#: NUTS kept small: a fit's time is mostly JAX compiling the sampler, whatever the chain length.
FAST = {"warmup_steps": 64, "num_samples": 64, "thinning": 8, "mc_samples": 16, "n_random_starts": 2}
#: Hypervolume reference point, fixed in advance: chance-level score (80) and 10% of BERT-base's parameters.
REF = (80.0, 10.0)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Problem:
    """The BERT-base AutoPEFT space with an exact cost and a synthetic score."""

    def __init__(self) -> None:
        self.backbone = Backbone.of(peftlab.load_model("shape:bert-base", meta=True))
        self.space = load_space("autopeft", self.backbone)
        self.nb = len(self.space.layers)
        # cost[layer][module][index]: parameters of that module at that size there (0 for size 0)
        self.table = [[[self.backbone.strategy_cost(layer, m.strategy, c) if c else 0 for c in m.choices]
                       for m in self.space.modules] for layer in self.space.layers]

    def cost(self, v: list[int]) -> float:
        """Trainable parameters of the point, as % of the backbone's."""
        total = sum(self.table[i][j][v[self.nb + j]] for i in range(self.nb) if v[i]
                    for j in range(len(self.space.modules)))
        return 100.0 * total / self.backbone.params

    def score(self, v: list[int]) -> float:
        """80 (chance) + up to 10: upper layers count more, layers 0-3 and the prefix not at all; the serial
        and parallel sizes add with diminishing returns and overlap (their product is subtracted)."""
        layers = sum((i - 3) / 36 for i in range(4, self.nb) if v[i])
        a, b = v[self.nb] / 10, v[self.nb + 1] / 10
        modules = 0.7 * math.sqrt(a) + 0.5 * math.sqrt(b) - 0.3 * a * b
        return 80.0 + 10.0 * (1.0 - math.exp(-3.0 * layers * modules))

    def suggest(self, trial: optuna.Trial) -> list[int]:
        return search.to_vector(self.space, {k: trial.suggest_int(k, d.low, d.high)
                                             for k, d in search.distributions(self.space).items()})

    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        v = self.suggest(trial)
        return self.score(v), self.cost(v)


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem()


def _run(problem: Problem, sampler: optuna.samplers.BaseSampler, startup: int, batch: int) -> list[tuple]:
    """``startup`` trials one by one, then one batch of ``batch`` asked together and told together (as
    ``batch`` parallel workers would)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(problem.objective, n_trials=startup)
    trials = [study.ask() for _ in range(batch)]
    points = [problem.suggest(t) for t in trials]  # all suggested before any is told: one BO step
    for t, v in zip(trials, points, strict=True):
        study.tell(t, (problem.score(v), problem.cost(v)))
    return [tuple(t.values) for t in study.trials]


# -- the test ------------------------------------------------------------------------------------------
@needs_bo
def test_bo_beats_random_search_hypervolume(problem):
    from peftlab.bo import AutoPEFTSampler

    startup, batch, seeds = 8, 12, (0, 1, 2)
    results = {}
    t0 = time.perf_counter()
    for seed in seeds:
        random_points = _run(problem, optuna.samplers.RandomSampler(seed=seed), startup, batch)
        sampler = AutoPEFTSampler(space=problem.space, cost=problem.cost, n_startup_trials=startup,
                                  batch_size=batch, seed=seed, **FAST)
        bo_points = _run(problem, sampler, startup, batch)
        assert bo_points[:startup] == random_points[:startup]  # the same RandomSampler(seed) start
        results[seed] = (hypervolume(random_points, REF), hypervolume(bo_points, REF))
    print(f"\nhypervolume at {REF} after {startup + batch} trials (random, BO): {results} "
          f"in {time.perf_counter() - t0:.1f} s")
    hv_random, hv_bo = np.array(list(results.values())).T
    assert hv_bo.mean() > hv_random.mean()
    assert (hv_bo > hv_random).sum() > len(seeds) / 2
