"""The training loop: one optimiser step at a time, dev evaluations with best-state selection and early
stopping, checkpoints after each evaluation, and the record at the end."""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftlab.backbone.anatomy import model_type_facts
from peftlab.core.peft_model import PeftModel, apply
from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError
from peftlab.formats.keys import stored_tensors
from peftlab.formats.loading import init_from
from peftlab.memory import peak_memory
from peftlab.modules.base import TrainingLoss
from peftlab.train.baseline import constant_scores, hopeless, prior_loss
from peftlab.train.checkpoint import load_checkpoint, restore, save_checkpoint, snapshot, trainable
from peftlab.train.config import CHECKPOINT, RunRecord, TrainConfig
from peftlab.train.data import (
    Encoder,
    batches,
    load_for_task,
    task_encoder,
    task_splits,
    text_length,
    uses_chat_template,
)
from peftlab.train.environment import default_device, device_name, library_versions
from peftlab.train.eva import eva_sites, initialize_eva
from peftlab.train.evaluation import evaluate
from peftlab.train.frozen import FrozenCache, FrozenPrefix
from peftlab.train.generation import samples
from peftlab.train.metrics import oriented
from peftlab.train.optim import make_optimiser
from peftlab.train.parallel import all_reduce, dist_setup, is_main
from peftlab.train.tasks import Example, Row
from peftlab.train.warm import WarmStart

log = logging.getLogger("peftlab.train")
#: dev examples the early hopeless check scores (a random sample: the dev split is drawn at random); a score at
#: the constant prediction's on 200 examples is worth a full evaluation, which decides
CHECK_SIZE = 200

StepCallback = Callable[[int, float], None]


#: how a packed batch is called: transformers reads packing off the positions only without a cache (a model in its
#: forward makes one unless told not to)
PACKED_CALL = {"use_cache": False}


def batch_loss(
    pm: nn.Module, batch: dict[str, torch.Tensor], objective: TrainingLoss | None, weight: float
) -> torch.Tensor:
    """The training loss of one batch: the model's, or a kind's training objective (e.g. AdaMix's consistency
    between two routed passes) at ``weight`` (0 turns it off)."""
    out = pm(**batch)
    if objective is None or not weight:
        return out.loss
    return objective(pm, batch, out, weight)


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass; non-reentrant, so gradients reach adapters of a frozen backbone.
    transformers 5.24 renamed the method (``gradient_`` to ``activation_checkpointing_enable``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def progress_bar(total: int, start: int, enabled: bool) -> Callable[[int | None, float | None], None]:
    """A tqdm bar when enabled and installed; a no-op otherwise."""
    if not enabled:
        return lambda step, loss: None
    bar = tqdm(total=total, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True)

    def update(step: int | None, loss: float | None) -> None:
        if step is None:
            bar.close()
            return
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")

    return update


def _prepare_model(
    spec: Spec, config: TrainConfig, task: Any, model: nn.Module | None, device: torch.device, warm: WarmStart | None
) -> tuple[PeftModel, Encoder]:
    """The backbone in the task's class (the one given, or the worker's), on the device, with the spec applied."""
    if model is None and warm is not None and config.quantize is None:
        model, seq2seq = warm.backbone(config.model, task)
    elif model is None:  # a quantized base is loaded afresh: a worker restores full-precision backbones only
        model, seq2seq = load_for_task(config.model, task, quantize=config.quantize)
    else:
        seq2seq = model_type_facts(model.config.model_type).seq2seq
    tokenizer, tokens = (warm.tokenizer(config.model, model), warm.tokens) if warm is not None else (None, None)
    encoder = task_encoder(
        config.model, model, task, config.max_length, seq2seq, tokenizer, tokens, uses_chat_template(config),
        config.max_new_tokens,
    )  # fmt: skip
    model.to(device)
    if config.dropout is not None:  # the backbone's dropout, e.g. 0 for runs that must be reproducible
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = config.dropout
    pm = model if isinstance(model, PeftModel) or foreign(model) else apply(model, spec)
    if config.init_from is not None:
        copied = init_from(pm, config.init_from)
        log.info("initialised %d tensor(s) from %s", len(copied), config.init_from)
    if warm is not None:
        warm.lend(model, pm)
    if config.gradient_checkpointing:
        modules = pm.adapters[pm.active_adapter].all_modules() if isinstance(pm, PeftModel) else ()
        detached = sorted({m.kind for _, m in modules if m.detached})
        if detached:  # the blocks' recomputation would run the side network's hooks again, out of order
            raise PeftlabError(
                f"{', '.join(detached)} back-propagates through no backbone block: gradient checkpointing has nothing "
                "to save there; leave --gradient-checkpointing out"
            )
        enable_checkpointing(pm.base_model)
    return pm, encoder


def _frozen_prefix(pm: PeftModel, config: TrainConfig, warm: WarmStart | None) -> FrozenPrefix | None:
    """With ``cache_frozen``, the run's use of the frozen layers' cache: the worker's (its trials share it), else
    the run's own."""
    if not config.cache_frozen:
        return None
    frozen = FrozenPrefix(pm, warm.frozen if warm is not None else FrozenCache(), config.cache_frozen_mb)
    if is_main():
        if frozen.active:
            log.info("frozen-layer cache: steps start at layer %d (%s acts there)", frozen.layer, frozen.where)
        else:
            log.info("frozen-layer cache: not used, the spec acts below the first layer (at %s)", frozen.where)
    return frozen


def _schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak rate, then linear decay to zero at ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )


def _autocast(precision: str) -> AbstractContextManager:
    if precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class Run:
    """One training run: its model, data, optimiser and record, and the state a checkpoint keeps
    (``step``, ``best_state``, ``bad_evals``, ``tokens``, ``elapsed``). ``warm``: a worker's backbone and token ids,
    kept between runs (the search's trials)."""

    def __init__(self, spec: Spec, config: TrainConfig, model: nn.Module | None, warm: WarmStart | None = None) -> None:
        start = time.perf_counter()
        config.check()
        self.config = config
        self.rank, self.world = dist_setup()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.task, self.splits = task_splits(config)
        data = time.perf_counter()
        self.device = default_device()
        self.pm, self.encoder = _prepare_model(spec, config, self.task, model, self.device, warm)
        if not foreign(self.pm):  # kinds that choose from data (a sparse mask), before the first step
            self.pm.prepare(self._training_batches)
        self.eva_ranks = self._initialise_eva()
        self.frozen = _frozen_prefix(self.pm, config, warm)
        if config.packing:
            self._check_packing(spec)
        self.per_rank = config.batch_size // self.world
        if self.per_rank * self.world != config.batch_size:
            raise PeftlabError(f"batch_size {config.batch_size} must be divisible by the {self.world} processes")
        self.steps_per_epoch = math.ceil(len(self.splits.train) / (config.batch_size * config.grad_accum))
        full = max(1, round(config.epochs * self.steps_per_epoch))
        self.total = config.max_steps or max(1, round((config.fraction or 1.0) * full))
        self.eval_every = config.eval_every or self.steps_per_epoch
        lr = config.lr or spec.default_lr()
        named = trainable(self.pm)
        self.params = [p for _, p in named]
        self.opt = make_optimiser(self.pm, named, lr, config)
        self.sched = _schedule(self.opt, int(config.warmup_ratio * self.total), self.total)
        self.objective = spec.training_loss()
        default_weight = self.objective.default_weight if self.objective is not None else 0.0
        self.weight = config.consistency if config.consistency is not None else default_weight
        self.record = RunRecord(
            config=asdict(config),
            spec=spec.to_dict(),
            counts=self.pm.counts().to_dict() if not foreign(self.pm) else _foreign_counts(self.pm),
            total_steps=self.total,
            world_size=self.world,
            device=device_name(self.device),
            versions=library_versions(),
        )
        self.record.config["lr"] = lr
        self.record.config["consistency"] = self.weight
        if self.eva_ranks:
            self.record.counts["eva_ranks"] = self.eva_ranks
        self.out = Path(config.output) if config.output else None
        self.ckpt = self.out / CHECKPOINT if self.out else None
        self.state: dict[str, Any] = {"step": 0, "best_state": None, "bad_evals": 0, "tokens": 0, "elapsed": 0.0}
        self.limits = self._learned_nothing() if config.stop_hopeless else None
        self.check_at = self._check_step()
        self.losses: list[float] = []  # each optimiser step's loss (since this process started the run)
        self._resume()
        self.autocast = _autocast(config.precision)
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.timings = {  # RunRecord.timings
            "data_s": data - start,
            "setup_s": time.perf_counter() - data,
            **dict.fromkeys(("tokenize_s", "train_s", "eval_s", "checkpoint_s"), 0.0),
            **({"cache_s": 0.0} if self.frozen is not None else {}),
        }

    def _training_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Padded training batches of ``batch_size`` in the run's order (the seed's shuffles), epoch after epoch, on
        the device: what a kind's prepare hook reads. Every process reads the same whole batches, so that each
        chooses the same (e.g. the same mask); a resumed run chooses again from the same batches."""
        epoch = 0
        while True:
            for group in batches(len(self.splits.train), self.config.batch_size, self.config.seed, epoch):
                rows: list[Example] = [self.splits.train[j] for j in group]
                yield {k: v.to(self.device) for k, v in self.encoder(rows).items()}
            epoch += 1

    def _check_packing(self, spec: Spec) -> None:
        """Refuse ``packing`` where packed examples would see each other: not a generative decoder task, a kind every
        position attends to (prompt, prefix), a gate averaged over the row; and check on a few training examples that
        this model keeps them apart (the packed batch's loss is the padded batch's)."""
        if not self.task.generative or self.encoder.seq2seq:
            raise PeftlabError(
                f"--packing packs prompt/response examples for decoders; task '{self.task.name}' on this model is not "
                "one (classification, or an encoder-decoder)"
            )
        shared = sorted({s.kind for s in spec.settings() if not s.packable}) + ["gates"] * spec.gates
        if shared:
            raise PeftlabError(
                f"--packing cannot keep packed examples apart under {', '.join(shared)} (every position of a packed "
                "row would share them); train without --packing"
            )
        rows = self.splits.train[:4]
        if len(rows) < 2:
            return
        was = self.pm.training
        self.pm.eval()
        with torch.no_grad():
            padded = self.pm(**{k: v.to(self.device) for k, v in self.encoder(rows).items()}).loss
            batch = {k: v.to(self.device) for k, v in self.encoder.pack(rows)[0].items()}
            packed = self.pm(**batch, **PACKED_CALL).loss
        self.pm.train(was)
        if not torch.isclose(packed, padded, rtol=1e-4, atol=1e-5):
            raise PeftlabError(
                f"this model ({self.pm.config.model_type}) lets packed examples attend to each other (loss "
                f"{float(packed):.4f} packed vs {float(padded):.4f} padded); train without --packing"
            )

    def _learned_nothing(self) -> tuple[float, float | None] | None:
        """What a run that learned nothing shows: the constant prediction's dev score and the label prior's
        loss on train (None where the training loss is not the head's alone: text-to-text, or an extra
        objective such as AdaMix's consistency); None without a labelled dev split to compare on."""
        dev, task = self.splits.dev, self.encoder.task
        if task.generative or not dev or any(r["label"] is None for r in dev):
            return None  # a generative task has no constant prediction to compare with
        prior = None if self.encoder.seq2seq or self.weight else prior_loss(task, self.splits.train)
        return constant_scores(task, dev)[task.main_metric], prior

    def _check_step(self) -> int | None:
        """The step of the early hopeless check: a fraction of the budget, when the first evaluation is later."""
        if self.limits is None:
            return None
        step = max(1, round(self.config.hopeless_check * self.total))
        return step if step < min(self.eval_every, self.total) else None

    def _recent_loss(self) -> float | None:
        """The mean training loss over the later half of this process's steps: where the loss is now (the mean since
        the start still carries the flat first steps, in which every run sits at the prior)."""
        recent = self.losses[len(self.losses) // 2 :]
        return sum(recent) / len(recent) if recent else None

    def _looks_hopeless(self) -> bool:
        """The early check: the hopeless rule on a sample of the dev split, against that sample's own constant
        prediction."""
        sample, metric = self.splits.dev[:CHECK_SIZE], self.encoder.task.main_metric
        baseline = constant_scores(self.encoder.task, sample)[metric]
        return hopeless(metric, self._score(sample)[metric], baseline, self._recent_loss(), self.limits[1]) is not None

    def _initialise_eva(self) -> dict[str, int]:
        """EVA's data-driven start, before anything trains: the components of each EVA site's inputs on the first
        ``init_batches`` training batches (in the first epoch's order). Returns the ranks it gave (empty: no EVA)."""
        if foreign(self.pm) or not eva_sites(self.pm):
            return {}
        config = self.config
        micro = config.batch_size * config.grad_accum
        groups = batches(len(self.splits.train), micro, config.seed, 0, None)[: config.init_batches]
        encoded = (
            {k: v.to(self.device) for k, v in self.encoder([self.splits.train[j] for j in group]).items()}
            for group in groups
        )
        ranks = initialize_eva(self.pm, encoded)
        if is_main():
            kept = sum(1 for r in ranks.values() if r)
            log.info("EVA: %d batches, ranks %s (%d of %d sites kept)", len(groups), ranks, kept, len(ranks))
        return ranks

    def _resume(self) -> None:
        """Continue from the output's checkpoint; refuse an output that holds a finished run."""
        if self.ckpt is not None and self.config.resume and (self.ckpt / "state.pt").is_file():
            if self.config.optimizer == "galore":
                raise PeftlabError(
                    f"'{self.ckpt}' holds a GaLore checkpoint, which does not resume (its optimiser state holds "
                    "projector objects); choose another --output (nothing was changed)"
                )
            self.state = load_checkpoint(self.ckpt, self.pm, self.opt, self.sched, self.record)
        elif self.out is not None and (self.out / "record.json").is_file():
            raise PeftlabError(
                f"'{self.out}' already holds a finished run; choose another --output (nothing was changed)"
            )
        if self.out is not None and self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    def _optimiser_step(self, group: list[int], step: int) -> float:
        """Forward and backward over one global batch (this process's share of each micro-batch), then one
        optimiser step (number ``step``, from 1) unless the loss is not finite; returns the global batch's loss."""
        config = self.config
        self.opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, len(group), config.batch_size):
            chunk = group[i : i + config.batch_size]
            mine = chunk[self.rank * self.per_rank : (self.rank + 1) * self.per_rank] if self.world > 1 else chunk
            if not mine:
                continue
            rows: list[Example] = [self.splits.train[j] for j in mine]
            if config.packing:
                batch, tokens = self.encoder.pack(rows)
            else:
                batch = self.encoder(rows)
                tokens = int(batch["attention_mask"].sum())
            batch = {k: v.to(self.device) for k, v in batch.items()} | (PACKED_CALL if config.packing else {})
            self.state["tokens"] += tokens
            with self.autocast, self.frozen.feeding(batch) if self.frozen is not None else nullcontext():
                loss = batch_loss(self.pm, batch, self.objective, self.weight) * (len(mine) / len(group))
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach().item()
        loss_sum = all_reduce(self.params, loss_sum, self.world)
        if not math.isfinite(loss_sum):
            return loss_sum
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        if isinstance(self.pm, PeftModel):  # kinds acting once per step (AdaLoRA's rank budget)
            self.pm.after_step(step, self.total)
        return loss_sum

    def _evaluate(self, step: int, loss: float) -> bool:
        """Evaluate on the dev split, keep the best state; True when early stopping says to stop, or (with
        ``stop_hopeless``) the first evaluation shows a run that has not started to learn."""
        dev, config, record = self.splits.dev, self.config, self.record
        if not _finite(self.params):  # a finite loss, then a step too far
            record.status, record.message = "diverged", f"non-finite weights after step {step}"
            return True
        metric = self._selection_metric()
        scores = self._score(dev, generate=self._generates(len(record.evaluations) + 1)) if dev else {}
        main = oriented(metric, scores[metric]) if metric in scores else -loss
        record.evaluations.append({"step": step, "train_loss" if "loss" in scores else "loss": loss, **scores})
        better = record.best is None or main > record.best["score"]
        if better:
            record.best = {"step": step, "score": main, "metric": metric}
            self.state["best_state"] = snapshot(self.pm)
            self.state["bad_evals"] = 0
        else:
            self.state["bad_evals"] += 1
        reason = None
        if self.limits is not None and len(record.evaluations) == 1 and step < self.total:
            reason = hopeless(self.encoder.task.main_metric, main, self.limits[0], self._recent_loss(), self.limits[1])
        if reason is not None:
            record.status, record.message = "hopeless", f"stopped at step {step}: {reason}"
        if is_main():
            shown = ", ".join(f"dev {k} {v:.4f}" for k, v in scores.items())
            log.info(
                "step %d/%d: train loss %.4f%s%s",
                step,
                record.total_steps,
                loss,
                f", {shown}" if shown else "",
                " (best so far)" if better else "",
            )
            if reason is not None:
                log.info("%s", record.message)
        return reason is not None or (config.patience is not None and self.state["bad_evals"] >= config.patience)

    def _selection_metric(self) -> str:
        """The dev metric that chooses the best evaluation: the task's main metric, or for a generative task
        selected by loss its dev loss (the record's ``best.score`` is then minus the loss: higher is better)."""
        task = self.encoder.task
        return "loss" if task.generative and self.config.select_by == "loss" else task.main_metric

    def _generates(self, evaluation: int) -> bool:
        """Whether evaluation number ``evaluation`` (from 1) of a generative task generates: always when generations
        select, else every ``generate_every``-th."""
        if not self.encoder.task.generative or self.config.select_by == "metric":
            return True
        every = self.config.generate_every
        return bool(every) and evaluation % every == 0

    def _cache_s(self) -> float:
        return self.frozen.elapsed if self.frozen is not None else 0.0

    def _score(self, rows: list[Row], cached: bool = True, generate: bool = True) -> dict[str, float]:
        """The metrics on ``rows`` (``cached``: from the frozen layers' cached states, if the run has them;
        ``generate``: a generative task's generated metrics besides its loss); the time it takes, less encoding and
        gathering cached states, is evaluation time."""
        start, encoding, caching = time.perf_counter(), self.encoder.elapsed, self._cache_s()
        frozen = self.frozen if cached else None
        batch = self.config.eval_batch_size
        scores = evaluate(self.pm, self.encoder, rows, batch, self.device, frozen, generate)
        spent = time.perf_counter() - start - (self.encoder.elapsed - encoding) - (self._cache_s() - caching)
        self.timings["eval_s"] += spent
        return scores

    def _save_checkpoint(self) -> None:
        start = time.perf_counter()
        save_checkpoint(self.ckpt, self.pm, self.opt, self.sched, self.record, self.state)
        self.timings["checkpoint_s"] += time.perf_counter() - start

    def loop(self, on_step: StepCallback | None) -> None:
        """Train until the budget is spent, early stopping says so, or the loss stops being finite."""
        config = self.config
        before = self._clocks()
        self.pm.train()
        step = self.state["step"]
        start = time.perf_counter() - self.state["elapsed"]
        bar = progress_bar(self.total, step, enabled=config.progress and self.rank == 0)
        micro = config.batch_size * config.grad_accum
        lengths = [text_length(r) for r in self.splits.train] if config.group_by_length else None
        interval_loss, interval_start = 0.0, step  # checkpoints follow evaluations, so a resumed run starts afresh
        stop = step >= self.total
        while not stop:
            epoch, offset = divmod(step, self.steps_per_epoch)
            for group in batches(len(self.splits.train), micro, config.seed, epoch, lengths)[offset:]:
                loss = self._optimiser_step(group, step + 1)
                if not math.isfinite(loss):
                    self.record.status = "diverged"
                    self.record.message = f"non-finite loss at step {step + 1}"
                    stop = True
                    break
                step += 1
                interval_loss += loss
                self.losses.append(loss)
                bar(step, loss)
                if on_step is not None:
                    on_step(step, loss)
                due = step % self.eval_every == 0 or step == self.total
                if not due and step == self.check_at:  # a full evaluation only where the sample says hopeless
                    due = self._looks_hopeless()
                if due:
                    mean_loss = interval_loss / max(1, step - interval_start)  # the training loss since the last eval
                    interval_loss, interval_start = 0.0, step
                    stop = self._evaluate(step, mean_loss)
                    self.state["step"], self.state["elapsed"] = step, time.perf_counter() - start
                    if self.ckpt is not None and self.rank == 0:
                        self._save_checkpoint()
                if step >= self.total or stop:
                    stop = True
                    break
        bar(None, None)
        self.record.steps = step
        self.record.wall_time_s = time.perf_counter() - start
        elapsed, *others = (a - b for a, b in zip(self._clocks(), before, strict=True))
        self.timings["train_s"] += elapsed - sum(others)
        if self.frozen is not None:
            self.timings["cache_s"] = self.frozen.elapsed

    def _final_generations(self) -> None:
        """A generative run's record: the final model's generated dev metrics (when the evaluations did not
        generate, unless the config says not to), a few dev samples, and what max_length cut."""
        record, dev = self.record, self.splits.dev
        if dev and record.best is not None:
            at_best = next(e for e in record.evaluations if e["step"] == record.best["step"])
            record.best["dev"] = {m: at_best[m] for m in ("loss", *self.encoder.task.metrics) if m in at_best}
            if self.config.final_dev_metrics and any(m not in at_best for m in self.encoder.task.metrics):
                record.best["dev"] = self._score(dev)  # the restored best state, generating
        if dev:
            start = time.perf_counter()
            record.samples = samples(self.pm, self.encoder, dev, self.config.eval_batch_size, self.device)
            self.timings["eval_s"] += time.perf_counter() - start
        record.cut = self.encoder.report_cuts()

    def _clocks(self) -> tuple[float, ...]:
        """The wall clock, then the clocks of what a step's time is not: encoding, evaluating, checkpoints, and
        gathering cached states."""
        t = self.timings
        return (time.perf_counter(), self.encoder.elapsed, t["eval_s"], t["checkpoint_s"], self._cache_s())

    def finish(self) -> RunRecord:
        """Restore the best state, score the test split (unless the config says not to), write the adapter and
        the record."""
        record = self.record
        record.train_tokens = self.state["tokens"] * self.world
        record.tokens_per_s = record.train_tokens / record.wall_time_s if record.wall_time_s else 0.0
        record.peak_memory_bytes = peak_memory(self.device)
        if record.status == "running":
            record.status = "early-stopped" if record.steps < self.total else "completed"
        if self.state["best_state"] is not None:
            restore(self.pm, self.state["best_state"])
        if record.status != "diverged" and not _finite(_stored(self.pm)):
            # finite weights can still overflow into what is stored (e.g. prefix tuning's MLP output)
            record.status, record.message = "diverged", f"non-finite adapter values after step {record.steps}"
        if record.status != "diverged" and self.config.score_test:
            record.test = self._score(self.splits.test, cached=False)  # scored once: caching would only cost
        if record.status != "diverged" and self.encoder.task.generative:
            self._final_generations()
        if self.frozen is not None:
            record.cache = self.frozen.summary()
            self.timings["cache_s"] = self.frozen.elapsed
        self.timings["tokenize_s"] = self.encoder.elapsed
        record.timings = dict(self.timings)
        if self.out is not None and self.rank == 0:
            if record.status != "diverged":
                if foreign(self.pm):
                    self.pm.save_pretrained(self.out / "adapter")
                else:
                    self.pm.save(self.out / "adapter", overwrite=True)
            record.save(self.out / "record.json")
            if self.ckpt is not None and record.status != "diverged":
                shutil.rmtree(self.ckpt, ignore_errors=True)
        return record


def foreign(model: nn.Module) -> bool:
    """A model the ``peft`` library made trainable (its PeftModel): trained as it is, counted by its trainable
    parameters and saved by its own ``save_pretrained``. The benchmarks train peft's methods by this loop so that
    the two libraries differ in nothing else."""
    return hasattr(model, "peft_config") and not isinstance(model, PeftModel)


def _foreign_counts(model: nn.Module) -> dict[str, int]:
    """The one count a foreign model's record can give, under the name peftlab's counts use."""
    return {"trainable_params": sum(p.numel() for _, p in trainable(model))}


def _stored(pm: nn.Module) -> Iterable[torch.Tensor]:
    """What the adapter file will hold."""
    if foreign(pm):
        return [p for _, p in trainable(pm)]
    return stored_tensors(pm.adapters[pm.active_adapter]).values()


def _finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def train(
    spec: Spec,
    config: TrainConfig,
    on_step: StepCallback | None = None,
    model: nn.Module | None = None,
    warm: WarmStart | None = None,
) -> RunRecord:
    """Train ``spec`` on ``config.task``; returns (and writes, under ``config.output``) the run record. ``warm``
    lends the run a worker's loaded backbone and token ids instead of loading and tokenizing afresh."""
    run = Run(spec, config, model, warm)
    run.loop(on_step)
    return run.finish()
