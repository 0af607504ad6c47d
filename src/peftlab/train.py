"""Fine-tuning a spec on a task: the loop behind ``peftlab train`` and the search's trials.

AdamW with per-method learning-rate defaults, a linear schedule with warm-up, gradient accumulation and
clipping, dynamic padding, optional bf16/fp16 autocast on a GPU and gradient checkpointing; a budget in
steps, epochs or a fraction of the full run; evaluation every N steps with early stopping and best-state
selection; checkpoints to resume from; data parallelism under ``torchrun`` / ``accelerate launch``. Every
run writes a JSON record. A non-finite loss ends the run with status "diverged" instead of a crash.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peftlab import metrics as metric_fns
from peftlab.anatomy import model_type_facts
from peftlab.atomic import write_files, write_json
from peftlab.errors import PeftlabError
from peftlab.memory import peak_memory
from peftlab.modules.base import TrainingLoss
from peftlab.peft_model import PeftModel, apply
from peftlab.spec import Spec
from peftlab.tasks import Example, Splits, TaskInfo, get_task, load_user_data, make_splits
from peftlab.tokenize import get_tokenizer, pad_batch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
#: TrainConfig fields that name one run rather than say how it trains (a search's trials share the rest)
RUN_FIELDS = ("model", "task", "output", "progress", "resume")


@dataclass
class TrainConfig:
    """Everything that determines a run; stored in its record."""

    model: str
    task: str
    data_dir: str | None = None
    k: int | None = None
    data_seed: int = 0
    dev_size: int | None = None
    seed: int = 0
    max_steps: int | None = None
    epochs: float = 3.0
    fraction: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    group_by_length: bool = False
    eval_every: int | None = None
    patience: int | None = None
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    dropout: float | None = None
    #: AdaMix's consistency regularisation: the weight of the symmetrised KL divergence between two forward
    #: passes through different random experts (None: 1 for a spec with AdaMix modules, 0 otherwise)
    consistency: float | None = None
    output: str | None = None
    resume: bool = True
    progress: bool = True
    eval_batch_size: int = 64
    train_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: list[str] | None = None

    def check(self) -> None:
        budgets = [b for b in (self.max_steps, self.fraction) if b is not None]
        if len(budgets) > 1:
            raise PeftlabError("give one budget: --max-steps or --fraction (with --epochs as the full run)")
        if self.max_steps is not None and self.max_steps < 1:
            raise PeftlabError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise PeftlabError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.epochs <= 0:
            raise PeftlabError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "eval_every", "patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PeftlabError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise PeftlabError(f"lr must be a number > 0 (or omitted for the method's default), got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise PeftlabError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PeftlabError(f"{name} must be a number >= 0 (max_grad_norm 0: no clipping), got {value}")
        if self.consistency is not None and not (math.isfinite(self.consistency) and self.consistency >= 0):
            raise PeftlabError(f"consistency must be a number >= 0 (0 turns it off), got {self.consistency}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise PeftlabError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise PeftlabError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.precision != "fp32" and not torch.cuda.is_available():
            raise PeftlabError(f"{self.precision} needs a CUDA GPU; on the CPU use fp32")


@dataclass
class RunRecord:
    """The JSON record every run writes (``evaluations``: per evaluation the step, the mean training loss
    since the previous evaluation and the dev metrics)."""

    config: dict[str, Any]
    spec: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    steps: int = 0
    total_steps: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    test: dict[str, float] | None = None
    wall_time_s: float = 0.0
    train_tokens: int = 0
    tokens_per_s: float = 0.0
    peak_memory_bytes: int = 0
    world_size: int = 1
    device: str = "cpu"
    #: python, torch, transformers and peftlab versions: records written months apart stay comparable
    versions: dict[str, str] = field(default_factory=dict)
    message: str | None = None

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))


# -- distributed ---------------------------------------------------------------------------------------
def _dist_setup() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun / accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_reduce(params: list[nn.Parameter], loss: float, world: int) -> float:
    """Sum gradients and the loss over processes. Each process already weighted its share of the global
    batch, so the sum is the gradient of the global mean: the same as one process on the whole batch."""
    if world == 1:
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([*(g.reshape(-1) for g in grads), torch.tensor([loss], device=params[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(flat[-1])


# -- data ------------------------------------------------------------------------------------------------
class Encoder:
    """Examples -> padded tensors for the model class (classifier labels, or text targets for T5)."""

    def __init__(self, tokenizer: Any, task: TaskInfo, max_length: int, seq2seq: bool, left_pad: bool) -> None:
        self.tok, self.task, self.max_length = tokenizer, task, max_length
        self.seq2seq, self.left_pad = seq2seq, left_pad
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None else pad
        if seq2seq:
            words = task.label_names or ("score",)
            self.targets = [self._target_ids(w) for w in words]

    def _target_ids(self, text: str) -> list[int]:
        return self.tok([text], truncation=True, max_length=16)["input_ids"][0]

    def label_text(self, label: float | int) -> str:
        return self.task.label_names[int(label)] if self.task.label_names else f"{float(label):.1f}"

    def __call__(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        texts = [r["text"] for r in rows]
        pairs = [r["text_pair"] for r in rows]
        if self.seq2seq:
            name = self.task.name.split("/")[-1]
            texts = [f"{name} {a}" + (f" | {b}" if b else "") for a, b in zip(texts, pairs, strict=True)]
            enc = self.tok(texts, truncation=True, max_length=self.max_length)
        elif any(p is not None for p in pairs):
            enc = self.tok(texts, [p or "" for p in pairs], truncation=True, max_length=self.max_length)
        else:
            enc = self.tok(texts, truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        batch = pad_batch([{k: enc[k][i] for k in keys} for i in range(len(rows))], self.pad_id, self.left_pad)
        if self.seq2seq:
            targets = [self._target_ids(self.label_text(r["label"])) if r["label"] is not None else [0] for r in rows]
            labels = pad_batch([{"input_ids": t} for t in targets], -100)["input_ids"]
            batch["labels"] = labels
        elif rows[0]["label"] is not None:
            dtype = torch.float if self.task.is_regression else torch.long
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        return batch


def input_limit(model: nn.Module, wanted: int) -> int:
    """``wanted`` capped at the model's position table (less the rows RoBERTa reserves for padding)."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is None:
        return wanted
    return min(wanted, limit - model_type_facts(cfg.model_type).position_offset(cfg))


def task_encoder(model_name: str, model: nn.Module, task: TaskInfo, max_length: int, seq2seq: bool) -> Encoder:
    """The tokenizer-backed encoder for a model and task; gives the model a pad token id if it lacks one.
    Decoders are padded on the left so that their last position is a real token."""
    tokenizer = get_tokenizer(model_name, model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(tokenizer, "pad_token_id", 0)
    decoder_only = not seq2seq and model_type_facts(model.config.model_type).decoder_only
    return Encoder(tokenizer, task, input_limit(model, max_length), seq2seq, left_pad=decoder_only)


def text_length(row: Example) -> int:
    """A tokenizer-free length proxy (characters) for grouping examples of similar length."""
    return len(row["text"]) + len(row["text_pair"] or "")


def _batches(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
    """Shuffled batches; with ``lengths``, batches of similar length (as transformers' ``group_by_length``):
    shuffle, sort within mega-batches of 50 batches, shuffle the batches. Less padding, same examples."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    mega = 50 * batch_size
    order = [i for s in range(0, n, mega) for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# -- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(pm: nn.Module, encoder: Encoder, rows: list[Example], batch_size: int, device: torch.device) -> list:
    """Predictions for ``rows``: class ids or scores; T5 ranks the label words by likelihood."""
    was_training = pm.training
    pm.eval()
    order = sorted(range(len(rows)), key=lambda i: text_length(rows[i]))  # similar lengths pad less
    out: list = [None] * len(rows)
    for i in range(0, len(rows), batch_size):
        ids = order[i : i + batch_size]
        batch = {k: v.to(device) for k, v in encoder([rows[j] for j in ids]).items() if k != "labels"}
        if encoder.seq2seq:
            preds = _rank_labels(pm, encoder, batch)
        else:
            logits = pm(**batch).logits.float()
            preds = logits[:, 0].tolist() if encoder.task.is_regression else logits.argmax(-1).tolist()
        for j, p in zip(ids, preds, strict=True):
            out[j] = p
    pm.train(was_training)
    return out


def _rank_labels(pm: nn.Module, encoder: Encoder, batch: dict[str, torch.Tensor]) -> list:
    """Text-to-text classification: the label word with the highest likelihood (rank classification);
    regression generates a number."""
    n = batch["input_ids"].shape[0]
    if encoder.task.is_regression:
        gen = pm.generate(**batch, max_new_tokens=6, do_sample=False)
        values = []
        for seq in gen:
            text = encoder.tok.decode(seq.tolist(), skip_special_tokens=True)
            try:
                values.append(float(text.strip().split()[0]))
            except (ValueError, IndexError):
                values.append(2.5)
        return values
    scores = []
    for target in encoder.targets:
        labels = torch.tensor([target] * n, device=batch["input_ids"].device)
        logits = pm(**batch, labels=labels).logits.float()
        logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        scores.append(logp.sum(-1))
    return torch.stack(scores, -1).argmax(-1).tolist()


def evaluate(
    pm: nn.Module, encoder: Encoder, rows: list[Example], batch_size: int, device: torch.device
) -> dict[str, float]:
    preds = predict(pm, encoder, rows, batch_size, device)
    labels = [r["label"] for r in rows]
    return metric_fns.compute(encoder.task.metrics, preds, labels)


# -- the run ------------------------------------------------------------------------------------------------
def batch_loss(
    pm: nn.Module, batch: dict[str, torch.Tensor], objective: TrainingLoss | None, weight: float
) -> torch.Tensor:
    """The training loss of one batch: the model's, or a kind's training objective (e.g. AdaMix's consistency
    between two routed passes) at ``weight`` (0 turns it off)."""
    out = pm(**batch)
    if objective is None or not weight:
        return out.loss
    return objective(pm, batch, out, weight)


def _enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass; non-reentrant, so gradients reach adapters of a frozen backbone.
    transformers 5.24 renamed the method (``gradient_`` to ``activation_checkpointing_enable``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def library_versions() -> dict[str, str]:
    """python, torch, transformers and peftlab versions: what a reader needs to compare records and benchmarks."""
    import transformers

    import peftlab

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peftlab": peftlab.__version__,
    }


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under torchrun) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _device_name(device: torch.device) -> str:
    """What ran the run, for records read later: ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _trainable(pm: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in pm.named_parameters() if p.requires_grad]


def _snapshot(pm: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _trainable(pm)}


def _restore(pm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def user_task(config: TrainConfig) -> tuple[TaskInfo, Splits]:
    """A task made of the user's own CSV / TSV / JSONL files: classification when the labels are integers
    or named, regression when they are floats; dev is held out from the train file, test is ``test_file``
    (or, without one, the dev split)."""

    def read(path: str) -> list[Example]:
        return load_user_data(
            path, config.text_column, config.label_column, config.text_pair_column, config.label_names
        )

    pool = read(config.train_file)
    regression = isinstance(pool[0]["label"], float)
    if config.label_names:
        names = tuple(config.label_names)
    elif regression:
        names = None
    else:
        names = tuple(str(i) for i in range(int(max(ex["label"] for ex in pool)) + 1))
    binary = names is not None and len(names) == 2
    metrics = ("pearson", "spearman") if regression else ("accuracy", "f1" if binary else "macro_f1")
    info = TaskInfo(
        name=f"user/{config.task}",
        text_fields=("text",),
        label_names=names,
        metrics=metrics,
        main_metric=metrics[0 if not regression else 1],
        local_dir="",
        local_files={},
        hub_id="",
        hub_config="",
        hub_splits={},
    )
    n_dev = min(1000, len(pool) // 5) if config.dev_size is None else config.dev_size
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.data_seed)).tolist()
    dev = [pool[i] for i in order[:n_dev]]
    rest = [pool[i] for i in order[n_dev:]]
    train_rows = rest if config.k is None else rest[: config.k]
    if not train_rows:
        raise PeftlabError(f"{config.train_file}: no examples left to train on after holding out {n_dev} for dev")
    test = read(config.test_file) if config.test_file else dev
    return info, Splits(train=train_rows, dev=dev, test=test)


def load_for_task(model_name: str, task: TaskInfo, meta: bool = False) -> tuple[nn.Module, bool]:
    """The backbone in the class the task needs: T5 text-to-text, everything else a classifier."""
    from transformers import AutoConfig

    from peftlab.zoo import CHECKPOINTS, SHAPES, load_model

    if model_name.startswith("shape:") and model_name[6:] in SHAPES:
        model_type = SHAPES[model_name[6:]].model_type
    elif model_name in CHECKPOINTS:
        model_type = CHECKPOINTS[model_name].model_type
    else:
        model_type = AutoConfig.from_pretrained(model_name).model_type
    facts = model_type_facts(model_type)
    model = load_model(model_name, head=facts.task_head, num_labels=task.num_labels, meta=meta)
    return model, facts.seq2seq


def train(
    spec: Spec, config: TrainConfig, on_step: Callable[[int, float], None] | None = None, model: nn.Module | None = None
) -> RunRecord:
    """Train ``spec`` on ``config.task``; returns (and writes, under ``config.output``) the run record."""
    config.check()
    rank, world = _dist_setup()
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.train_file:
        task, splits = user_task(config)
    else:
        task = get_task(config.task)
        splits = make_splits(task.name, config.data_dir, config.k, config.data_seed, config.dev_size)
    seq2seq = False
    if model is None:
        model, seq2seq = load_for_task(config.model, task)
    else:
        seq2seq = model_type_facts(model.config.model_type).seq2seq
    encoder = task_encoder(config.model, model, task, config.max_length, seq2seq)
    device = default_device()
    model.to(device)
    if config.dropout is not None:  # the backbone's dropout, e.g. 0 for runs that must be reproducible
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = config.dropout
    pm = apply(model, spec) if not isinstance(model, PeftModel) else model
    if config.gradient_checkpointing:
        _enable_checkpointing(pm.base_model)

    per_rank = config.batch_size // world
    if per_rank * world != config.batch_size:
        raise PeftlabError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    steps_per_epoch = math.ceil(len(splits.train) / (config.batch_size * config.grad_accum))
    full = max(1, round(config.epochs * steps_per_epoch))
    total = config.max_steps or max(1, round((config.fraction or 1.0) * full))
    eval_every = config.eval_every or steps_per_epoch
    lr = config.lr or spec.default_lr()
    params = [p for _, p in _trainable(pm)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )

    record = RunRecord(
        config=asdict(config),
        spec=spec.to_dict(),
        counts=pm.counts().to_dict(),
        total_steps=total,
        world_size=world,
        device=_device_name(device),
        versions=library_versions(),
    )
    record.config["lr"] = lr
    objective = spec.training_loss()
    default_weight = objective.default_weight if objective is not None else 0.0
    consistency = config.consistency if config.consistency is not None else default_weight
    record.config["consistency"] = consistency
    out = Path(config.output) if config.output else None
    ckpt = out / CHECKPOINT if out else None
    state = {"step": 0, "best_state": None, "bad_evals": 0, "tokens": 0, "elapsed": 0.0}
    if ckpt is not None and config.resume and (ckpt / "state.pt").is_file():
        state = _load_checkpoint(ckpt, pm, opt, sched, record)
    elif out is not None and (out / "record.json").is_file():
        raise PeftlabError(f"'{out}' already holds a finished run; choose another --output (nothing was changed)")
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)
        if config.precision != "fp32"
        else torch.autocast("cpu", enabled=False)
    )
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    pm.train()
    step = state["step"]
    start = time.perf_counter() - state["elapsed"]
    bar = _progress(total, step, enabled=config.progress and rank == 0)
    micro = config.batch_size * config.grad_accum
    stop = step >= total
    lengths = [text_length(r) for r in splits.train] if config.group_by_length else None
    interval_loss, interval_start = 0.0, step  # checkpoints follow evaluations, so a resumed run starts afresh
    while not stop:
        epoch, offset = divmod(step, steps_per_epoch)
        for group in _batches(len(splits.train), micro, config.seed, epoch, lengths)[offset:]:
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            chunks = [group[i : i + config.batch_size] for i in range(0, len(group), config.batch_size)]
            for chunk in chunks:
                mine = chunk[rank * per_rank : (rank + 1) * per_rank] if world > 1 else chunk
                if not mine:
                    continue
                batch = {k: v.to(device) for k, v in encoder([splits.train[i] for i in mine]).items()}
                state["tokens"] += int(batch["attention_mask"].sum())
                with autocast:
                    loss = batch_loss(pm, batch, objective, consistency) * (len(mine) / len(group))
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach().item()
            loss_sum = _all_reduce(params, loss_sum, world)
            if not math.isfinite(loss_sum):
                record.status = "diverged"
                record.message = f"non-finite loss at step {step + 1}"
                stop = True
                break
            if scaler:
                scaler.unscale_(opt)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            step += 1
            interval_loss += loss_sum
            bar(step, loss_sum)
            if on_step is not None:
                on_step(step, loss_sum)
            if step % eval_every == 0 or step == total:
                mean_loss = interval_loss / max(1, step - interval_start)  # the training loss since the last eval
                interval_loss, interval_start = 0.0, step
                stop = _evaluate_and_select(pm, encoder, splits.dev, config, device, step, mean_loss, record, state)
                state["step"], state["elapsed"] = step, time.perf_counter() - start
                if ckpt is not None and rank == 0:
                    _save_checkpoint(ckpt, pm, opt, sched, record, state)
            if step >= total or stop:
                stop = True
                break
    bar(None, None)
    record.steps = step
    record.wall_time_s = time.perf_counter() - start
    record.train_tokens = state["tokens"] * world
    record.tokens_per_s = record.train_tokens / record.wall_time_s if record.wall_time_s else 0.0
    record.peak_memory_bytes = peak_memory(device)
    if record.status == "running":
        record.status = "early-stopped" if step < total else "completed"
    if state["best_state"] is not None:
        _restore(pm, state["best_state"])
    if record.status != "diverged":
        record.test = evaluate(pm, encoder, splits.test, config.eval_batch_size, device)
    if out is not None and rank == 0:
        if record.status != "diverged":
            pm.save(out / "adapter", overwrite=True)
        record.save(out / "record.json")
        if ckpt is not None and record.status != "diverged":
            shutil.rmtree(ckpt, ignore_errors=True)
    return record


def _evaluate_and_select(pm, encoder, dev, config, device, step, loss, record, state) -> bool:
    """Evaluate on the dev split, keep the best state; True when early stopping says to stop."""
    scores = evaluate(pm, encoder, dev, config.eval_batch_size, device) if dev else {}
    main = scores.get(encoder.task.main_metric, -loss)
    record.evaluations.append({"step": step, "loss": loss, **scores})
    better = record.best is None or main > record.best["score"]
    if better:
        record.best = {"step": step, "score": main, "metric": encoder.task.main_metric}
        state["best_state"] = _snapshot(pm)
        state["bad_evals"] = 0
    else:
        state["bad_evals"] += 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        shown = ", ".join(f"dev {k} {v:.4f}" for k, v in scores.items())
        log.info(
            "step %d/%d: train loss %.4f%s%s",
            step,
            record.total_steps,
            loss,
            f", {shown}" if shown else "",
            " (best so far)" if better else "",
        )
    return config.patience is not None and state["bad_evals"] >= config.patience


def _save_checkpoint(path: Path, pm, opt, sched, record: RunRecord, state: dict) -> None:
    """Everything needed to continue exactly: trainable tensors, optimiser, schedule, RNG, record."""
    saved = {
        "trainable": _snapshot(pm),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "state": state,
    }
    write_files(path, {"state.pt": lambda p: torch.save(saved, p), "record.json": record.save})


def _load_checkpoint(path: Path, pm, opt, sched, record: RunRecord) -> dict:
    saved = torch.load(path / "state.pt", weights_only=True)
    _restore(pm, saved["trainable"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    earlier = json.loads((path / "record.json").read_text())
    record.evaluations, record.best = earlier["evaluations"], earlier["best"]
    return saved["state"]


def _progress(total: int, start: int, enabled: bool) -> Callable[[int | None, float | None], None]:
    """A tqdm bar when enabled and installed; a no-op otherwise."""
    if not enabled:
        return lambda step, loss: None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return lambda step, loss: None
    bar = tqdm(total=total, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True)

    def update(step: int | None, loss: float | None) -> None:
        if step is None:
            bar.close()
            return
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")

    return update
