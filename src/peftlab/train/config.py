"""What determines a run (:class:`TrainConfig`) and what it leaves behind (:class:`RunRecord`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftlab.atomic import write_json
from peftlab.backbone.quant import check_quantize
from peftlab.errors import PeftlabError

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
    #: train on a quantized base (QLoRA): 'nf4' or 'int8' block linears through bitsandbytes; None: full precision
    quantize: str | None = None
    gradient_checkpointing: bool = False
    #: generative decoders: pack each batch's examples end to end into rows of max_length (boundaries kept)
    packing: bool = False
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
    #: a generative user file: its prompt and response columns, or a JSONL column of chat turns (the last, the
    #: assistant's, is the response); giving any of these makes the file a prompt → response task
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None
    #: how a generative user file's generations are scored: exact (match after normalisation), rouge, or loss
    #: (the dev loss alone; nothing is generated)
    eval_metric: str = "exact"
    #: generative tasks: choose the best evaluation by the dev loss over response tokens (cheap) or by the generated
    #: metric (generates at every evaluation)
    select_by: str = "loss"
    #: generative tasks selected by loss: generate and score dev every this many evaluations too (0: only the final
    #: model, on dev and test)
    generate_every: int = 0
    #: generative tasks selected by loss: generate and score dev with the final model when no evaluation did (off:
    #: its dev record is the loss alone, which saves minutes of decoding where nothing reads the generated dev metric,
    #: e.g. a search by dev loss or a benchmark that scores its own test split)
    final_dev_metrics: bool = True
    #: generative tasks: the most tokens generated per prompt when scoring (None: the task's, e.g. 256 for GSM8K)
    max_new_tokens: int | None = None
    #: render prompts with the model's chat template (rows with a messages column always are)
    chat_template: bool = False
    #: score the test split at the end (a search's trials do not: dev alone chooses, and the search scores its
    #: Pareto set on test once, after the trials)
    score_test: bool = True
    #: stop after the first dev evaluation a run that has not started to learn (status "hopeless"; see
    #: peftlab.train.baseline.hopeless)
    stop_hopeless: bool = False
    #: with ``stop_hopeless``, look at the run once this fraction of its budget is spent when its first evaluation
    #: comes later (on a sample of the dev split: cheap; a run that looks hopeless there gets a full evaluation,
    #: which decides), so that a one-evaluation trial is not trained to its end before it can be stopped. At a
    #: quarter, slow learners were stopped (benchmarks/hopeless_check.py)
    hopeless_check: float = 0.5
    #: reuse the hidden states entering the lowest layer the spec touches, computed once per example with the layers
    #: below in eval mode (so without their dropout); encoder models only (peftlab.train.frozen)
    cache_frozen: bool = False
    #: the byte budget of those states in MB (a search worker's trials share it); examples beyond it are computed
    #: on the fly
    cache_frozen_mb: float = 512.0
    #: EVA: the training batches whose inputs give the components (read once, before the first step)
    init_batches: int = 8
    #: LoRA+ (Hayou et al. 2024): LoRA's B matrices train at this multiple of the learning rate (the paper: 16;
    #: None: the same rate as A)
    loraplus_ratio: float | None = None
    #: adamw, or galore: GaLore's AdamW (Zhao et al. 2024) projecting the gradients of weight matrices wider than
    #: galore_rank on both sides to that rank, the projection renewed every galore_update_gap steps, the update
    #: scaled by galore_scale (the paper's 128, 200, 0.25)
    optimizer: str = "adamw"
    galore_rank: int = 128
    galore_update_gap: int = 200
    galore_scale: float = 0.25
    #: a saved peftlab adapter whose tensors start this run's adapter (SPoT: ``--method prompt --init-from`` a prompt
    #: trained on another task); the shapes must match, the task head is not copied
    init_from: str | None = None

    def check(self) -> None:
        budgets = [b for b in (self.max_steps, self.fraction) if b is not None]
        if len(budgets) > 1:
            raise PeftlabError("give one budget: --max-steps or --fraction (with --epochs as the full run)")
        if self.max_steps is not None and self.max_steps < 1:
            raise PeftlabError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise PeftlabError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.output is not None and Path(self.output).exists() and not Path(self.output).is_dir():
            raise PeftlabError(f"--output '{self.output}' is a file; give a folder for the run (nothing was changed)")
        if not 0 < self.hopeless_check <= 1:
            raise PeftlabError(f"hopeless_check must be in (0, 1], got {self.hopeless_check}")
        if self.epochs <= 0:
            raise PeftlabError(f"epochs must be > 0, got {self.epochs}")
        for name in (
            "batch_size", "grad_accum", "max_length", "eval_batch_size", "eval_every", "patience", "max_new_tokens",
            "init_batches", "galore_rank", "galore_update_gap",
        ):  # fmt: skip
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
        if self.loraplus_ratio is not None and not (math.isfinite(self.loraplus_ratio) and self.loraplus_ratio > 0):
            raise PeftlabError(f"loraplus_ratio must be a number > 0 (the LoRA+ paper's 16), got {self.loraplus_ratio}")
        if self.optimizer not in ("adamw", "galore"):
            raise PeftlabError(f"optimizer must be adamw or galore, got {self.optimizer!r}")
        if not (math.isfinite(self.galore_scale) and self.galore_scale > 0):
            raise PeftlabError(f"galore_scale must be a number > 0, got {self.galore_scale}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise PeftlabError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            raise PeftlabError(f"--init-from '{self.init_from}' is not a folder (give a saved adapter's folder)")
        if not (math.isfinite(self.cache_frozen_mb) and self.cache_frozen_mb >= 0):
            raise PeftlabError(f"cache_frozen_mb must be a number >= 0, got {self.cache_frozen_mb}")
        if self.eval_metric not in ("exact", "rouge", "loss"):
            raise PeftlabError(f"eval_metric must be exact, rouge or loss, got {self.eval_metric!r}")
        if self.select_by not in ("loss", "metric"):
            raise PeftlabError(f"select_by must be loss or metric, got {self.select_by!r}")
        if self.generate_every < 0:
            raise PeftlabError(f"generate_every must be >= 0 (0: only at the end), got {self.generate_every}")
        if self.messages_column and (self.prompt_column or self.response_column):
            raise PeftlabError("give either --messages-column or --prompt-column/--response-column, not both")
        check_quantize(self.quantize)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise PeftlabError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.precision != "fp32" and not torch.cuda.is_available():
            raise PeftlabError(f"{self.precision} needs a CUDA GPU; on the CPU use fp32")


@dataclass
class RunRecord:
    """The JSON record every run writes (``evaluations``: per evaluation the step, the mean training loss
    since the previous evaluation and the dev metrics). ``status``: completed, early-stopped, hopeless (stopped
    after its first evaluation, ``message`` says why) or diverged; ``test`` is None when not scored."""

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
    #: seconds spent reading the splits (data_s), loading the backbone and applying the spec (setup_s), encoding
    #: examples (tokenize_s), in training steps (train_s), evaluating (eval_s) and writing checkpoints
    #: (checkpoint_s), and, with ``cache_frozen``, gathering the cached states of the layers below the spec
    #: (cache_s: lookups, and the forward passes that compute the states not cached yet): what a search trial
    #: spends besides training shows here
    timings: dict[str, float] = field(default_factory=dict)
    #: with ``cache_frozen``: the layer the cached states enter (0: nothing cached, the spec acts below the first
    #: layer), the module that decided it, and the examples found (hits), computed (misses), kept, over the budget
    cache: dict[str, Any] | None = None
    #: generative tasks: a few dev prompts with the final model's greedy generation and the reference, and the
    #: examples whose prompt or response max_length cut
    samples: list[dict[str, str]] | None = None
    cut: dict[str, int] | None = None

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))
