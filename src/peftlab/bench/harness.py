"""A benchmark run: plan every method's jobs (failing early on a method the model cannot take), run them in
fresh processes in interleaved rounds, and gather the results."""

from __future__ import annotations

import hashlib
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import methods, optional
from peftlab.atomic import write_json
from peftlab.backbone.anatomy import model_type_facts
from peftlab.backbone.quant import check_quantize
from peftlab.backbone.zoo import load_model
from peftlab.bench import flops, survey
from peftlab.bench.batch import count_tokens, measured_batches
from peftlab.bench.entries import CACHED, FLOOR, FULL, Entry, check_labels, parse_methods, read_methods_file
from peftlab.bench.report import MB, environment, ratios, rows, write_outputs
from peftlab.bench.worker import Job, run_worker
from peftlab.core.counting import Counts
from peftlab.core.peft_model import apply
from peftlab.errors import PeftlabError
from peftlab.formats import interop
from peftlab.space import Backbone
from peftlab.train import frozen, input_limit
from peftlab.train.tasks import get_task


@dataclass
class BenchConfig:
    """Everything that determines a benchmark run; stored in bench.json. ``methods`` holds the ``--methods`` items as
    given (``NAME[:KEY=VALUE...]``, see :mod:`peftlab.bench.entries`); ``full=False`` leaves out the full
    fine-tuning row that is otherwise added."""

    model: str
    methods: list[str]
    output: str
    methods_file: str | None = None
    full: bool = True
    batch: int = 8
    seq: int = 128
    repeats: int = 10
    warmup: int = 2
    rounds: int = 1
    threads: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    compare_peft: bool = False
    score_steps: int | None = None
    task: str | None = None
    data_dir: str | None = None
    seed: int = 0
    #: generative batches: this many response tokens after each prompt (the loss is on them only); None: a task head
    response: int | None = None
    #: microbatches of ``batch`` per optimiser step (gradient accumulation)
    accumulate: int = 1
    #: "survey": the survey's protocol (:mod:`peftlab.bench.survey`), which sets batch, accumulate, seq and task
    protocol: str | None = None
    #: "nf4" or "int8": every row on the base with its block linears quantized (QLoRA); no full fine-tuning row and
    #: no merged inference (neither exists on a quantized base)
    quantize: str | None = None
    #: also profile each training job's forward + backward by operator category (bench.profile), after its timings
    profile: bool = False
    #: take the measurements an earlier run of the same jobs left in ``output/jobs/`` (a killed or split run) instead
    #: of measuring them again; without it, those files are replaced as the jobs run
    resume: bool = False
    #: beside every row whose modules leave the lowest layers alone, a row ``LABEL + frozen cache`` that trains from
    #: the frozen-prefix cache (encoder models; no backward or forward below the first layer the method acts on)
    cache_frozen: bool = False

    def apply_protocol(self) -> None:
        """Fill in what ``protocol`` fixes: real SuperGLUE batches of 32 in Table 3's microbatches, inputs of up to 512
        tokens, the survey's 14 methods when none are given."""
        if self.protocol is None:
            return
        if self.protocol != "survey":
            raise PeftlabError(f"unknown --protocol {self.protocol!r}; protocols: survey")
        self.task = self.task or survey.TASKS[0]
        survey.check(load_model(self.model, meta=True).config.model_type, self.task)
        self.methods = self.methods or list(survey.METHODS)
        self.batch = survey.microbatch(self.model, self.task)
        self.accumulate = survey.BATCH // self.batch
        self.seq = survey.MAX_INPUT

    def entries(self) -> list[Entry]:
        """The rows after the floor: ``--methods`` then ``--methods-file``, full fine-tuning first unless listed or
        left out. Bad items fail here, each naming itself."""
        found = parse_methods(",".join(self.methods))
        if self.methods_file is not None:
            found += read_methods_file(self.methods_file)
        check_labels(found)
        listed = any(e.label == FULL or e.method == FULL or (e.spec or {}).get("full") for e in found)
        if listed and self.quantize:
            raise PeftlabError("full fine-tuning cannot train a quantized base: leave it out of --methods")
        if self.full and not listed and not self.quantize:
            found.insert(0, Entry(label=FULL, method=FULL))
        return found

    def width(self, model: nn.Module) -> int:
        """The padded length of a batch's rows: the prompt plus, for a decoder's generative batch, its response."""
        seq2seq = getattr(model.config, "is_encoder_decoder", False)
        return self.seq + (self.response or 0 if not seq2seq else 0)

    def check(self) -> None:
        self.apply_protocol()
        check_quantize(self.quantize)
        if self.response is not None and self.response < 1:
            raise PeftlabError(f"--response must be >= 1 token, got {self.response}")
        if not self.methods and self.methods_file is None:
            every = [*methods.METHODS, *methods.MODEL_METHODS]
            raise PeftlabError(f"give at least one method (one of: {', '.join(every)})")
        self.entries()
        checked = ("batch", "seq", "repeats", "warmup", "rounds", "threads", "accumulate")
        for name, low in ((n, 0 if n == "warmup" else 2 if n == "seq" else 1) for n in checked):
            if getattr(self, name) < low:
                raise PeftlabError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda"):
            raise PeftlabError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise PeftlabError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.cache_frozen:
            kind = load_model(self.model, meta=True).config.model_type
            if model_type_facts(kind).architecture != frozen.SUPPORTED:
                raise PeftlabError(
                    f"--cache-frozen supports encoder models (the bert family: BERT, RoBERTa, MiniLM); "
                    f"{self.model} is a {model_type_facts(kind).architecture} model"
                )
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PeftlabError("--device cuda needs a CUDA GPU, and torch sees none")
        if (self.score_steps is None) != (self.task is None) and self.protocol is None:
            raise PeftlabError("--score-steps and --task go together: the score is a short training run on a task")
        if self.score_steps is not None and self.score_steps < 1:
            raise PeftlabError(f"score_steps must be >= 1, got {self.score_steps}")
        if self.task is not None:
            get_task(self.task)  # an unknown task fails here, with the list of tasks
        needed = ["matplotlib"] + (["peft"] if self.compare_peft else [])  # the plot; the peft contenders
        missing = [name for name in needed if not optional.available(name)]
        if missing:
            raise PeftlabError(f"peftlab bench needs {' and '.join(missing)}: pip install 'peftlab[bench]'")

    def command(self) -> str:
        """The exact command line that reproduces this run."""
        parts = ["peftlab", "bench", "--model", self.model]
        parts += ["--methods", ",".join(self.methods)] if self.methods else []
        parts += ["--output", self.output]
        for f in ("batch", "seq", "accumulate", "repeats", "warmup", "rounds", "threads", "device", "dtype", "seed"):
            parts += [f"--{f}", str(getattr(self, f))]
        for f in ("methods_file", "score_steps", "task", "data_dir", "response", "protocol", "quantize"):
            if getattr(self, f) is not None:
                parts += [f"--{f.replace('_', '-')}", str(getattr(self, f))]
        flags = (["--compare-peft"] if self.compare_peft else []) + ([] if self.full else ["--no-full"])
        flags += ["--profile"] if self.profile else []
        flags += ["--cache-frozen"] if self.cache_frozen else []
        flags += ["--resume"] if self.resume else []
        return shlex.join(parts + flags)


@dataclass
class MethodPlan:
    """What is known about a method before anything runs: its spec (None: the floor), counts, predicted step FLOPs
    (or why there is no prediction) and what to measure."""

    spec: dict[str, Any] | None
    counts: dict[str, Any]
    mergeable: bool
    flops: dict[str, float] | None = None
    flops_note: str | None = None
    peft_config: dict[str, Any] | None = None
    peft_note: str | None = None
    jobs: list[Job] = field(default_factory=list)


def plan(config: BenchConfig) -> tuple[dict[str, Any], dict[str, MethodPlan]]:
    """Model facts and, per method, its counts (meta device) and the jobs of one round.

    Every spec is applied here first, so a method the model cannot take fails before any process starts."""
    probe = load_model(config.model, meta=True)
    facts_of = model_type_facts(probe.config.model_type)
    if config.response and facts_of.architecture == "encoder":
        raise PeftlabError(f"--response needs a model that generates; {config.model} is an encoder")
    head = facts_of.default_head if config.response else facts_of.task_head
    limit = input_limit(probe, sys.maxsize)  # the position table, or no limit
    base = dict(
        model=config.model,
        head=head,
        batch=config.batch,
        seq=config.seq,
        repeats=config.repeats,
        warmup=config.warmup,
        threads=config.threads,
        device=config.device,
        dtype=config.dtype,
        seed=config.seed,
        response=config.response,
        accumulate=config.accumulate,
        protocol=config.protocol,
        quantize=config.quantize,
        profile=config.profile,
        **({"task": config.task, "data_dir": config.data_dir} if config.protocol else {}),
    )
    plans: dict[str, MethodPlan] = {FLOOR: _floor_plan(config, head, base)}
    for entry in config.entries():
        probe_model = load_model(config.model, head=head, meta=True)
        spec = entry.make(probe_model)
        pm = apply(probe_model, spec)
        extra = spec.added_length()
        if config.seq + (config.response or 0) + extra > limit:
            raise PeftlabError(
                f"--seq {config.seq}{f' plus the {extra} prompt tokens' if extra else ''} exceeds "
                f"the {limit} positions of {config.model}; use a smaller --seq"
            )
        mergeable = any(m.mergeable for _, m in pm.adapters[pm.active_adapter].peft_modules())
        predicted, note = _modelled(config, *flops.predict(pm, config.batch, config.width(probe)))
        p = MethodPlan(
            spec=spec.to_dict(),
            counts=pm.counts().to_dict(),
            mergeable=mergeable,
            flops=asdict(predicted) if predicted else None,
            flops_note=note,
        )
        if config.compare_peft:
            p.peft_config, p.peft_note = interop.peft_equivalent(pm)
        for kind in ("train", "infer", "merged"):
            if kind == "merged" and (not mergeable or config.quantize):
                continue
            p.jobs.append(Job(kind=kind, impl="peftlab", method=entry.label, spec=p.spec, **base))
            if p.peft_config is not None and kind != "merged":
                p.jobs.append(
                    Job(kind=kind, impl="peft", method=entry.label, spec=p.spec, peft_config=p.peft_config, **base)
                )
        plans[entry.label] = p
        if config.cache_frozen and entry.label != FULL:
            cached = _cached_plan(config, pm, p, entry.label, base)
            if cached is not None:
                plans[cached.jobs[0].method] = cached
    facts = {
        "model_class": type(probe).__name__,
        "head": head,
        "backbone_params": plans[FLOOR].counts["backbone_params"],
    }
    step = measured_batches(config, probe)
    facts |= {
        "tokens": sum(count_tokens(b) for b in step),
        "padded_tokens": sum(b["attention_mask"].numel() for b in step),
        "lengths": [n for b in step for n in b["attention_mask"].sum(1).tolist()],
        "widths": [b["attention_mask"].shape[1] for b in step],
    }
    return facts, plans


def _cached_plan(config: BenchConfig, pm: Any, plan: MethodPlan, label: str, base: dict[str, Any]) -> MethodPlan | None:
    """The row of ``label`` trained from the frozen-prefix cache: a training job only (inference is unchanged), its
    own FLOP prediction; None where the method acts on the first layer (nothing to skip)."""
    if flops.lowest_layer(pm, backward=False) == 0:
        return None
    predicted, note = _modelled(config, *flops.predict(pm, config.batch, config.width(pm), cached=True))
    name = CACHED.format(label)
    return MethodPlan(
        spec=plan.spec,
        counts=plan.counts,
        mergeable=False,
        flops=asdict(predicted) if predicted else None,
        flops_note=note,
        jobs=[Job(kind="train", impl="peftlab", method=name, spec=plan.spec, cache_frozen=True, **base)],
    )


def _modelled(config: BenchConfig, predicted: Any, note: str | None) -> tuple[Any, str | None]:
    """The cost model's prediction, which assumes equal rows (with accumulation, the same batch again: the ratios to
    the floor stay): none for the survey's real batches."""
    if config.protocol is not None:
        return None, "not modelled for the survey protocol's real batches (microbatches of different widths)"
    return predicted, note


def _floor_plan(config: BenchConfig, head: str, base: dict[str, Any]) -> MethodPlan:
    """The frozen floor: no adapter (every count 0), its FLOPs, a training and an inference job (``spec=None``)."""
    backbone = Backbone(load_model(config.model, head=head, meta=True))
    predicted, note = _modelled(config, *flops.predict_floor(backbone, config.batch, config.width(backbone.model)))
    return MethodPlan(
        spec=None,
        counts=Counts(backbone_params=backbone.params, method=FLOOR).to_dict(),
        mergeable=False,
        flops=asdict(predicted) if predicted else None,
        flops_note=note,
        jobs=[Job(kind=kind, impl="peftlab", method=FLOOR, spec=None, **base) for kind in ("train", "infer")],
    )


def run(config: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plan, run every job in a fresh process (the job list reversed on odd rounds, so peftlab and peft
    alternate which goes first), then write bench.md / .csv / .json / .png under ``config.output``."""
    config.check()
    log = log or (lambda s: print(s, file=sys.stderr))
    started = datetime.now(UTC)
    facts, plans = plan(config)
    jobs = [j for p in plans.values() for j in p.jobs]
    queue = [
        Job(**{**asdict(j), "round": r}) for r in range(config.rounds) for j in (jobs if r % 2 == 0 else jobs[::-1])
    ]
    if config.score_steps is not None:  # first: missing task data shows at once, not after the timings
        queue[:0] = [
            Job(
                **{
                    **asdict(jobs[0]),
                    "kind": "score",
                    "method": label,
                    "spec": p.spec,
                    "task": config.task,
                    "data_dir": config.data_dir,
                    "score_steps": config.score_steps,
                }
            )
            for label, p in plans.items()
            if p.spec is not None  # the floor trains nothing
        ]
    t0 = time.perf_counter()
    runs, resumed = [], 0
    folder = Path(config.output) / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(queue, 1):
        path = folder / f"{_job_key(job)}.json"
        earlier = json.loads(path.read_text()) if config.resume and path.is_file() else None
        if earlier is not None:
            result, resumed = earlier, resumed + 1
        else:
            result = run_worker(job)
            if "error" not in result:  # a failed measurement is tried again by a resumed run
                write_json(path, result)
        runs.append(result)
        log(
            f"[{i}/{len(queue)}] {job.label}"
            + (f" (round {job.round + 1})" if config.rounds > 1 else "")
            + f": {_brief(result)}"
            + (" (measured by an earlier run)" if earlier is not None else "")
        )
    report = {
        "command": config.command(),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "resumed": resumed,
        "environment": environment(config.threads, config.device),
        "config": asdict(config),
        "setup": facts,
        "methods": {m: {k: v for k, v in asdict(p).items() if k != "jobs"} for m, p in plans.items()},
        "runs": runs,
    }
    report["rows"] = rows(report)
    report["ratios"] = ratios(report["rows"]) if config.compare_peft else {}
    report["failures"] = [f"{Job(**r['job']).label}: {r['error']}" for r in runs if "error" in r]
    write_outputs(report, Path(config.output))
    if report["failures"]:
        raise PeftlabError(
            f"{len(report['failures'])} of {len(runs)} measurements failed (first: "
            f"{report['failures'][0]}); the others are in {config.output}/bench.md"
        )
    return report


def _job_key(job: Job) -> str:
    """A job's file name under ``output/jobs/``: a digest of everything it measures (round included), so a resumed
    run takes only measurements of exactly its jobs."""
    return hashlib.sha256(json.dumps(asdict(job), sort_keys=True).encode()).hexdigest()[:20]


def _brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    if "score" in result:
        return f"{result['metric']} {result['score']:.4f}" if result["score"] is not None else result["status"]
    tok = result["tokens"]
    key = "step_s" if "step_s" in result else "forward_s"
    return f"{tok / statistics.median(result[key]):,.0f} tok/s, peak {result['peak_bytes'] / MB:,.0f} MB"
