"""Multi-objective configuration search on Optuna: a study's trials are points of a search space.

A trial's parameters are the space's dimensions by name, as :mod:`peftlab.search.params` translates them.

A trial decodes its point into a spec, counts the spec's stored parameters exactly (meta device,
milliseconds), and, unless that breaks the parameter budget, trains it with :func:`peftlab.train.train` at
the search's (low) fidelity. Its values are the best *dev* score and the stored parameters as % of the
backbone; optionally peak memory (CUDA) or training latency. Trials do not score the test split (unless the
training settings say ``score_test``): after the trials the Pareto set is scored on it
(:mod:`peftlab.search.holdout`), so test never chooses. A trial whose first evaluation shows it has not started
to learn stops there (``stop_hopeless``, on by default in searches): it is finished, with status "hopeless", its
reason, and its dev score (the constant prediction's), which the sampler sees as that point's result.
Over-budget points are pruned without training; runs that diverge or raise are recorded as failed with
their reason, and the search goes on. Everything lives in the Optuna storage (an SQLite file by default,
PostgreSQL for workers on several machines): the study's user attributes hold the search's definition, so
a worker that joins or a search that resumes after being killed continues the same study, and finished
trials are never run again. Stale trials of killed workers are detected by Optuna's heartbeat and retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from peftlab import optional
from peftlab.backbone.zoo import load_model
from peftlab.core.spec import SpecError
from peftlab.errors import PeftlabError, changes
from peftlab.search.holdout import score_front, trial_test
from peftlab.search.params import distributions, suggest, to_vector
from peftlab.search.pareto import COST_SCALES, pareto_indices
from peftlab.search.storage import hide_password, open_storage, storage_url
from peftlab.space import Backbone, SearchSpace, load_space
from peftlab.train import RUN_FIELDS, TrainConfig, train
from peftlab.train.baseline import constant_scores
from peftlab.train.data import task_splits, uses_chat_template
from peftlab.train.evaluation import scoring_backbone
from peftlab.train.generation import response_loss
from peftlab.train.tasks import TaskInfo, get_task
from peftlab.train.warm import WarmStart

#: Objectives a search can have and their directions; ``score`` and ``stored`` are always the first two.
OBJECTIVES = {"score": "maximize", "stored": "minimize", "memory": "minimize", "latency": "minimize"}
SAMPLERS = ("random", "tpe", "nsga2", "gp", "autopeft")
#: What the autopeft sampler imports: BoTorch, and the NumPyro (on JAX) its SAAS-GP fit runs on.
AUTOPEFT_NEEDS = ("botorch", "jax", "numpyro")
#: The TrainConfig fields that set a trial's training budget.
BUDGET_FIELDS = ("max_steps", "fraction", "epochs")
#: The trials' budget when a search gives none: AutoPEFT's low fidelity, 5% of a 20-epoch run (1 epoch).
LOW_FIDELITY = {"epochs": 20.0, "fraction": 0.05}
#: The autopeft sampler's NUTS settings by default (its own, measured in benchmarks/results/bo_cost.md; Eriksson &
#: Jankowiak's are 512, 256, 16).
NUTS_DEFAULTS = {"warmup_steps": 64, "num_samples": 32, "thinning": 4}
#: The NUTS settings of autopeft studies made before the settings were stored in a study (the defaults then).
NUTS_UNSTORED = {"warmup_steps": 256, "num_samples": 128, "thinning": 16}
#: Trial statuses that count as finished (a killed worker's trial has none and is retried).
FINISHED = ("completed", "early-stopped", "hopeless", "over-budget", "diverged", "error")
#: Training settings of a search's trials unless it gives its own: dev alone chooses (test is scored for the
#: Pareto set at the end), and trials that have not started to learn at their first evaluation stop there.
SEARCH_TRAINING = {"score_test": False, "stop_hopeless": True}
_SEARCH_ATTR = "peftlab_search"
#: The file in a search's output folder that names the study (and storage) its trial runs belong to.
OWNER_FILE = "study.json"


# -- cost ---------------------------------------------------------------------------------------------------
class CostModel(Backbone):
    """The search's costs (:class:`~peftlab.space.Backbone` counts them): the search's model on the meta device,
    with its task's head, whose parameters every trial stores."""

    def __init__(self, model: str, num_labels: int = 2) -> None:
        super().__init__(load_model(model, num_labels=num_labels, meta=True))

    @classmethod
    def for_search(cls, config: SearchConfig) -> CostModel:
        """Counts on the search's model with its task's head (one output for regression tasks; user data
        files, whose labels are read only when training, are counted with two)."""
        return cls(config.model, num_labels=2 if config.train.get("train_file") else get_task(config.task).num_labels)


# -- configuration ------------------------------------------------------------------------------------------
@dataclass
class SearchConfig:
    """A search: what is searched (model, task, space, objectives, budget, training) and how (sampler,
    trials, storage). ``train`` holds :class:`~peftlab.train.TrainConfig` fields (the trials' fidelity).
    :func:`search_defaults` fills in what is left open: the sampler (``None``: autopeft when BoTorch is
    installed, else tpe) and a training budget (none of ``BUDGET_FIELDS``: ``LOW_FIDELITY``)."""

    model: str
    task: str
    space: str = "autopeft"
    sampler: str | None = None
    trials: int = 20
    study: str = "peftlab"
    storage: str | None = None
    output: str = "search"
    objectives: tuple[str, ...] = ("score", "stored")
    budget: float | None = None
    ref_point: tuple[float, float] | None = None
    #: the cost axis of hypervolume, the report's and the autopeft sampler's: "linear" or "log" (see pareto)
    cost_scale: str = "linear"
    startup_trials: int = 8
    batch_size: int = 1
    seed: int = 0
    heartbeat: int = 10
    train: dict[str, Any] = field(default_factory=dict)
    #: the autopeft sampler's NUTS chain per GP fit: warm-up steps, samples drawn, and every how many kept
    nuts_warmup: int = NUTS_DEFAULTS["warmup_steps"]
    nuts_samples: int = NUTS_DEFAULTS["num_samples"]
    nuts_thinning: int = NUTS_DEFAULTS["thinning"]

    def __post_init__(self) -> None:
        self.train = SEARCH_TRAINING | self.train

    def check(self) -> None:
        # None: chosen by search_defaults; s4-refine: set by peftlab.search.refine, not a sampler
        if self.sampler not in (*SAMPLERS, "s4-refine", None):
            raise PeftlabError(f"unknown sampler '{self.sampler}'; samplers: {', '.join(SAMPLERS)}")
        if (
            tuple(self.objectives[:2]) != ("score", "stored")
            or len(set(self.objectives)) != len(self.objectives)
            or any(o not in OBJECTIVES for o in self.objectives)
        ):
            raise PeftlabError(
                f"objectives are score,stored plus optionally memory or latency; got {','.join(self.objectives)}"
            )
        if self.cost_scale not in COST_SCALES:
            raise PeftlabError(f"unknown cost scale '{self.cost_scale}'; one of {', '.join(COST_SCALES)}")
        if self.ref_point is not None and self.cost_scale == "log" and self.ref_point[1] <= 0:
            raise PeftlabError(f"a log cost axis needs a reference cost above 0, got {self.ref_point[1]:g}")
        if "memory" in self.objectives and not torch.cuda.is_available():
            raise PeftlabError(
                "the memory objective needs a CUDA GPU: on the CPU the peak RSS belongs to the "
                "whole worker process, not to one trial"
            )
        for name in (
            "trials",
            "startup_trials",
            "batch_size",
            "heartbeat",
            "nuts_warmup",
            "nuts_samples",
            "nuts_thinning",
        ):
            if getattr(self, name) < 1:
                raise PeftlabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nuts_thinning > self.nuts_samples:
            raise PeftlabError(
                f"nuts_thinning ({self.nuts_thinning}) keeps every n-th of nuts_samples ({self.nuts_samples}): "
                "it must not exceed nuts_samples, or no sample is kept"
            )
        if self.budget is not None and not 0 < self.budget <= 100:
            raise PeftlabError(f"budget is a % of the backbone's parameters in (0, 100], got {self.budget}")
        known = {f.name for f in fields(TrainConfig)} - set(RUN_FIELDS)
        unknown = sorted(set(self.train) - known)
        if unknown:
            raise PeftlabError(f"unknown training settings {unknown}; allowed: {', '.join(sorted(known))}")
        TrainConfig(model=self.model, task=self.task, **self.train).check()

    @property
    def nuts(self) -> dict[str, int]:
        """The NUTS settings as the autopeft sampler takes them."""
        return {"warmup_steps": self.nuts_warmup, "num_samples": self.nuts_samples, "thinning": self.nuts_thinning}

    @property
    def storage_url(self) -> str:
        if self.storage:
            return storage_url(self.storage, must_exist=False)
        return self._own_storage_url

    @property
    def _own_storage_url(self) -> str:
        return f"sqlite:///{Path(self.output).resolve() / 'study.db'}"

    @property
    def owner(self) -> dict[str, str | None]:
        """Whose trial runs the output folder holds: the study, and its storage unless that is the folder's own
        study.db (so a moved folder stays its study's; a password is not written down)."""
        url = self.storage_url
        return {"study": self.study, "storage": None if url == self._own_storage_url else hide_password(url)}

    def definition(self, space: SearchSpace) -> dict[str, Any]:
        """What a study is (stored in it): joining workers and resumed searches must agree on all of it."""
        return {
            "model": self.model,
            "task": self.task,
            "space": space.to_dict(),
            "space_name": self.space,
            "objectives": list(self.objectives),
            "budget": self.budget,
            "train": self.train,
            "ref_point": list(self.ref_point) if self.ref_point else None,
            "cost_scale": self.cost_scale,
            "sampler": self.sampler,
            "nuts": self.nuts if self.sampler == "autopeft" else None,
        }


def search_defaults(config: SearchConfig) -> SearchConfig:
    """``config`` with the paper's method where it leaves the choice open: the autopeft sampler (tpe, said in one
    line on stderr, when BoTorch is not installed) and AutoPEFT's low-fidelity budget. Budget fields set to
    ``None`` count as not given."""
    sampler = config.sampler
    if sampler is None:
        sampler = "autopeft" if all(optional.available(m) for m in AUTOPEFT_NEEDS) else "tpe"
        if sampler == "tpe":
            print(
                "peftlab search: BoTorch (with JAX and NumPyro) is not installed, so the tpe sampler is used instead "
                'of autopeft (pip install "peftlab[bo]")',
                file=sys.stderr,
                flush=True,
            )
    train = {k: v for k, v in config.train.items() if k not in BUDGET_FIELDS or v is not None}
    if not any(k in train for k in BUDGET_FIELDS):
        train |= LOW_FIDELITY
    return dataclasses.replace(config, sampler=sampler, train=train)


def load_study(storage: str, study: str) -> tuple[optuna.Study, dict[str, Any]]:
    """An existing peftlab study and its definition."""
    store = open_storage(storage_url(storage))
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if study not in names:
        raise PeftlabError(f"no study '{study}' in {storage}; studies there: {', '.join(names) or 'none'}")
    s = optuna.load_study(study_name=study, storage=store)
    return s, definition_of(s)


def definition_of(study: optuna.Study) -> dict[str, Any]:
    """The search definition a peftlab study holds."""
    if _SEARCH_ATTR not in study.user_attrs:
        raise PeftlabError(f"study '{study.study_name}' was not made by peftlab search (it has no search definition)")
    return study.user_attrs[_SEARCH_ATTR]


# -- samplers -----------------------------------------------------------------------------------------------
def make_sampler(
    name: str,
    space: SearchSpace,
    seed: int,
    startup: int,
    cost: Callable[[list[int]], float],
    budget: float | None = None,
    batch_size: int = 1,
    ref_point: Sequence[float | None] | None = None,
    nuts: Mapping[str, int] | None = None,
    cost_scale: str = "linear",
) -> optuna.samplers.BaseSampler:
    """A sampler by name: random, tpe, nsga2, gp (Optuna's), autopeft (BoTorch SAAS-GP + qLogNEHVI, whose
    hypervolume is measured from ``ref_point``, one value per objective, ``None`` for one it infers, with the cost
    on ``cost_scale``, and whose GP fits take the ``nuts`` settings). Optuna's samplers see the stored values:
    NSGA-II ranks by dominance, which a monotone rescaling of the cost does not change."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, startup))
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "autopeft":
        bo = optional.require("peftlab.search.bo", "the autopeft sampler")  # BoTorch
        return bo.AutoPEFTSampler(
            space=space,
            cost=cost,
            n_startup_trials=startup,
            batch_size=batch_size,
            seed=seed,
            budget=budget,
            ref_point=ref_point,
            cost_scale=cost_scale,
            **(nuts or NUTS_DEFAULTS),
        )
    raise PeftlabError(f"unknown sampler '{name}'; samplers: {', '.join(SAMPLERS)}")


# -- trials -------------------------------------------------------------------------------------------------
class TrialFailed(Exception):
    """A trial that ended without values (diverged, or training raised); Optuna records it as failed."""


def _status(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get("status")


def counted(study: optuna.Study) -> tuple[int, int]:
    """(finished, in flight): finished trials have a status; running ones are in flight. Waiting trials (points
    queued again after their worker died) are not: they are work for whichever worker asks next."""
    trials = study.get_trials(deepcopy=False)
    done = sum(1 for t in trials if t.state.is_finished() and _status(t) in FINISHED)
    flight = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return done, flight


#: a trial's user attribute that overrides the search's training seed (set when the trial is enqueued)
TRAIN_SEED_ATTR = "train_seed"


class Objective:
    """One trial: decode, count, (maybe) train, report. Identical points reuse the first result. The worker's
    backbone and token ids are kept between its trials (:class:`~peftlab.train.warm.WarmStart`), so a trial's time
    goes to training: its ``timings`` attribute says where the rest went."""

    def __init__(self, config: SearchConfig, space: SearchSpace, cost: CostModel) -> None:
        self.config, self.space, self.cost = config, space, cost
        self.dists = distributions(space)
        self.warm = WarmStart()

    def __call__(self, trial: optuna.Trial) -> list[float]:
        params = suggest(trial, self.dists)
        # Optuna starts a trial's clock before the sampler chooses its point: what passed since is the suggestion
        trial.set_user_attr("suggest_s", (datetime.now() - trial.datetime_start).total_seconds())
        try:
            return self._run(trial, params)
        except (TrialFailed, optuna.TrialPruned):
            raise
        except Exception as e:  # a bug or a resource error must not end the search: record it and go on
            trial.set_user_attr("status", "error")
            trial.set_user_attr("message", f"{type(e).__name__}: {e}")
            raise

    def _run(self, trial: optuna.Trial, params: dict[str, Any]) -> list[float]:
        start = time.perf_counter()
        spec = self.space.decode(to_vector(self.space, params))
        pct = self.cost.percents(spec)
        trial.set_user_attr("spec", spec.to_dict())
        trial.set_user_attr("stored_percent", pct["stored"])
        trial.set_user_attr("trainable_percent", pct["trainable"])
        budget = self.config.budget
        if budget is not None and pct["stored"] > budget:
            trial.set_user_attr("status", "over-budget")
            raise optuna.TrialPruned(f"stored {pct['stored']:.3f}% > budget {budget}%")
        same = _same_point(trial, params)
        if same is not None:  # training is deterministic for a seed: the same point gives the same result
            for k in ("run", "wall_time_s", "steps", "dev", "test", "status", "message"):
                trial.set_user_attr(k, same.user_attrs.get(k))
            trial.set_user_attr("copied_from", same.number)
            return list(same.values)
        out = Path(self.config.output) / "trials" / f"{trial.number:05d}"
        seed = trial.user_attrs.get(TRAIN_SEED_ATTR)  # a trial made to repeat a point with another seed (S4's samples)
        config = TrainConfig(
            model=self.config.model,
            task=self.config.task,
            output=str(out),
            progress=False,
            **(self.config.train | ({} if seed is None else {"seed": seed})),
        )
        try:
            record = train(spec, config, warm=self.warm)
        except PeftlabError as e:
            trial.set_user_attr("status", "error")
            trial.set_user_attr("message", str(e))
            raise TrialFailed(str(e)) from None
        trial.set_user_attr("run", str(out))
        trial.set_user_attr("backbone", self.warm.last)
        if record.cache is not None:  # --cache-frozen: the layer its steps started at, hits and misses
            trial.set_user_attr("cache", record.cache)
        total = time.perf_counter() - start
        trial.set_user_attr(
            "timings", {**record.timings, "other_s": total - sum(record.timings.values()), "total_s": total}
        )
        trial.set_user_attr("wall_time_s", record.wall_time_s)
        trial.set_user_attr("steps", record.steps)
        if record.status == "diverged":
            trial.set_user_attr("status", "diverged")
            trial.set_user_attr("message", record.message)
            raise TrialFailed(record.message or "diverged")
        trial.set_user_attr("dev", record.best)
        trial.set_user_attr("test", record.test)
        trial.set_user_attr("status", record.status)
        if record.message:  # a hopeless run's reason
            trial.set_user_attr("message", record.message)
        values = [float(record.best["score"]), pct["stored"]]
        if "memory" in self.config.objectives:
            values.append(record.peak_memory_bytes / 2**20)
        if "latency" in self.config.objectives:  # ms of training per example
            examples = record.steps * config.batch_size * config.grad_accum
            values.append(1000 * record.wall_time_s / max(1, examples))
        return values


def _same_point(trial: optuna.Trial, params: Mapping[str, Any]) -> FrozenTrial | None:
    """A finished trial of the same point trained with the same seed."""
    seed = trial.user_attrs.get(TRAIN_SEED_ATTR)
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == params and t.user_attrs.get(TRAIN_SEED_ATTR) == seed:
            return t
    return None


# -- running ------------------------------------------------------------------------------------------------
def create_study(config: SearchConfig) -> tuple[optuna.Study, SearchSpace]:
    """Create the study, or join the existing one after checking it is the same search."""
    config.check()
    check_output(config)
    space = load_space(config.space, config.model)
    if config.storage is None:
        Path(config.output).mkdir(parents=True, exist_ok=True)
    storage = open_storage(config.storage_url)
    directions = [OBJECTIVES[o] for o in config.objectives]
    study = optuna.create_study(study_name=config.study, storage=storage, directions=directions, load_if_exists=True)
    mine = config.definition(space)
    theirs = study.user_attrs.get(_SEARCH_ATTR)
    if theirs is None:
        if study.get_trials(deepcopy=False):
            raise PeftlabError(
                f"study '{config.study}' already has trials that peftlab did not make; choose another --study"
            )
        if config.ref_point is None:
            mine["ref_point"] = default_ref_point(space, config)
        study.set_user_attr(_SEARCH_ATTR, mine)
    else:
        # Training settings compare with the defaults filled in: a study made before a setting existed, or by
        # the API with only some settings, is the same search when its omitted settings have the default value.
        mine, theirs = (
            {**mine, "train": _with_defaults(mine["train"])},
            # a study made before the NUTS settings were stored ran the defaults of then
            {
                "nuts": NUTS_UNSTORED if theirs.get("sampler") == "autopeft" else None,
                "cost_scale": "linear",  # a study made before the scale was stored measured linearly
                **theirs,
                "train": _with_defaults(theirs.get("train") or {}),
            },
        )
        diff = changes(
            {k: v for k, v in theirs.items() if k in mine and k != "ref_point"},
            {k: v for k, v in mine.items() if k != "ref_point"},
        )
        if diff:
            raise PeftlabError(
                f"study '{config.study}' is a different search ({'; '.join(diff)}: the study's → this command's); "
                "use the same settings or another --study"
            )
    Path(config.output).mkdir(parents=True, exist_ok=True)
    (Path(config.output) / OWNER_FILE).write_text(json.dumps(config.owner, indent=2) + "\n")
    return study, space


def check_output(config: SearchConfig) -> None:
    """Refuse an output folder that holds another study's trial runs (another name, or the same name in another
    storage): trial numbers restart in each study, so its trials would find their folders taken."""
    path = Path(config.output) / OWNER_FILE
    if not path.is_file():
        return
    theirs = json.loads(path.read_text())
    if theirs != config.owner:
        where = theirs.get("storage") or f"{Path(config.output) / 'study.db'}"
        raise PeftlabError(
            f"'{config.output}' holds the runs of study '{theirs.get('study')}' in {where}; give study "
            f"'{config.study}' in {hide_password(config.storage_url)} its own --output"
        )


def _with_defaults(train: dict[str, Any]) -> dict[str, Any]:
    """Training settings with every omitted TrainConfig field at its default."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return {k: v for k, v in defaults.items() if k not in RUN_FIELDS} | train


def constant_score(config: SearchConfig) -> float:
    """The dev score of the best constant prediction, on the dev split the search's trials build: a configuration
    scoring no more has learned nothing. 0 when there is no dev split (the trials' score is then minus the loss)."""
    train = TrainConfig(model=config.model, task=config.task, **config.train)
    task, splits = task_splits(train)
    if task.generative:
        return _untrained_score(train, task, splits.dev)
    return float(constant_scores(task, splits.dev)[task.main_metric]) if splits.dev else 0.0


def _untrained_score(train: TrainConfig, task: TaskInfo, dev: list) -> float:
    """A generative task's score of learning nothing: the base model's (minus its dev loss per response token when
    trials are chosen by loss; 0 exact match or ROUGE when by generation, which an untrained model can score above)."""
    by_loss = train.select_by == "loss" or task.generation.scoring == "loss"
    if not by_loss or not dev:
        return 0.0
    model, encoder, device = scoring_backbone(train.model, task, train.max_length, uses_chat_template(train))
    return -response_loss(model, encoder, dev, train.eval_batch_size, device)


def default_ref_point(space: SearchSpace, config: SearchConfig) -> list[float]:
    """The constant prediction's dev score (:func:`constant_score`: no credit for learning nothing) and the
    budget, else 1.1 x the costliest of the space's corner (every dimension at its last choice) and 64 random
    points."""
    score = constant_score(config)
    if config.budget is not None:
        return [score, float(config.budget)]
    cost = CostModel.for_search(config)
    points = [[len(d.choices) - 1 for d in space.dimensions()], *(space.random_vector(k) for k in range(64))]
    costs = []
    for v in points:
        with contextlib.suppress(SpecError):  # points that cannot be built fail as trials, not here
            costs.append(cost.stored(space.decode(v)))
    return [score, round(1.1 * max(costs), 4) if costs else 100.0]


def work(
    config: SearchConfig,
    worker: int = 0,
    threads: int | None = None,
    on_trial: Callable[[FrozenTrial], None] | None = None,
) -> None:
    """One worker: ask, train, tell, until the study holds ``config.trials`` finished trials. The sampler measures
    hypervolume from the study's reference point (the extra objectives' from the data)."""
    config = search_defaults(config)
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study, space = create_study(config)
    storage = open_storage(config.storage_url, heartbeat=config.heartbeat)
    cost = CostModel.for_search(config)
    seed = config.seed + 7919 * worker + len(study.get_trials(deepcopy=False))  # fresh draws when resumed
    ref = definition_of(study)["ref_point"]
    sampler = make_sampler(
        config.sampler,
        space,
        seed,
        config.startup_trials,
        lambda v: cost.stored(space.decode(v)),
        config.budget,
        config.batch_size,
        ref_point=[*ref, *[None] * (len(config.objectives) - len(ref))],
        nuts=config.nuts,
        cost_scale=config.cost_scale,
    )
    study = optuna.load_study(study_name=config.study, storage=storage, sampler=sampler)
    objective = Objective(config, space, cost)
    callbacks = [lambda s, t: on_trial(t)] if on_trial else []
    adopted: set[int] = set()
    while True:
        fail_stale(study, storage, adopted)
        done, flight = counted(study)
        if done >= config.trials:
            return
        if done + flight >= config.trials:  # the rest is in other workers' hands (or stale, soon retried)
            time.sleep(min(config.heartbeat, 5))
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=True)


def fail_stale(study: optuna.Study, storage: RDBStorage, adopted: set[int]) -> None:
    """Fail (and queue again, once) the trials of dead workers.

    Optuna's check skips a running trial that never recorded a heartbeat: its worker died between asking for it
    and the heartbeat thread's first beat, and the search would wait on it forever. So each running trial this
    worker has not seen before (``adopted``) gets one heartbeat from here: a live worker beats on, a dead one's
    trial goes stale one grace period later.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t._trial_id not in adopted:
            adopted.add(t._trial_id)
            storage.record_heartbeat(t._trial_id)


def _spawned(config: SearchConfig, worker: int, threads: int) -> None:
    try:
        work(config, worker, threads, on_trial=print_trial)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker: the parent process says it once
        sys.exit(130)


def run_search(
    config: SearchConfig, workers: int = 1, on_trial: Callable[[FrozenTrial], None] | None = None
) -> optuna.Study:
    """Run (or resume, or join) a search with ``workers`` local processes, then score its Pareto set on the test
    split (:func:`peftlab.search.holdout.score_front`); returns the study."""
    if workers < 1:
        raise PeftlabError(f"workers must be >= 1, got {workers}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    config = search_defaults(config)
    create_study(config)
    if workers == 1:
        work(config, 0, on_trial=on_trial)
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_spawned, args=(config, i, threads)) for i in range(workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise PeftlabError(
                f"{len(bad)} worker(s) exited with codes {bad}; finished trials are kept in the "
                "study: run the same command again to resume"
            )
    study = optuna.load_study(study_name=config.study, storage=open_storage(config.storage_url))
    score_front(study, pareto_trials(study), definition_of(study))
    return study


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials on the (dev score, stored %) front, by increasing stored %."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    return [done[i] for i in pareto_indices([(t.values[0], t.values[1]) for t in done])]


def none_completed(study: optuna.Study) -> str | None:
    """Why a search found nothing, in one line (its first finished trial's status and message); None when a trial
    completed."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if not trials or any(t.state == TrialState.COMPLETE for t in trials):
        return None
    t = trials[0]
    reason = f"trial {t.number}: {_status(t) or t.state.name.lower()}"
    if "message" in t.user_attrs:
        reason += f" ({' '.join(str(t.user_attrs['message']).split())})"
    elif "stored_percent" in t.user_attrs:
        reason += f", stored {t.user_attrs['stored_percent']:.3f}%"
    return reason


def print_trial(t: FrozenTrial) -> None:
    """One line per finished trial (the CLI's progress report)."""
    status = _status(t) or t.state.name.lower()
    stored = t.user_attrs.get("stored_percent")
    text = f"trial {t.number}: {status}"
    if t.values:
        text += f", dev score {t.values[0]:.4f}, stored {t.values[1]:.3f}%"
    elif stored is not None:
        text += f", stored {stored:.3f}%"
    if "wall_time_s" in t.user_attrs:
        text += f", {t.user_attrs['wall_time_s']:.0f} s"
    if "message" in t.user_attrs:
        text += f" ({t.user_attrs['message']})"
    print(text, flush=True)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial as a flat row: number, status, values, counts, dev and test scores, parameters."""
    rows = []
    attrs = study.user_attrs
    for t in study.get_trials(deepcopy=False):
        test = trial_test(attrs, t) or {}
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "status": _status(t) or t.state.name.lower(),
            "score": t.values[0] if t.values else None,
            "stored_percent": t.user_attrs.get("stored_percent"),
            "trainable_percent": t.user_attrs.get("trainable_percent"),
            **{f"test_{k}": v for k, v in test.items()},
            "wall_time_s": t.user_attrs.get("wall_time_s"),
            "message": t.user_attrs.get("message"),
        }
        if t.values and len(t.values) > 2:
            for name, v in zip(study.user_attrs[_SEARCH_ATTR]["objectives"][2:], t.values[2:], strict=True):
                row[name] = v
        rows.append(row | {f"param_{k}": v for k, v in t.params.items()})
    return rows


def finished_points(study: optuna.Study) -> list[tuple[float, float] | None]:
    """Per trial in order: (score, stored %) for completed trials, None for the rest."""
    return [
        (t.values[0], t.values[1]) if t.state == TrialState.COMPLETE else None for t in study.get_trials(deepcopy=False)
    ]
