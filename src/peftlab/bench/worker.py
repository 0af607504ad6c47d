"""One measurement, in the worker process: ``python -m peftlab.bench --worker JOB`` runs a :class:`Job` and
prints its result as one JSON line, so that each measurement's peak memory is its own."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from peftlab import optional
from peftlab.backbone.zoo import load_model
from peftlab.bench.batch import count_tokens, measured_batches
from peftlab.bench.profile import profile_ms
from peftlab.core.peft_model import apply
from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError
from peftlab.memory import current_rss, peak_rss
from peftlab.train import TrainConfig, train
from peftlab.train.frozen import FrozenCache, FrozenPrefix
from peftlab.train.tasks import get_task

KINDS = ("train", "infer", "merged", "score")


@dataclass
class Job:
    """What one fresh process measures; it travels to the worker as JSON."""

    kind: str  # train | infer | merged | score
    impl: str  # peftlab | peft
    method: str  # the row's label
    model: str
    head: str
    batch: int
    seq: int
    repeats: int
    warmup: int
    threads: int
    device: str
    dtype: str
    seed: int
    spec: dict[str, Any] | None = None  # what the row measures; None: the frozen floor
    peft_config: dict[str, Any] | None = None
    task: str | None = None
    data_dir: str | None = None
    score_steps: int | None = None
    round: int = 0
    response: int | None = None  # generative batches: response tokens after each prompt (bench.batch.padded_batch)
    accumulate: int = 1  # microbatches per optimiser step
    protocol: str | None = None  # "survey": real SuperGLUE microbatches (bench.survey)
    quantize: str | None = None  # "nf4" / "int8": the base's block linears quantized
    profile: bool = False  # also profile the forward + backward (bench.profile) after the timed iterations
    cache_frozen: bool = False  # train steps from the frozen-prefix cache (train.frozen), filled before the timings

    @property
    def label(self) -> str:
        return f"{self.method} {self.kind}" + (" (peft)" if self.impl == "peft" else "")


def _feeder(model: nn.Module, job: Job) -> Callable[[dict[str, torch.Tensor]], AbstractContextManager]:
    """What each forward of a training job runs inside: the frozen-prefix cache's ``feeding`` for a cached job (its
    states filled for every batch first, so the timings see the steady state of the second epoch on), else nothing."""
    if not job.cache_frozen:
        return lambda batch: nullcontext()
    prefix = FrozenPrefix(model, FrozenCache(), budget_mb=1e9)  # every batch kept: the measured batches are few
    if not prefix.active:
        raise PeftlabError(f"{job.method}: the frozen-prefix cache has nothing to skip ({prefix.where} is in layer 0)")
    return prefix.feeding


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _autocast(job: Job) -> AbstractContextManager:
    return torch.autocast(job.device, dtype=torch.bfloat16) if job.dtype == "bf16" else nullcontext()


def _build(job: Job, device: torch.device) -> nn.Module:
    """The backbone with the method attached by peftlab or by the peft library (same seed: same weights), or for
    the floor the backbone frozen whole."""
    torch.manual_seed(job.seed)
    model = load_model(job.model, head=job.head, seed=job.seed, quantize=job.quantize)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    if job.impl == "peft":
        peft = optional.require("peft", "measuring the peft library")
        model = peft.get_peft_model(model, peft.get_peft_config(dict(job.peft_config)))
    elif job.spec is None:
        _freeze_to_embeddings(model)
    else:
        model = apply(model, Spec.from_dict(job.spec))
    return model.to(device)


def _freeze_to_embeddings(model: nn.Module) -> None:
    """The floor: every weight frozen, and the input embeddings' output made to need a gradient, so the backward
    runs through every block's activations (the least any method that trains inside the backbone pays) and computes
    no weight gradient. Every stack's embedding: T5's encoder and decoder each hold their own module (sharing the
    weight), not the model's ``shared``."""
    model.requires_grad_(False)
    stacks = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    for embedding in {id(e): e for e in (m.get_input_embeddings() for m in stacks)}.values():
        embedding.register_forward_hook(_needs_grad)


def _needs_grad(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.requires_grad_() if torch.is_grad_enabled() else out


def _memory(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"current": torch.cuda.memory_allocated(device), "peak": torch.cuda.max_memory_allocated(device)}
    return {"current": current_rss(), "peak": peak_rss()}


def _time_rounds(
    calls: dict[str, Callable[[], float | None]], job: Job, device: torch.device
) -> dict[str, list[float]]:
    """Time each call once per iteration, alternating their order; warm-up iterations are dropped.

    A call may return a time of its own (a part of it); those go under ``<name>_part``."""
    names = list(calls)
    out: dict[str, list[float]] = {}
    gc.collect()
    gc.freeze()  # the libraries' objects never die: keep them out of the collections before each call
    for i in range(job.warmup + job.repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            gc.collect()
            gc.disable()
            try:
                t0 = _now(device)
                part = calls[name]()
                dt = _now(device) - t0
            finally:
                gc.enable()
            if i >= job.warmup:
                out.setdefault(name, []).append(dt)
                if part is not None:
                    out.setdefault(f"{name}_part", []).append(part)
    return out


def measure(job: Job) -> dict[str, Any]:
    """Run one job in this process and return its raw numbers (times in seconds, memory in bytes)."""
    torch.set_num_threads(job.threads)
    if job.kind == "score":
        return _score(job)
    device = torch.device(job.device)
    model = _build(job, device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in measured_batches(job, model)]
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "job": asdict(job),
        "tokens": sum(count_tokens(b) for b in batches),
        "padded_tokens": sum(b["attention_mask"].numel() for b in batches),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if job.kind == "train":
        out |= _train(model, batches, job, device)
    else:
        out |= _infer(model, batches, job, device)
    return out


def _train(model: nn.Module, batches: list[dict[str, torch.Tensor]], job: Job, device: torch.device) -> dict[str, Any]:
    """Training steps (forward + backward of each microbatch, then AdamW step + zero_grad) alternating with no-grad
    forwards of the same microbatches in the same mode, so step / forward compares like with like."""
    model.train()
    # A tiny learning rate: the weights barely move, so every step does the same arithmetic. The floor has nothing to
    # train: no optimiser.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6) if params else None
    feeding = _feeder(model, job)
    for batch in batches:  # a cached job's states, computed once (keyed by autocast too)
        with _autocast(job), feeding(batch):
            pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = _memory(device)

    def forward_backward() -> None:
        for batch in batches:
            with _autocast(job), feeding(batch):
                loss = model(**batch).loss / len(batches)
            loss.backward()

    def step() -> float:
        t0 = _now(device)
        forward_backward()
        t1 = _now(device)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return t1 - t0

    def forward() -> None:
        with torch.no_grad(), _autocast(job):
            for batch in batches:
                with feeding(batch):
                    model(**batch)

    times = _time_rounds({"step": step, "forward": forward}, job, device)
    end = _memory(device)

    def profiled_pass() -> None:  # the optimiser left out: what the cost model predicts
        forward_backward()
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    profiled = {"profile_ms": profile_ms(profiled_pass, job.repeats, device)} if job.profile else {}
    return profiled | {
        "step_s": times["step"],
        "fwd_bwd_s": times["step_part"],
        "forward_s": times["forward"],
        "loaded_bytes": loaded["current"],
        "load_peak_bytes": loaded["peak"],
        "peak_bytes": end["peak"],
    }


def _infer(model: nn.Module, batches: list[dict[str, torch.Tensor]], job: Job, device: torch.device) -> dict[str, Any]:
    """Eval-mode forwards under inference_mode, after ``merge()`` for the merged kind."""
    model.eval()
    if job.kind == "merged":
        model.merge()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = _memory(device)

    def forward() -> None:
        with torch.inference_mode(), _autocast(job):
            for batch in batches:
                model(**batch)

    times = _time_rounds({"forward": forward}, job, device)
    return {
        "forward_s": times["forward"],
        "loaded_bytes": loaded["current"],
        "load_peak_bytes": loaded["peak"],
        "peak_bytes": _memory(device)["peak"],
    }


def _score(job: Job) -> dict[str, Any]:
    """A short training run's test score (the official dev set), via the ordinary training loop."""
    config = TrainConfig(
        model=job.model,
        task=job.task,
        data_dir=job.data_dir,
        max_steps=job.score_steps,
        batch_size=job.batch,
        max_length=job.seq,
        seed=job.seed,
        progress=False,
        precision="bf16" if job.dtype == "bf16" and job.device == "cuda" else "fp32",
    )
    record = train(Spec.from_dict(job.spec), config)
    main = get_task(job.task).main_metric
    return {
        "pid": os.getpid(),
        "job": asdict(job),
        "status": record.status,
        "steps": record.steps,
        "metric": main,
        "score": (record.test or {}).get(main),
        "test": record.test,
        "wall_time_s": record.wall_time_s,
    }


def worker_main(argv: list[str]) -> int:
    """``python -m peftlab.bench --worker JOB_JSON``: print the job's result as one JSON line."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m peftlab.bench --worker JOB_JSON", file=sys.stderr)
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        result = measure(Job(**json.loads(argv[1])))
    except PeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def run_worker(job: Job) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process; a failure comes back as ``{"error": last stderr line}``."""
    env = os.environ | {
        "OMP_NUM_THREADS": str(job.threads),
        "MKL_NUM_THREADS": str(job.threads),
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if job.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the score run's training loop would otherwise pick a GPU
    proc = subprocess.run(
        [sys.executable, "-m", "peftlab.bench", "--worker", json.dumps(asdict(job))],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        error = err[-1].removeprefix("error: ") if err else f"worker exited with status {proc.returncode}"
        return {"job": asdict(job), "error": error}
    return json.loads(lines[-1])
