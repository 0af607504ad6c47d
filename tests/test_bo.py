"""The AutoPEFT sampler: BO beats random search on a synthetic problem over the real BERT-base AutoPEFT space,
batches hold no repeats, running trials are pending, budgets hold, S4 spaces work, and the BoTorch-less error.

The synthetic problem (see :func:`score`): the real AutoPEFT space of BERT-base (12 insertion bits, serial /
parallel adapter and prefix sizes on 0, 1, ..., 512), the exact cost of a point (the trainable parameters of
its modules at its layers, counted on the meta device by ``Backbone.strategy_cost``, as % of the backbone),
and a score with diminishing returns, an interaction and irrelevant dimensions (layers 0-3 and the prefix
size do nothing: what SAAS priors are for).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import time

import numpy as np
import optuna
import pytest
import torch

import peftlab
from peftlab.search import params
from peftlab.search.pareto import hypervolume
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
        self.table = [
            [
                [self.backbone.strategy_cost(layer, m.strategy, c) if c else 0 for c in m.choices]
                for m in self.space.modules
            ]
            for layer in self.space.layers
        ]

    def cost(self, v: list[int]) -> float:
        """Trainable parameters of the point, as % of the backbone's."""
        total = sum(
            self.table[i][j][v[self.nb + j]] for i in range(self.nb) if v[i] for j in range(len(self.space.modules))
        )
        return 100.0 * total / self.backbone.params

    def score(self, v: list[int]) -> float:
        """80 (chance) + up to 10: upper layers count more, layers 0-3 and the prefix not at all; the serial
        and parallel sizes add with diminishing returns and overlap (their product is subtracted)."""
        layers = sum((i - 3) / 36 for i in range(4, self.nb) if v[i])
        a, b = v[self.nb] / 10, v[self.nb + 1] / 10
        modules = 0.7 * math.sqrt(a) + 0.5 * math.sqrt(b) - 0.3 * a * b
        return 80.0 + 10.0 * (1.0 - math.exp(-3.0 * layers * modules))

    def suggest(self, trial: optuna.Trial) -> list[int]:
        return params.to_vector(self.space, params.suggest(trial, params.distributions(self.space)))

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
    from peftlab.search.bo import AutoPEFTSampler

    startup, batch, seeds = 8, 8, (0, 1, 2)
    results = {}
    t0 = time.perf_counter()
    for seed in seeds:
        random_points = _run(problem, optuna.samplers.RandomSampler(seed=seed), startup, batch)
        sampler = AutoPEFTSampler(
            space=problem.space, cost=problem.cost, n_startup_trials=startup, batch_size=batch, seed=seed, **FAST
        )
        bo_points = _run(problem, sampler, startup, batch)
        assert bo_points[:startup] == random_points[:startup]  # the same RandomSampler(seed) start
        results[seed] = (hypervolume(random_points, REF), hypervolume(bo_points, REF))
    print(
        f"\nhypervolume at {REF} after {startup + batch} trials (random, BO): {results} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    hv_random, hv_bo = np.array(list(results.values())).T
    assert hv_bo.mean() > hv_random.mean()
    assert (hv_bo > hv_random).sum() > len(seeds) / 2
    # every seed fitted 8 points: the NUTS program compiled for their padded size (16 rows) is reused
    assert sampler.last_step["nuts"][0]["padded"] == 16 and not sampler.last_step["nuts"][0]["compiled"]


# -- unit tests ------------------------------------------------------------------------------------------------
def _random_study(problem: Problem, n: int, seed: int = 0) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    study.optimize(problem.objective, n_trials=n)
    return study


def _running(problem: Problem, study: optuna.Study) -> list[int]:
    """A trial left RUNNING (another worker's) with all its parameters suggested."""
    sampler = study.sampler
    study.sampler = optuna.samplers.RandomSampler(123)
    v = problem.suggest(study.ask())
    study.sampler = sampler
    return v


@needs_bo
def test_neighbours_and_encoding(problem):
    from peftlab.search.bo import Encoder, neighbours

    space = problem.space
    v = [1] * 12 + [0, 5, 10]
    near = neighbours(v, space)
    assert len(near) == 12 + 1 + 2 + 1  # every bit flipped; serial 0 -> 1, parallel 5 -> 4 or 6, prefix 10 -> 9
    assert all((np.asarray(v) != w).sum() == 1 for w in near)
    enc = Encoder(space)
    X = enc.encode([v])
    assert X.shape == (1, 15) and X.min() >= 0 and X.max() <= 1 and X[0, 13] == 0.5
    s4 = load_space("s4", problem.backbone)
    enc = Encoder(s4)
    dims = s4.dimensions()
    assert enc.width == sum(len(d.choices) for d in dims)  # categorical dims are one-hot
    points = np.array([s4.random_vector(k) for k in range(5)], dtype=int)
    assert (enc.decode(enc.encode(points)) == points).all()
    w = [0] * len(dims)
    assert len(neighbours(w, s4)) == sum(len(d.choices) - 1 for d in dims)


@needs_bo
def test_local_search_respects_budget_and_tried_points(problem):
    from peftlab.search.bo import AutoPEFTSampler

    sampler = AutoPEFTSampler(space=problem.space, cost=problem.cost, budget=1.0, seed=0)
    bigger = lambda X: X.sum(dim=(-2, -1))  # noqa: E731 - an "acquisition" preferring every module large everywhere
    start = [(0,) * 12 + (1, 1, 0)]
    best, count = sampler.local_search(bigger, start, blocked=set())
    assert count > 0 and problem.cost(list(best)) <= 1.0
    unconstrained = AutoPEFTSampler(space=problem.space, cost=problem.cost, seed=0, max_local_steps=100)
    best_free, _ = unconstrained.local_search(bigger, start, blocked=set())
    assert best_free == (1,) * 12 + (10, 10, 10)  # hill-climbing reaches the top without a budget
    again, _ = unconstrained.local_search(bigger, start, blocked={best_free})
    assert again != best_free  # a tried point is never the answer
    # points placing no module all build the empty spec: one tried empty point blocks them all
    assert sampler.key((1,) * 12 + (0, 0, 0)) == sampler.key((0,) * 12 + (3, 4, 5)) == (0,) * 15


@needs_bo
def test_queue_pending_and_refresh(problem, monkeypatch):
    from peftlab.search.bo import AutoPEFTSampler

    study = _random_study(problem, 3)
    running = _running(problem, study)
    sampler = AutoPEFTSampler(space=problem.space, cost=problem.cost, n_startup_trials=3, batch_size=3, seed=0)
    calls = []
    batch = [(1,) * 12 + (k, 1, 0) for k in (1, 2, 3)]

    def fake_step(directions, completed, blocked, pending):
        calls.append((len(completed), set(blocked), list(pending)))
        return list(batch)

    monkeypatch.setattr(sampler, "_step", fake_step)
    study.sampler = sampler
    trials = [study.ask() for _ in range(3)]
    got = [tuple(problem.suggest(t)) for t in trials]
    assert got == batch and len(calls) == 1  # one step, its batch handed out in order
    n, blocked, pending = calls[0]
    assert n == 3 and pending == [tuple(running)]  # the other worker's trial is pending...
    evaluated = {tuple(params.to_vector(problem.space, t.params)) for t in study.trials[:3]}
    assert {sampler.key(v) for v in evaluated | {tuple(running)}} <= blocked  # ...and never suggested
    study.tell(trials[0], (problem.score(list(got[0])), problem.cost(list(got[0]))))
    problem.suggest(study.ask())
    assert len(calls) == 2 and calls[1][0] == 4  # a completed trial: a new step with it as an observation
    assert set(calls[1][2]) == {tuple(running), got[1], got[2]}


@needs_bo
def test_infer_relative_search_space_checks_the_study(problem):
    from peftlab.errors import PeftlabError
    from peftlab.search.bo import AutoPEFTSampler

    sampler = AutoPEFTSampler(space=problem.space, seed=0)
    study = _random_study(problem, 2)
    assert sampler.infer_relative_search_space(study, study.trials[0]) == params.distributions(problem.space)
    other = optuna.create_study(directions=["maximize", "minimize"])
    other.optimize(lambda t: (t.suggest_int("layer_0", 0, 5), 1.0), n_trials=1)
    with pytest.raises(PeftlabError, match="another space"):
        sampler.infer_relative_search_space(other, other.trials[0])
    single = optuna.create_study(sampler=AutoPEFTSampler(space=problem.space, n_startup_trials=1))
    with pytest.raises(PeftlabError, match="multi-objective"):
        problem.suggest(single.ask())


def _fake_nuts(model, seed=0, **_):
    """Stand-in for NUTS: 4 MCMC samples of ones (lengthscales, output scale, noise), loaded the way NUTS
    loads its samples. Exercises models, acquisition and local search in milliseconds; NUTS itself is
    fitted for real by the hypervolume and S4 tests."""
    model.train()
    model.load_mcmc_samples(model.pyro_model.get_dummy_mcmc_samples(4, dtype=torch.double))
    model.eval()


@needs_bo
def test_batch_without_cost_three_objectives_no_repeats_running_pending(problem, monkeypatch):
    """cost=None: all 3 objectives get a SAAS-GP; a batch of 3 from one step skips tried and running points."""
    import peftlab.search.bo
    from peftlab.search.bo import AutoPEFTSampler

    monkeypatch.setattr(peftlab.search.bo, "fit_saas_nuts", _fake_nuts)
    study = optuna.create_study(
        directions=["maximize", "minimize", "maximize"], sampler=optuna.samplers.RandomSampler(1)
    )
    study.optimize(lambda t: (*problem.objective(t), float(t.params["layer_3"])), n_trials=6)
    running = _running(problem, study)
    sampler = AutoPEFTSampler(space=problem.space, n_startup_trials=6, batch_size=3, seed=0, **FAST)
    study.sampler = sampler
    got = [tuple(problem.suggest(study.ask())) for _ in range(3)]
    keys = [sampler.key(v) for v in got]
    tried = {sampler.key(params.to_vector(problem.space, t.params)) for t in study.trials[:6]}
    assert len(set(keys)) == 3 and not set(keys) & (tried | {sampler.key(running)})
    assert sampler.last_step["pending"] == [tuple(running)] and sampler.last_step["chosen"] == got
    assert len(sampler.last_step["ref_point"]) == 3
    # the trial the step served keeps its cost (one step for the batch of 3)
    stepped = [t.user_attrs["bo_step"] for t in study.trials if "bo_step" in t.user_attrs]
    assert len(stepped) == 1 and stepped[0]["observations"] == 6 and stepped[0]["fit_s"] >= 0
    assert len(sampler.last_step["nuts"]) == 3  # one GP per objective


@needs_bo
def test_same_seed_same_suggestions_and_failed_fit_falls_back(problem, monkeypatch):
    import peftlab.search.bo
    from peftlab.search.bo import AutoPEFTSampler

    monkeypatch.setattr(peftlab.search.bo, "fit_saas_nuts", _fake_nuts)
    study = _random_study(problem, 5, seed=2)
    batches = []
    for _ in range(2):
        sampler = AutoPEFTSampler(
            space=problem.space, cost=problem.cost, n_startup_trials=5, batch_size=2, seed=7, **FAST
        )
        sampler.sample_relative(study, study.ask(), params.distributions(problem.space))
        batches.append(sampler.last_step["chosen"])
    assert batches[0] == batches[1]

    def broken(model, **_):
        raise RuntimeError("cholesky failed")

    monkeypatch.setattr(peftlab.search.bo, "fit_saas_nuts", broken)
    study.sampler = AutoPEFTSampler(space=problem.space, n_startup_trials=5, seed=0)
    with pytest.warns(UserWarning, match="BO step failed"):
        assert len(problem.suggest(study.ask())) == 15  # drawn at random instead


@needs_bo
def test_s4_design_space_with_budget(problem):
    """Categorical dimensions (one-hot inputs), a real NUTS fit, the exact cost under a budget: two BO
    suggestions from one step, distinct, untried and within budget."""
    from peftlab.search.bo import AutoPEFTSampler

    s4 = load_space("s4", problem.backbone)
    dists = params.distributions(s4)

    def point(trial):
        return params.to_vector(s4, {k: trial.suggest_categorical(k, d.choices) for k, d in dists.items()})

    def cost(v):  # strategies placed, counted over the tuned groups
        c = s4.choice(v)
        return float(sum(len(c.strategies[g - 1]) for g in c.tuned))

    def values(v):
        c = s4.choice(v)
        lora = sum("lora" in c.strategies[g - 1] for g in c.tuned)
        return lora + (c.grouping == "spindle") + 0.5 * (c.allocation == "uniform"), cost(v)

    sampler = AutoPEFTSampler(space=s4, cost=cost, budget=4.0, n_startup_trials=5, batch_size=2, seed=0, **FAST)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(lambda t: values(point(t)), n_trials=5)
    t0 = time.perf_counter()
    trials = [study.ask() for _ in range(2)]
    got = [point(t) for t in trials]
    print(
        f"\nS4 BO step (1 SAAS-GP on {sampler.encoder.width} one-hot inputs, q=2): "
        f"{time.perf_counter() - t0:.1f} s; fit {sampler.last_step['fit_s']:.1f} s, "
        f"{sampler.last_step['evaluated']} candidates"
    )
    for t, v in zip(trials, got, strict=True):
        study.tell(t, values(v))
    tried = [params.to_vector(s4, t.params) for t in study.trials[:5]]
    assert got[0] != got[1] and not any(v in tried for v in got)
    assert all(cost(v) <= 4.0 for v in got)


@needs_bo
def test_padded_size_ladder():
    from peftlab.search.bo import padded_size

    sizes = [padded_size(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 65, 97, 129)]
    assert sizes == [16, 16, 24, 24, 32, 48, 48, 64, 96, 128, 192]


@needs_bo
def test_saas_model_is_botorchs_and_padding_changes_no_posterior():
    """The compiled fit's model has BoTorch's SAAS log density; padded rows add the same constant at every parameter
    value (so NUTS samples the same posterior). No NUTS run: log densities at random parameters."""
    import jax.numpy as jnp
    from botorch.models.fully_bayesian import SaasPyroModel
    from numpyro.infer.util import log_density

    from peftlab.search.bo import _saas_model

    rng = np.random.default_rng(0)
    n, d, pad = 7, 5, 16
    X, Y = torch.rand(n, d, dtype=torch.double), torch.randn(n, 1, dtype=torch.double)
    botorch_model = SaasPyroModel()
    botorch_model.set_inputs(X, Y)
    Xp, Yp, mask = np.zeros((pad, d)), np.zeros(pad), np.zeros(pad)
    Xp[:n], Yp[:n], mask[:n] = X.numpy(), Y.numpy()[:, 0], 1.0
    full = (jnp.asarray(X.numpy()), jnp.asarray(Y.numpy()[:, 0]), jnp.ones(n))
    padded = (jnp.asarray(Xp), jnp.asarray(Yp), jnp.asarray(mask))
    gaps = []
    for _ in range(5):  # well-conditioned values (JAX computes in float32)
        values = {
            "outputscale": jnp.asarray(rng.uniform(0.5, 3.0)),
            "mean": jnp.asarray(rng.normal()),
            "noise": jnp.asarray(rng.uniform(0.01, 0.5)),
            "kernel_tausq": jnp.asarray(rng.uniform(0.05, 1.0)),
            "_kernel_inv_length_sq": jnp.asarray(rng.uniform(0.1, 3.0, d)),
        }
        theirs = float(log_density(botorch_model.sample, (), {}, values)[0])
        mine = float(log_density(_saas_model, full, {}, values)[0])
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-3)
        gaps.append(float(log_density(_saas_model, padded, {}, values)[0]) - mine)
    assert max(gaps) - min(gaps) < 1e-3 and gaps[0] == pytest.approx(-(pad - n) / 2 * math.log(2 * math.pi), abs=1e-3)


def test_missing_botorch_error(monkeypatch):
    """Without BoTorch (every botorch module hidden: ``None`` in sys.modules), importing peftlab.search.bo says how to
    install it."""
    from peftlab.errors import PeftlabError

    for name in [m for m in sys.modules if m == "botorch" or m.startswith("botorch.")] or ["botorch"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "peftlab.search.bo", raising=False)
    with pytest.raises(PeftlabError) as e:
        importlib.import_module("peftlab.search.bo")
    assert str(e.value) == 'the autopeft sampler needs BoTorch: pip install "peftlab[bo]"'
