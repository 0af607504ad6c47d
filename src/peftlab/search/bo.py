"""AutoPEFT's multi-objective Bayesian optimisation as an Optuna sampler (Zhou et al. 2024, §2.2).

:class:`AutoPEFTSampler` searches any :class:`~peftlab.space.SearchSpace` for the Pareto front of
(task score, cost) the way the paper does:

1. the first ``n_startup_trials`` trials are drawn at random by an independent ``RandomSampler(seed)``
   (the paper starts from 100 random configurations);
2. then each step fits one SAAS-GP (Eriksson & Jankowiak 2021: a GP whose half-Cauchy prior on the inverse
   lengthscales switches most dimensions off, since only a few of the layer bits and sizes matter) per
   objective, with NUTS (BoTorch's ``SaasFullyBayesianSingleTaskGP`` and ``fit_fully_bayesian_model_nuts``);
   an objective whose value is known exactly and cheaply (the parameter cost, ``cost=``) is not learned
   but computed, through BoTorch's ``GenericDeterministicModel`` in a ``ModelList``;
3. the acquisition is qLogNEHVI (the log form of the paper's noisy expected hypervolume improvement,
   Daulton et al. 2021/2023), maximised by *local search* over the discrete space: from every point of the
   observed Pareto set (and a few random points) move to the best neighbour (one dimension changed: a bit
   flipped, an ordinal size ±1, a categorical value swapped for any other) until no neighbour improves; the
   best point visited is the suggestion;
4. ``batch_size = q`` suggestions are chosen jointly (sequential greedy: each chosen point joins the pending
   points of the next), queued, and handed to the next ``q`` trials while no new trial completes.

Points already evaluated (in any state) or running elsewhere are never suggested; running trials are the
acquisition's pending points (``X_pending``) so parallel workers spread out. Objectives follow
``study.directions`` (minimised ones are negated: BoTorch maximises); failed and pruned trials are not
observations.

GP inputs: every dimension is scaled to [0, 1]: an insertion bit is 0/1, an ordinal (a size on a log scale)
is its index / (n - 1) (the log scale is already what the index measures), a categorical (an S4 grouping, a
set of strategies) is one-hot, one input per value, since its values have no order and an index would make
"uniform" lie between "increasing" and "decreasing"; SAAS gives each one-hot input its own relevance.

NUTS runs on NumPyro (JAX; ``botorch[fully-bayesian]``) with BoTorch's SAAS model and NUTS, but not through
BoTorch's ``fit_fully_bayesian_model_nuts``: that closes over the data, so JAX compiled the sampler anew on every
fit (7-8 s of a 7-9 s fit, up to 22 s on a busy core), while the chain itself runs in 0.1-2 s. :func:`fit_saas_nuts`
passes the data as arguments, padded to 16, 24, 32, 48, 64, ... rows (padded rows are independent of the rest and
change no posterior), so a process compiles once per size and setting (7-15 s; two sizes in a 20-trial search).

Measured (``benchmarks/bo_cost.py``, ``benchmarks/results/bo_cost.md``; the real MiniLM SST-2 search trials, 9 GP
inputs, one busy core, medians over 3 seeds): a suggestion at n = 10 / 20 / 40 observations took 9.4 / 10.1 / 11.8 s
before (BoTorch's fit at 256/128/16: fit 7.2-9.0 s, nearly all compiling), 0.27-0.34 of a 35 s trial. With the
compiled-once fit and the defaults of then it takes 1.8 / 2.8 / 3.2 s (fit 0.2-1.0 s), with the new defaults
(64/32/4) 1.1 / 2.1 / 2.4 s (fit 0.07-0.3 s): 0.03-0.07 of a trial; the paper's 512/256/16 3.8 / 6.5 / 5.8 s (16 GP
samples double the acquisition). The acquisition (about 1,000 values) is now most of a suggestion; 0.4-1.2 s of it is
the exact cost of candidates the sampler has not priced before (6-8 ms a point; 6.6 of 8.2 s in the first step of a
fresh process). The first suggestion of a process: 21 s (30 s before), 12 s when JAX's persistent compilation cache
(``JAX_COMPILATION_CACHE_DIR``) holds the program from an earlier process. Quality (the paper's 512/256/16 as the
reference, 4 NUTS seeds): the score GP's 5-fold cross-validated Spearman and log predictive density, and the EHVI of
each setting's suggestion under the reference's acquisition, are within the reference's own seed-to-seed range, or
above it, for 256/128/16 and 64/32/4; 128/64/8 fell just below it in 3 of 6 cross-validation cells, which says how
large the seed noise is. Not measured beyond 40 observations.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from peftlab.errors import PeftlabError
from peftlab.search import params
from peftlab.search.pareto import COST_SCALES, scaled_cost
from peftlab.space import LayerSpace, SearchSpace

MISSING_BOTORCH = 'the autopeft sampler needs BoTorch: pip install "peftlab[bo]"'

try:
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.exceptions.errors import BotorchError
    from botorch.models.deterministic import GenericDeterministicModel
    from botorch.models.fully_bayesian import SaasFullyBayesianSingleTaskGP, SaasPyroModel, matern52_kernel
    from botorch.models.model import Model, ModelList
    from botorch.models.transforms.outcome import Standardize
    from botorch.models.utils.gpytorch_modules import MIN_INFERRED_NOISE_LEVEL
    from botorch.sampling.get_sampler import get_sampler
    from botorch.utils.multi_objective.hypervolume import infer_reference_point
    from botorch.utils.multi_objective.pareto import is_non_dominated
except ImportError:
    raise PeftlabError(MISSING_BOTORCH) from None

try:  # BoTorch's NUTS runs on NumPyro (its 'fully-bayesian' extra)
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.hmc import hmc
    from numpyro.infer.initialization import init_to_uniform
    from numpyro.infer.util import constrain_fn, find_valid_initial_params, potential_energy
except ImportError:
    raise PeftlabError(
        MISSING_BOTORCH + ' (its SAAS-GP fit needs JAX and NumPyro: pip install "botorch[fully-bayesian]")'
    ) from None

__all__ = ["AutoPEFTSampler", "Encoder", "fit_saas_nuts", "neighbours", "padded_size"]

_DTYPE = torch.double


# -- the SAAS-GP's NUTS fit, compiled once per size ------------------------------------------------------------
#: The latent sites of BoTorch's SAAS model, as its ``postprocess_mcmc_samples`` takes them.
_SITES = ("outputscale", "mean", "noise", "kernel_tausq", "_kernel_inv_length_sq")
#: (rows, inputs, dtype, NUTS settings) the NUTS program has been compiled for in this process.
_COMPILED: set[tuple[Any, ...]] = set()


def padded_size(n: int) -> int:
    """The rows the NUTS program is compiled for at ``n`` observations: 16, 24, 32, 48, 64, 96, ... (half-octave
    steps). JAX compiles once per shape, so a search compiles once per step of this ladder instead of once per
    fit; the padding costs at most 1.5x the rows."""
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def _saas_model(X: jax.Array, Y: jax.Array, mask: jax.Array) -> None:
    """BoTorch's SAAS model (``SaasPyroModel``: Matern-5/2 kernel, inverse squared lengthscales half-Cauchy(1) times
    a global half-Cauchy(0.1), Gamma output scale and noise, standard-normal mean) on padded data: a row with
    mask 0 is an independent standard normal observed at 0, which adds a constant to the log density and so
    changes no posterior."""
    d = X.shape[-1]
    outputscale = numpyro.sample(
        "outputscale",
        dist.Gamma(
            jnp.array(SaasPyroModel._outputscale_prior_concentration), jnp.array(SaasPyroModel._outputscale_prior_rate)
        ),
    )
    mean = numpyro.sample("mean", dist.Normal(jnp.array(0.0), jnp.array(1.0)))
    noise = MIN_INFERRED_NOISE_LEVEL + numpyro.sample("noise", dist.Gamma(jnp.array(0.9), jnp.array(10.0)))
    tausq = numpyro.sample("kernel_tausq", dist.HalfCauchy(jnp.array(0.1)))
    inv_length_sq = numpyro.sample("_kernel_inv_length_sq", dist.HalfCauchy(jnp.ones(d)))
    K = outputscale * matern52_kernel(X, 1.0 / jnp.sqrt(tausq * inv_length_sq)) + noise * jnp.eye(X.shape[0])
    K = K * (mask[:, None] * mask[None, :]) + jnp.diag(1.0 - mask)
    numpyro.sample("Y", dist.MultivariateNormal(loc=mean * mask, covariance_matrix=K), obs=Y * mask)


@partial(jax.jit, static_argnames=("warmup_steps", "num_samples", "thinning", "max_tree_depth"))
def _nuts(
    key: jax.Array,
    X: jax.Array,
    Y: jax.Array,
    mask: jax.Array,
    *,
    warmup_steps: int,
    num_samples: int,
    thinning: int,
    max_tree_depth: int,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """One NUTS chain as NumPyro's ``MCMC`` runs it for BoTorch (uniform start in [-2, 2] unconstrained, dense mass
    matrix and step size adapted during warm-up), as one program whose data are arguments: BoTorch's fit closes
    over the data, so every fit compiles anew (7-22 s on a busy core; the chain itself takes 0.1-2 s). Returns the
    kept samples (constrained), the number of divergent transitions after warm-up, and whether a valid start (finite
    density and gradient) was found."""
    args = (X, Y, mask)
    k_init, k_run = jax.random.split(key)
    d = X.shape[-1]
    prototype = {k: jnp.zeros(d if k == "_kernel_inv_length_sq" else ()) for k in _SITES}
    (z, _, _), valid = find_valid_initial_params(
        k_init, _saas_model, init_strategy=init_to_uniform, model_args=args, prototype_params=prototype
    )
    init_kernel, sample_kernel = hmc(potential_fn=partial(potential_energy, _saas_model, args, {}), algo="NUTS")
    state = init_kernel(z, warmup_steps, dense_mass=True, max_tree_depth=max_tree_depth, rng_key=k_run)

    def step(s, _):
        s = sample_kernel(s)
        return s, (s.z, s.diverging)

    _, (zs, diverging) = jax.lax.scan(step, state, None, length=warmup_steps + num_samples)
    kept = jax.tree.map(lambda a: a[warmup_steps::thinning], zs)
    samples = jax.vmap(lambda z: constrain_fn(_saas_model, args, {}, z))(kept)
    return samples, diverging[warmup_steps:].sum(), valid


def fit_saas_nuts(
    model: SaasFullyBayesianSingleTaskGP,
    *,
    warmup_steps: int = 64,
    num_samples: int = 32,
    thinning: int = 4,
    max_tree_depth: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    """BoTorch's ``fit_fully_bayesian_model_nuts`` (the same model, priors and NUTS), compiled once per
    :func:`padded_size` rather than once per fit. Loads every ``thinning``-th of ``num_samples`` samples into
    ``model``; returns the padded size, whether this fit compiled, and the divergent transitions."""
    pm = model.pyro_model
    X = pm.train_X.detach().cpu().numpy()
    y = pm.train_Y.detach().cpu().numpy().reshape(-1)
    n, d = X.shape
    size = padded_size(n)
    Xp, yp, mask = np.zeros((size, d)), np.zeros(size), np.zeros(size)
    Xp[:n], yp[:n], mask[:n] = X, y, 1.0
    settings = {
        "warmup_steps": warmup_steps,
        "num_samples": num_samples,
        "thinning": thinning,
        "max_tree_depth": max_tree_depth,
    }
    key = (size, d, bool(jax.config.jax_enable_x64), *settings.values())
    compiled = key not in _COMPILED
    # numpy float64 in, JAX's default float out: float32 unless x64 is on, as in BoTorch's fit
    data = (jnp.asarray(Xp), jnp.asarray(yp), jnp.asarray(mask))
    samples, diverging, valid = _nuts(jax.random.PRNGKey(seed), *data, **settings)
    _COMPILED.add(key)
    if not bool(valid) or not all(bool(jnp.isfinite(samples[k]).all()) for k in _SITES):
        # as NumPyro's MCMC would refuse; the sampler draws the trial at random instead
        raise RuntimeError("NUTS found no valid start for the SAAS-GP, or its samples are not finite")
    model.train()
    model.load_mcmc_samples(pm.postprocess_mcmc_samples({k: samples[k] for k in _SITES}))
    model.eval()
    return {"padded": size, "compiled": compiled, "divergences": int(diverging)}


class Encoder:
    """Points (index vectors) to GP inputs in [0, 1] and back (see the module docstring)."""

    def __init__(self, space: SearchSpace) -> None:
        self.dims = space.dimensions()
        self.sizes = np.array([len(d.choices) for d in self.dims])
        self.onehot = np.array([d.type == "categorical" for d in self.dims])
        self.offsets = []
        width = 0
        for d, n in zip(self.dims, self.sizes, strict=True):
            self.offsets.append(width)
            width += int(n) if d.type == "categorical" else 1
        self.width = width

    def encode(self, vectors: np.ndarray | Sequence[Sequence[int]]) -> torch.Tensor:
        v = np.asarray(vectors, dtype=np.int64).reshape(-1, len(self.dims))
        out = np.zeros((len(v), self.width))
        for j, (n, hot, o) in enumerate(zip(self.sizes, self.onehot, self.offsets, strict=True)):
            if hot:
                out[np.arange(len(v)), o + v[:, j]] = 1.0
            elif n > 1:
                out[:, o] = v[:, j] / (n - 1)
        return torch.from_numpy(out).to(_DTYPE)

    def decode(self, X: torch.Tensor) -> np.ndarray:
        x = X.detach().reshape(-1, self.width).cpu().numpy()
        out = np.zeros((len(x), len(self.dims)), dtype=np.int64)
        for j, (n, hot, o) in enumerate(zip(self.sizes, self.onehot, self.offsets, strict=True)):
            out[:, j] = np.argmax(x[:, o : o + n], axis=1) if hot else np.rint(x[:, o] * (n - 1))
        return out


def neighbours(vector: Sequence[int], space_or_dims: SearchSpace | Sequence[Any]) -> np.ndarray:
    """The points one move away: a bit flipped, an ordinal index ±1, a categorical value replaced by any other."""
    dims = space_or_dims.dimensions() if isinstance(space_or_dims, SearchSpace) else space_or_dims
    v = np.asarray(vector, dtype=np.int64)
    out = []
    for j, d in enumerate(dims):
        n = len(d.choices)
        if d.type == "bool":
            values = [1 - v[j]] if n == 2 else [k for k in range(n) if k != v[j]]
        elif d.type == "ordinal":
            values = [k for k in (v[j] - 1, v[j] + 1) if 0 <= k < n]
        else:
            values = [k for k in range(n) if k != v[j]]
        for k in values:
            w = v.copy()
            w[j] = k
            out.append(w)
    return np.array(out, dtype=np.int64).reshape(-1, len(dims))


class AutoPEFTSampler(BaseSampler):
    """AutoPEFT's multi-objective BO (SAAS-GP + qLogNEHVI + local search) over a search space.

    Args:
        space: the search space; trials' parameters are its dimensions as :func:`peftlab.search.params.distributions`
            names them (other parameters the objective asks for are drawn at random).
        cost: the exact value of the 2nd objective at a point (``cost(vector) -> float`` in the study's units,
            e.g. stored parameters as % of the backbone). Given, it is computed rather than learned: no GP
            error where the answer is known, and local search can use ``budget``. ``None``: every objective
            gets a SAAS-GP.
        n_startup_trials: random trials before the first BO step (the paper uses 100 with 100 BO steps; 10 is
            Optuna's usual start for short studies). Counted in completed trials.
        batch_size: suggestions chosen jointly per fit (q). Larger q: fewer fits (each costs seconds) and
            parallel workers served from one fit, at some loss of sample efficiency.
        seed: seeds the startup ``RandomSampler``, NUTS, the QMC samples and the random local-search starts;
            the same seed and the same trials give the same suggestions.
        warmup_steps, num_samples, thinning: NUTS settings. The paper keeps the SAAS paper's (512 warm-up
            steps, 256 samples, thinning 16: 16 GP samples). The defaults (64, 32, 4: 8 GP samples; 256, 128, 16
            before) fit 3-4x faster and halve the acquisition's cost (one term per GP sample) against the paper's,
            with held-out quality and suggestions within the paper setting's own seed-to-seed spread on the real
            MiniLM trials (n <= 40; see the module docstring).
        max_tree_depth: NUTS tree depth (BoTorch's default).
        ref_point: hypervolume reference point in the study's objective space (score, cost[, ...]), so that
            points the study gives no credit (e.g. scores at the constant prediction's) improve nothing; a
            ``None`` value (or ``ref_point=None``: every value) is BoTorch's ``infer_reference_point`` on the
            observed Pareto front (its nadir moved back by 10% of each objective's range), recomputed every step.
        cost_scale: the cost axis of the hypervolume the acquisition improves: "linear", or "log" (log10 of the
            cost, reference point's included; every decade of cost weighs the same, see
            :mod:`peftlab.search.pareto`). The GP of the score is the same either way.
        budget: with ``cost``, points whose cost exceeds it are never suggested (they are left out of local
            search); trials the random start draws are not filtered.
        mc_samples: QMC samples of the joint posterior per acquisition value (BoTorch uses 128; with several
            GP samples each, fewer suffice).
        n_random_starts: random local-search starts besides the Pareto set, against a front of few points.
        max_pareto_starts: at most this many Pareto points start a local search (evenly spread over the front).
        max_local_steps: a local search stops after this many moves even if it still improves.
        acq_batch: candidates per acquisition call (memory vs. overhead).
    """

    def __init__(
        self,
        *,
        space: SearchSpace,
        cost: Callable[[list[int]], float] | None = None,
        n_startup_trials: int = 10,
        batch_size: int = 1,
        seed: int | None = None,
        warmup_steps: int = 64,
        num_samples: int = 32,
        thinning: int = 4,
        max_tree_depth: int = 6,
        ref_point: Sequence[float | None] | None = None,
        cost_scale: str = "linear",
        budget: float | None = None,
        mc_samples: int = 32,
        n_random_starts: int = 5,
        max_pareto_starts: int = 20,
        max_local_steps: int = 30,
        acq_batch: int = 256,
    ) -> None:
        if batch_size < 1:
            raise PeftlabError(f"batch_size must be at least 1, got {batch_size}")
        if n_startup_trials < 1:
            raise PeftlabError(f"n_startup_trials must be at least 1 (the GP needs data), got {n_startup_trials}")
        if budget is not None and cost is None:
            raise PeftlabError("budget needs cost: the exact cost of a point is what it is compared with")
        if cost_scale not in COST_SCALES:
            raise PeftlabError(f"unknown cost scale '{cost_scale}'; one of {', '.join(COST_SCALES)}")
        self.cost_scale = cost_scale
        self.space = space
        self.cost = cost
        self.n_startup_trials = n_startup_trials
        self.batch_size = batch_size
        self.seed = seed
        self.warmup_steps, self.num_samples, self.thinning = warmup_steps, num_samples, thinning
        self.max_tree_depth = max_tree_depth
        self.ref_point = None if ref_point is None else [None if r is None else float(r) for r in ref_point]
        self.budget = budget
        self.mc_samples = mc_samples
        self.n_random_starts = n_random_starts
        self.max_pareto_starts = max_pareto_starts
        self.max_local_steps = max_local_steps
        self.acq_batch = acq_batch
        self.encoder = Encoder(space)
        self._dims = space.dimensions()
        self._distributions = params.distributions(space)
        self._random = RandomSampler(seed=seed)
        self._base_seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**31)
        self._queue: list[tuple[int, ...]] = []
        self._queue_key: tuple[Any, ...] | None = None
        self._cost_cache: dict[tuple[int, ...], float] = {}
        self._lock = threading.RLock()
        #: what the last BO step did (times in seconds, its NUTS fits, candidates evaluated, pending points): for
        #: logs and tests; the trial it served also keeps its times (user attribute ``bo_step``)
        self.last_step: dict[str, Any] = {}
        self._fits: list[dict[str, Any]] = []

    # -- Optuna interface --------------------------------------------------------------------------------
    def reseed_rng(self) -> None:
        self._random.reseed_rng()
        self._base_seed = int(np.random.SeedSequence().entropy % 2**31)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The space's Optuna distributions; a trial whose parameters disagree with them is an error."""
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                continue
            for name, dist in self._distributions.items():
                if name in t.distributions and t.distributions[name] != dist:
                    raise PeftlabError(
                        f"trial {t.number}: parameter '{name}' is {t.distributions[name]}, but "
                        f"this sampler's space makes it {dist}: the study was made in another space"
                    )
            missing = [n for n in self._distributions if n not in t.params]
            if t.state == TrialState.COMPLETE and missing:
                raise PeftlabError(
                    f"trial {t.number} has no parameter '{missing[0]}': it was not made in this "
                    f"sampler's space (dimensions: {', '.join(self._distributions)})"
                )
        return dict(self._distributions)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._random.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._random.after_trial(study, trial, state, values)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        with self._lock:
            return self._sample(study, trial)

    # -- the BO step ----------------------------------------------------------------------------------------
    def _sample(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        directions = study.directions
        if len(directions) < 2:
            raise PeftlabError(
                "the autopeft sampler is multi-objective: make the study with 2 or 3 directions (score, cost[, ...])"
            )
        if self.ref_point is not None and len(self.ref_point) != len(directions):
            raise PeftlabError(
                f"ref_point has {len(self.ref_point)} values but the study has {len(directions)} "
                "objectives: give one per objective, in the study's own units and order"
            )
        completed, blocked, pending = self._observations(study, trial)
        if len(completed) < self.n_startup_trials:
            return {}
        key = (study.study_name, *(t.number for t, _ in completed))
        if key == self._queue_key:
            while self._queue:
                v = self._queue.pop(0)
                if self.key(v) not in blocked:
                    return params.to_params(self.space, list(v))
        self.last_step = {}
        try:
            batch = self._step(directions, completed, blocked, pending)
        except PeftlabError:
            raise
        except (RuntimeError, ValueError, ArithmeticError, BotorchError) as e:  # a numerical failure of fit or acqf
            warnings.warn(
                f"the autopeft sampler's BO step failed ({type(e).__name__}: {e}); drawing this trial at random",
                stacklevel=3,
            )
            return {}
        if not batch:
            warnings.warn("the autopeft sampler found no untried point: drawing one at random", stacklevel=3)
            return {}
        self._queue, self._queue_key = batch[1:], key
        if self.last_step:
            self._record(study, trial)
        return params.to_params(self.space, list(batch[0]))

    def _record(self, study: Study, trial: FrozenTrial) -> None:
        """The step's cost on the trial it served, so that a study tells what its suggestions cost."""
        step = self.last_step
        study._storage.set_trial_user_attr(
            trial._trial_id,
            "bo_step",
            {
                "observations": step["observations"],
                "fit_s": round(step["fit_s"], 3),
                "acquisition_s": round(step["acquisition_s"], 3),
                "compiled": any(f.get("compiled", False) for f in step["nuts"]),
            },
        )

    def _observations(self, study: Study, trial: FrozenTrial):
        """(completed trials with their points, every point tried or running, the running points)."""
        completed, blocked, pending = [], set(), []
        for t in study.get_trials(deepcopy=False):
            if t.number == trial.number or any(n not in t.params for n in self._distributions):
                continue
            v = tuple(params.to_vector(self.space, t.params))
            if t.state == TrialState.COMPLETE:
                if t.values is not None and all(math.isfinite(x) for x in t.values):
                    completed.append((t, v))
            elif t.state == TrialState.RUNNING:
                pending.append(v)
            elif t.state == TrialState.WAITING:
                continue
            blocked.add(self.key(v))
        return completed, blocked, pending

    def key(self, v: Sequence[int]) -> tuple[int, ...]:
        """The point's identity for "already tried": in a layer space every point that places no module (no
        layer on, or every module off) builds the same empty spec, so they are one point."""
        v = tuple(int(k) for k in v)
        if isinstance(self.space, LayerSpace):
            nb = len(self.space.layers)
            on = any(m.choices[k] for m, k in zip(self.space.modules, v[nb:], strict=True))
            if not on or not any(v[:nb]):
                return (0,) * len(v)
        return v

    def _cost_of(self, v: tuple[int, ...]) -> float:
        c = self._cost_cache.get(v)
        if c is None:
            c = self._cost_cache[v] = float(self.cost(list(v)))
        return c

    def _allowed(self, v: tuple[int, ...]) -> bool:
        return self.budget is None or self._cost_of(v) <= self.budget

    def _seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([self._base_seed, *parts]).generate_state(1)[0] % 2**31)

    def _step(self, directions, completed, blocked, pending) -> list[tuple[int, ...]]:
        t0 = time.perf_counter()
        n = len(completed)
        signs = torch.tensor([1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions], dtype=_DTYPE)
        vectors = np.array([v for _, v in completed], dtype=np.int64)
        X = self.encoder.encode(vectors)
        Y = torch.tensor([t.values for t, _ in completed], dtype=_DTYPE) * signs
        if self.cost is not None:
            costs = [self._cost_of(tuple(v)) for v in vectors]
        else:
            costs = [t.values[1] for t, _ in completed]
        Y[:, 1] = signs[1] * torch.tensor([scaled_cost(c, self.cost_scale) for c in costs], dtype=_DTYPE)
        model = self._model(X, Y, signs, n)
        t_fit = time.perf_counter() - t0
        ref = infer_reference_point(Y[is_non_dominated(Y)])
        if self.ref_point is not None:
            axis = [r if r is None or i != 1 else scaled_cost(r, self.cost_scale) for i, r in enumerate(self.ref_point)]
            given = torch.tensor([math.nan if r is None else r for r in axis], dtype=_DTYPE) * signs
            ref = torch.where(given.isnan(), ref, given)
        front = vectors[is_non_dominated(Y).numpy()]
        rng = np.random.default_rng(self._seed(n, 1))
        chosen: list[tuple[int, ...]] = []
        evaluated = 0
        for j in range(self.batch_size):
            X_pending = self.encoder.encode(pending + chosen) if pending or chosen else None
            acqf = self.acquisition(model, X, ref, X_pending, self._seed(n, 2, j))
            taken = blocked | {self.key(c) for c in chosen}
            best, count = self.local_search(acqf, self._starts(front, rng, taken), taken)
            evaluated += count
            if best is None:
                best = self._random_point(rng, taken)
            if best is None:
                break
            chosen.append(best)
        total = time.perf_counter() - t0
        self.last_step = {
            "observations": n,
            "fit_s": t_fit,
            "acquisition_s": total - t_fit,
            "total_s": total,
            "nuts": self._fits,
            "evaluated": evaluated,
            "pending": list(pending),
            "chosen": list(chosen),
            "ref_point": (ref * signs).tolist(),
        }
        return chosen

    def acquisition(
        self, model: Model, X: torch.Tensor, ref: torch.Tensor, X_pending: torch.Tensor | None, seed: int
    ) -> qLogNoisyExpectedHypervolumeImprovement:
        """qLogNEHVI of ``model`` (objectives maximised) over the observed inputs ``X`` from ``ref``, with ``seed``
        fixing its QMC samples (so that values of different points compare)."""
        return qLogNoisyExpectedHypervolumeImprovement(
            model=model,
            ref_point=ref.tolist(),
            X_baseline=X,
            X_pending=X_pending,
            prune_baseline=True,
            sampler=get_sampler(model.posterior(X[:1]), torch.Size([self.mc_samples]), seed=seed),
        )

    def _model(self, X: torch.Tensor, Y: torch.Tensor, signs: torch.Tensor, n: int) -> Model:
        models: list[Model] = []
        self._fits = []
        for i in range(Y.shape[1]):
            if self.cost is not None and i == 1:
                sign = float(signs[1])
                models.append(GenericDeterministicModel(lambda x, s=sign: self._cost_tensor(x) * s, num_outputs=1))
                continue
            gp = SaasFullyBayesianSingleTaskGP(X, Y[:, i : i + 1], outcome_transform=Standardize(m=1))
            t0 = time.perf_counter()
            info = self._fit_gp(gp, self._seed(n, 0, i))
            self._fits.append({"objective": i, "seconds": time.perf_counter() - t0, **(info or {})})
            models.append(gp)
        return ModelList(*models)

    def _fit_gp(self, gp: SaasFullyBayesianSingleTaskGP, seed: int) -> dict[str, Any] | None:
        """NUTS with this sampler's settings (:func:`fit_saas_nuts`); its report, if any."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit_saas_nuts(
                gp,
                max_tree_depth=self.max_tree_depth,
                warmup_steps=self.warmup_steps,
                num_samples=self.num_samples,
                thinning=self.thinning,
                seed=seed,
            )

    def _cost_tensor(self, X: torch.Tensor) -> torch.Tensor:
        vectors = self.encoder.decode(X)
        values = [scaled_cost(self._cost_of(tuple(int(k) for k in v)), self.cost_scale) for v in vectors]
        return torch.tensor(values, dtype=X.dtype).reshape(*X.shape[:-1], 1)

    # -- acquisition optimisation ------------------------------------------------------------------------------
    def _random_point(
        self, rng: np.random.Generator, blocked: set[tuple[int, ...]], tries: int = 1000
    ) -> tuple[int, ...] | None:
        for _ in range(tries):
            v = tuple(int(rng.integers(len(d.choices))) for d in self._dims)
            if self.key(v) not in blocked and self._allowed(v):
                return v
        return None

    def _starts(
        self, front: np.ndarray, rng: np.random.Generator, blocked: set[tuple[int, ...]]
    ) -> list[tuple[int, ...]]:
        pareto = list(dict.fromkeys(tuple(int(k) for k in v) for v in front))
        if len(pareto) > self.max_pareto_starts:
            keep = np.linspace(0, len(pareto) - 1, self.max_pareto_starts).round().astype(int)
            pareto = [pareto[k] for k in keep]
        randoms = [self._random_point(rng, blocked, tries=100) for _ in range(self.n_random_starts)]
        return list(dict.fromkeys(pareto + [v for v in randoms if v is not None]))

    def local_search(
        self,
        acqf: Callable[[torch.Tensor], torch.Tensor],
        starts: Sequence[Sequence[int]],
        blocked: set[tuple[int, ...]],
    ) -> tuple[tuple[int, ...] | None, int]:
        """Hill-climb the acquisition from every start at once: each moves to its best neighbour that is neither
        blocked nor over budget while that improves. Returns the best point visited (``None`` if none was
        allowed) and the number of acquisition values computed. ``acqf`` maps ``b x 1 x width`` to ``b``."""
        values: dict[tuple[int, ...], float] = {}

        def evaluate(points: list[tuple[int, ...]]) -> None:
            new = [p for p in dict.fromkeys(points) if p not in values]
            for k in range(0, len(new), self.acq_batch):
                chunk = new[k : k + self.acq_batch]
                with torch.no_grad():
                    out = acqf(self.encoder.encode(chunk).unsqueeze(-2)).reshape(-1)
                values.update(zip(chunk, out.tolist(), strict=True))

        ok = [tuple(int(k) for k in s) for s in starts]
        evaluate([s for s in ok if self.key(s) not in blocked and self._allowed(s)])
        current = {s: values.get(s, -math.inf) for s in ok}
        for _ in range(self.max_local_steps):
            moves = {}
            for s in current:
                moves[s] = [
                    c
                    for c in (tuple(int(k) for k in w) for w in neighbours(s, self._dims))
                    if self.key(c) not in blocked and self._allowed(c)
                ]
            evaluate([c for cs in moves.values() for c in cs])
            nxt = {}
            for s, val in current.items():
                if not moves[s]:
                    continue
                best = max(moves[s], key=lambda c: values[c])
                if values[best] > val and best not in nxt:
                    nxt[best] = values[best]
            if not nxt:
                break
            current = nxt
        if not values:
            return None, 0
        best = max(values, key=lambda c: values[c])
        return best, len(values)
