"""Head-to-head efficiency of PEFT methods, as in the survey's Table 5 (Lialin et al., section 11.3).

For each method: trainable / stored / changed parameters (counted on the meta device), peak memory while
training, training and inference throughput in non-padding input tokens per second (inference unmerged
and, where the method has mergeable modules, merged), and the training step's time over the forward time
of the same batch. Optionally the peft library's equivalent of each method is measured in the same run,
and a short training run gives each method a test score.

Every measurement runs in a fresh process (``python -m peftlab.bench --worker JOB``, one JSON line back)
so that its peak memory is its own: on the CPU the process's peak resident set (``ru_maxrss``), reported
with the resident set of the loaded model it started from; on CUDA ``torch.cuda.max_memory_allocated``.
Warm-up iterations are not timed; every statistic is the median with its interquartile range.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import interop, methods
from peftlab.anatomy import model_type_facts
from peftlab.atomic import write_with
from peftlab.errors import PeftlabError
from peftlab.memory import current_rss, peak_rss

KINDS = ("train", "infer", "merged", "score")
MB = 2**20


# -- statistics -------------------------------------------------------------------------------------------
def summarize(xs: list[float]) -> dict[str, float]:
    """Median, quartiles (linear interpolation), IQR, min and max; one value is its own quartiles."""
    if not xs:
        raise ValueError("no values to summarize")
    q25, med, q75 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "min": min(xs), "max": max(xs), "n": len(xs)}


# -- the batch --------------------------------------------------------------------------------------------
def padded_batch(config: Any, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of random ids: row lengths drawn from [seq/4, seq], the first row full, so the
    padded width is ``seq`` and a fair share of it is padding that throughput must not count."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), generator=g)
    lengths[0] = seq
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g)  # ids 0-2 hold pad/special tokens
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    out = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False):
        out["labels"] = torch.randint(3, config.vocab_size, (batch, 2), generator=g)
    else:
        out["labels"] = torch.randint(0, config.num_labels, (batch,), generator=g)
    return out


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens: what a throughput in tokens/s counts (padding is wasted work, not work)."""
    return int(batch["attention_mask"].sum())


# -- one measurement (runs in the worker process) ---------------------------------------------------------------
@dataclass
class Job:
    """What one fresh process measures; it travels to the worker as JSON."""

    kind: str  # train | infer | merged | score
    impl: str  # peftlab | peft
    method: str
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
    peft_config: dict[str, Any] | None = None
    task: str | None = None
    data_dir: str | None = None
    score_steps: int | None = None
    round: int = 0

    @property
    def label(self) -> str:
        return f"{self.method} {self.kind}" + (" (peft)" if self.impl == "peft" else "")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _autocast(job: Job) -> AbstractContextManager:
    return torch.autocast(job.device, dtype=torch.bfloat16) if job.dtype == "bf16" else nullcontext()


def _build(job: Job, device: torch.device) -> nn.Module:
    """The backbone with the method attached by peftlab or by the peft library (same seed: same weights)."""
    from peftlab.peft_model import apply
    from peftlab.zoo import load_model

    torch.manual_seed(job.seed)
    model = load_model(job.model, head=job.head, seed=job.seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    if job.impl == "peft":
        from peft import get_peft_config, get_peft_model

        model = get_peft_model(model, get_peft_config(dict(job.peft_config)))
    else:
        model = apply(model, methods.for_model(job.method, model))
    return model.to(device)


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
    batch = {k: v.to(device) for k, v in padded_batch(model.config, job.batch, job.seq, job.seed + 1).items()}
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "job": asdict(job),
        "tokens": count_tokens(batch),
        "padded_tokens": batch["attention_mask"].numel(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if job.kind == "train":
        out |= _train(model, batch, job, device)
    else:
        out |= _infer(model, batch, job, device)
    return out


def _train(model: nn.Module, batch: dict[str, torch.Tensor], job: Job, device: torch.device) -> dict[str, Any]:
    """Training steps (forward + backward + AdamW step + zero_grad) alternating with no-grad forwards of the
    same batch in the same mode, so step / forward compares like with like."""
    model.train()
    # A tiny learning rate: the weights barely move, so every step does the same arithmetic.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = _memory(device)

    def step() -> float:
        t0 = _now(device)
        with _autocast(job):
            loss = model(**batch).loss
        loss.backward()
        t1 = _now(device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1 - t0

    def forward() -> None:
        with torch.no_grad(), _autocast(job):
            model(**batch)

    times = _time_rounds({"step": step, "forward": forward}, job, device)
    end = _memory(device)
    return {
        "step_s": times["step"],
        "fwd_bwd_s": times["step_part"],
        "forward_s": times["forward"],
        "loaded_bytes": loaded["current"],
        "load_peak_bytes": loaded["peak"],
        "peak_bytes": end["peak"],
    }


def _infer(model: nn.Module, batch: dict[str, torch.Tensor], job: Job, device: torch.device) -> dict[str, Any]:
    """Eval-mode forwards under inference_mode, after ``merge()`` for the merged kind."""
    model.eval()
    if job.kind == "merged":
        model.merge()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loaded = _memory(device)

    def forward() -> None:
        with torch.inference_mode(), _autocast(job):
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
    from peftlab.tasks import get_task
    from peftlab.train import TrainConfig, train

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
    record = train(methods.for_model(job.method, job.model), config)
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


# -- the run ----------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """Everything that determines a benchmark run; stored in bench.json."""

    model: str
    methods: list[str]
    output: str
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

    def check(self) -> None:
        if not self.methods:
            every = [*methods.METHODS, *methods.MODEL_METHODS]
            raise PeftlabError(f"give at least one method (one of: {', '.join(every)})")
        for m in self.methods:
            if m not in methods.MODEL_METHODS:
                methods.get(m)  # unknown names fail here, with the list of methods
        if len(set(self.methods)) != len(self.methods):
            raise PeftlabError(f"a method is listed twice in {','.join(self.methods)}")
        for name, low in (("batch", 1), ("seq", 2), ("repeats", 1), ("warmup", 0), ("rounds", 1), ("threads", 1)):
            if getattr(self, name) < low:
                raise PeftlabError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.device not in ("cpu", "cuda"):
            raise PeftlabError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise PeftlabError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise PeftlabError("--device cuda needs a CUDA GPU, and torch sees none")
        if (self.score_steps is None) != (self.task is None):
            raise PeftlabError("--score-steps and --task go together: the score is a short training run on a task")
        if self.score_steps is not None and self.score_steps < 1:
            raise PeftlabError(f"score_steps must be >= 1, got {self.score_steps}")
        if self.task is not None:
            from peftlab.tasks import get_task

            get_task(self.task)  # an unknown task fails here, with the list of tasks
        needed = ["matplotlib"] + (["peft"] if self.compare_peft else [])  # the plot; the peft contenders
        missing = [name for name in needed if importlib.util.find_spec(name) is None]
        if missing:
            raise PeftlabError(f"peftlab bench needs {' and '.join(missing)}: pip install 'peftlab[bench]'")

    def command(self) -> str:
        """The exact command line that reproduces this run."""
        parts = [
            "peftlab",
            "bench",
            "--model",
            self.model,
            "--methods",
            ",".join(self.methods),
            "--output",
            self.output,
        ]
        for f in ("batch", "seq", "repeats", "warmup", "rounds", "threads", "device", "dtype", "seed"):
            parts += [f"--{f}", str(getattr(self, f))]
        for f in ("score_steps", "task", "data_dir"):
            if getattr(self, f) is not None:
                parts += [f"--{f.replace('_', '-')}", str(getattr(self, f))]
        return shlex.join(parts + (["--compare-peft"] if self.compare_peft else []))


@dataclass
class MethodPlan:
    """What is known about a method before anything runs: its counts and what to measure."""

    counts: dict[str, Any]
    mergeable: bool
    peft_config: dict[str, Any] | None = None
    peft_note: str | None = None
    jobs: list[Job] = field(default_factory=list)


def plan(config: BenchConfig) -> tuple[dict[str, Any], dict[str, MethodPlan]]:
    """Model facts and, per method, its counts (meta device) and the jobs of one round.

    Every spec is applied here first, so a method the model cannot take fails before any process starts."""
    from peftlab.peft_model import apply
    from peftlab.train import input_limit
    from peftlab.zoo import load_model

    probe = load_model(config.model, meta=True)
    head = model_type_facts(probe.config.model_type).task_head
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
    )
    plans: dict[str, MethodPlan] = {}
    for name in config.methods:
        probe_model = load_model(config.model, head=head, meta=True)
        pm = apply(probe_model, methods.for_model(name, probe_model))
        spec = pm.adapters[pm.active_adapter].spec
        extra = spec.added_length()
        if config.seq + extra > limit:
            raise PeftlabError(
                f"--seq {config.seq}{f' plus the {extra} prompt tokens' if extra else ''} exceeds "
                f"the {limit} positions of {config.model}; use a smaller --seq"
            )
        mergeable = any(m.mergeable for _, m in pm.adapters[pm.active_adapter].peft_modules())
        p = MethodPlan(counts=pm.counts().to_dict(), mergeable=mergeable)
        if config.compare_peft:
            p.peft_config, p.peft_note = interop.peft_equivalent(pm)
        for kind in ("train", "infer", "merged"):
            if kind == "merged" and not mergeable:
                continue
            p.jobs.append(Job(kind=kind, impl="peftlab", method=name, **base))
            if p.peft_config is not None and kind != "merged":
                p.jobs.append(Job(kind=kind, impl="peft", method=name, peft_config=p.peft_config, **base))
        plans[name] = p
    facts = {
        "model_class": type(probe).__name__,
        "head": head,
        "backbone_params": next(iter(plans.values())).counts["backbone_params"],
    }
    batch = padded_batch(probe.config, config.batch, config.seq, config.seed + 1)
    facts |= {
        "tokens": count_tokens(batch),
        "padded_tokens": batch["attention_mask"].numel(),
        "lengths": batch["attention_mask"].sum(1).tolist(),
    }
    return facts, plans


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
                    "method": m,
                    "task": config.task,
                    "data_dir": config.data_dir,
                    "score_steps": config.score_steps,
                }
            )
            for m in config.methods
        ]
    t0 = time.perf_counter()
    runs = []
    for i, job in enumerate(queue, 1):
        result = run_worker(job)
        runs.append(result)
        log(
            f"[{i}/{len(queue)}] {job.label}"
            + (f" (round {job.round + 1})" if config.rounds > 1 else "")
            + f": {_brief(result)}"
        )
    report = {
        "command": config.command(),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "environment": environment(config),
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


def _brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    if "score" in result:
        return f"{result['metric']} {result['score']:.4f}" if result["score"] is not None else result["status"]
    tok = result["tokens"]
    key = "step_s" if "step_s" in result else "forward_s"
    return f"{tok / statistics.median(result[key]):,.0f} tok/s, peak {result['peak_bytes'] / MB:,.0f} MB"


# -- aggregation ------------------------------------------------------------------------------------------------
def _pooled(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [x for r in runs for x in r[key]]


def _paired(runs: list[dict[str, Any]], num: str, den: str) -> list[float]:
    return [a / b for r in runs for a, b in zip(r[num], r[den], strict=True)]


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _put(row: dict[str, Any], name: str, xs: list[float], scale: float = 1.0) -> None:
    """Median, q25 and q75 of ``xs`` (times ``scale``) into row columns ``name``, ``name_q25``, ``name_q75``."""
    s = summarize(xs) if xs else None
    for suffix, key in (("", "median"), ("_q25", "q25"), ("_q75", "q75")):
        row[name + suffix] = s[key] * scale if s else None


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (method, implementation): the table of bench.csv and bench.md."""
    backbone = report["setup"]["backbone_params"]
    ok = [r for r in report["runs"] if "error" not in r]
    out = []
    for method, info in report["methods"].items():
        counts = info["counts"]
        for impl in ("peftlab", "peft"):
            mine = {
                k: [
                    r for r in ok if r["job"]["method"] == method and r["job"]["impl"] == impl and r["job"]["kind"] == k
                ]
                for k in KINDS
            }
            if impl == "peft" and info["peft_config"] is None:
                continue
            measured = next((r["trainable_params"] for k in ("train", "infer") for r in mine[k]), None)
            trainable = counts["trainable_params"] if impl == "peftlab" else measured
            row: dict[str, Any] = {
                "method": method,
                "impl": impl,
                "trainable_params": trainable,
                "trainable_pct": 100.0 * trainable / backbone if trainable is not None else None,
                "stored_params": counts["stored_params"] if impl == "peftlab" else None,
                "changed_params": counts["changed_params"] if impl == "peftlab" else None,
                "measured_trainable_params": measured,
            }
            train, infer, merged = mine["train"], mine["infer"], mine["merged"]
            for name in ("peak", "loaded"):
                row[f"{name}_mb"] = _median(train, f"{name}_bytes") / MB if train else None
            row["increase_mb"] = row["peak_mb"] - row["loaded_mb"] if train else None
            tokens = (train or infer or merged or [{"tokens": 0}])[0]["tokens"]
            _put(row, "train_tok_s", [tokens / t for t in _pooled(train, "step_s")])
            _put(row, "step_ms", _pooled(train, "step_s"), 1e3)
            _put(row, "train_forward_ms", _pooled(train, "forward_s"), 1e3)
            _put(row, "step_over_forward", _paired(train, "step_s", "forward_s"))
            _put(row, "fwd_bwd_over_forward", _paired(train, "fwd_bwd_s", "forward_s"))
            _put(row, "infer_tok_s", [tokens / t for t in _pooled(infer, "forward_s")])
            _put(row, "merged_tok_s", [tokens / t for t in _pooled(merged, "forward_s")])
            row["n_train"], row["n_infer"] = len(_pooled(train, "step_s")), len(_pooled(infer, "forward_s"))
            score = mine["score"][0] if mine["score"] else None
            for col in ("score", "metric", "status"):
                row[f"score_{col}" if col != "score" else col] = score[col] if score else None
            out.append(row)
    full = next((r for r in out if r["method"] == "full" and r["impl"] == "peftlab"), None)
    for row in out:
        for col in ("train", "infer"):
            ref = full[f"{col}_tok_s"] if full else None
            mine = row[f"{col}_tok_s"]
            row[f"{col}_pct_of_full"] = 100.0 * mine / ref if ref and mine is not None else None
    return out


def ratios(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """peftlab / peft per method: ratio of medians and a conservative range (q25/q75 .. q75/q25)."""
    by = {(r["method"], r["impl"]): r for r in table}
    out: dict[str, dict[str, Any]] = {}
    for (method, impl), lab in by.items():
        ref = by.get((method, "peft"))
        if impl != "peftlab" or ref is None:
            continue
        entry: dict[str, Any] = {
            "trainable_peftlab": lab["trainable_params"],
            "trainable_peft": ref["trainable_params"],
        }
        for col in ("train_tok_s", "infer_tok_s"):
            a, b = lab[col], ref[col]
            ok = a is not None and b is not None
            entry[col] = a / b if ok else None
            entry[f"{col}_range"] = (
                [lab[f"{col}_q25"] / ref[f"{col}_q75"], lab[f"{col}_q75"] / ref[f"{col}_q25"]] if ok else None
            )
        for col in ("peak_mb", "increase_mb"):
            a, b = lab[col], ref[col]
            entry[col] = a / b if a is not None and b else None
        out[method] = entry
    return out


# -- environment ------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(config: BenchConfig) -> dict[str, str]:
    """The machine and library versions a reader needs to compare numbers across runs."""
    from peftlab.train import library_versions

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    env = {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable; torch threads = {config.threads}",
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
        **library_versions(),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    if config.device == "cuda":
        env["GPU"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return env


# -- outputs ----------------------------------------------------------------------------------------------------
def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def _spread(row: dict[str, Any], col: str, fmt: str = ",.0f") -> str:
    """``median (q25–q75)``."""
    if row[col] is None:
        return "–"
    return f"{format(row[col], fmt)} ({format(row[col + '_q25'], fmt)}–{format(row[col + '_q75'], fmt)})"


def markdown(report: dict[str, Any]) -> str:
    cfg, setup = report["config"], report["setup"]
    mem = "peak alloc" if cfg["device"] == "cuda" else "peak RSS"
    lines = [
        f"# PEFT efficiency on `{cfg['model']}`",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; wall time of the run: {report['wall_time_s']:.0f} s",
        *[f"- {k}: {v}" for k, v in report["environment"].items()],
        f"- model: `{cfg['model']}` ({setup['model_class']}, backbone {setup['backbone_params']:,} parameters)",
        f"- batch: {cfg['batch']} x {cfg['seq']} (right-padded, random ids, row lengths "
        f"{', '.join(map(str, setup['lengths']))}): {setup['tokens']:,} non-padding of {setup['padded_tokens']:,} "
        f"tokens; {cfg['device']}, {cfg['dtype']}" + (" autocast" if cfg["dtype"] == "bf16" else ""),
        f"- timing: {cfg['repeats']} timed (+{cfg['warmup']} warm-up) iterations in each fresh process, "
        f"{cfg['rounds']} round(s); statistics are median (q25–q75)",
        "",
        "## Results",
        "",
        f"| method | trainable | % | stored | changed | {mem} (MB) | Δ over loaded (MB) | train tok/s | "
        "train % of full | step / fwd | (fwd+bwd) / fwd | infer tok/s | merged infer tok/s | infer % of full"
        + (" | score |" if cfg["score_steps"] else " |"),
        "|---|" + "---:|" * (13 + bool(cfg["score_steps"])),
    ]
    for r in report["rows"]:
        name = r["method"] + (" (peft)" if r["impl"] == "peft" else "")
        cells = [
            name,
            _num(r["trainable_params"]),
            _num(r["trainable_pct"], ".4f"),
            _num(r["stored_params"]),
            _num(r["changed_params"]),
            _num(r["peak_mb"]),
            _num(r["increase_mb"]),
            _spread(r, "train_tok_s"),
            _num(r["train_pct_of_full"], ".1f"),
            _spread(r, "step_over_forward", ".2f"),
            _spread(r, "fwd_bwd_over_forward", ".2f"),
            _spread(r, "infer_tok_s"),
            _spread(r, "merged_tok_s"),
            _num(r["infer_pct_of_full"], ".1f"),
        ]
        if cfg["score_steps"]:
            score = r["score"]
            cells.append(f"{r['score_metric']} {score:.4f}" if score is not None else r["score_status"] or "–")
        lines.append("| " + " | ".join(cells) + " |")
    if report["ratios"]:
        lines += [
            "",
            "## peftlab / peft",
            "",
            "| method | peft config | trainable (peftlab / peft) | train tok/s | infer tok/s | "
            f"{mem} | Δ over loaded |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for method, e in report["ratios"].items():
            cfg_peft = report["methods"][method]["peft_config"]
            shown = {k: v for k, v in cfg_peft.items() if k not in ("task_type",) and v not in (None, {}, [])}
            cells = [method, f"`{json.dumps(shown)}`", f"{e['trainable_peftlab']:,} / {e['trainable_peft']:,}"]
            for col in ("train_tok_s", "infer_tok_s"):
                rng = e[f"{col}_range"]
                cells.append(f"{e[col]:.3f} ({rng[0]:.2f}–{rng[1]:.2f})" if e[col] is not None else "–")
            cells += [_num(e["peak_mb"], ".3f"), _num(e["increase_mb"], ".3f")]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {m}: {info['peft_note']}" for m, info in report["methods"].items() if info["peft_note"]]
    if notes:
        lines += ["", "Not compared with peft:", "", *notes]
    if report["failures"]:
        lines += ["", "## Failures", "", *[f"- {f}" for f in report["failures"]]]
    lines += ["", "## Legend", "", *LEGEND, ""]
    return "\n".join(lines)


LEGEND = [
    "- **trainable / stored / changed**: what the optimiser holds / what the saved adapter holds / parameters of "
    "the final model that differ from the backbone (`pm.counts()`); % is trainable over the backbone. peft rows "
    "count `requires_grad` parameters of the peft model.",
    "- **peak memory**: on the CPU the peak resident set (`ru_maxrss`) of the training process, which also holds "
    "Python, torch and the model; **Δ over loaded** subtracts the resident set after the model was built and the "
    "method attached (before the first step): gradients, optimiser state and activations. On CUDA: "
    "`torch.cuda.max_memory_allocated` and its increase over the memory allocated after loading.",
    "- **train tok/s**: non-padding input tokens per second of a training step (forward, backward, AdamW step, "
    "zero_grad) in train mode (dropout on). **infer tok/s**: eval mode under `torch.inference_mode`, adapters "
    "unmerged (as in the survey's Table 5); **merged**: after `pm.merge()`, for methods with mergeable modules.",
    "- **% of full**: throughput relative to full fine-tuning = 100, as in the survey's Table 5.",
    "- **step / fwd**: a training step's time over a no-grad forward of the same batch in the same mode, paired per "
    "iteration; **(fwd+bwd) / fwd** leaves out the optimiser. Expected about 3 for full fine-tuning (the backward "
    "computes activation and weight gradients), towards 2 for PEFT (activation gradients only) and about 1 for "
    "`head` (no backward through the backbone).",
    "- **peftlab / peft**: ratio of medians (above 1: peftlab faster, or for memory: peftlab larger), in brackets "
    "q25(peftlab)/q75(peft) – q75(peftlab)/q25(peft). Both run the same backbone weights and batch in separate "
    "fresh processes. A peft process's peak RSS also holds the peft library itself (about 10 MB): Δ over loaded is "
    "the like-for-like memory comparison.",
    "- every number comes from its own fresh process (`python -m peftlab.bench --worker`); warm-up iterations are "
    "not timed; `gc` is collected before and disabled during each timed call; times are wall clock "
    "(`time.perf_counter`, with `torch.cuda.synchronize` on a GPU).",
]


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    columns = list(table[0]) if table else ["method", "impl"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in table)


def plot(report: dict[str, Any], path: Path) -> None:
    """Training throughput against trainable %, and bars of train / inference throughput and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report["rows"]
    lab = [r for r in table if r["impl"] == "peftlab"]
    peft = {r["method"]: r for r in table if r["impl"] == "peft"}
    names = [r["method"] for r in lab]
    y = range(len(lab))
    fig, axes = plt.subplots(2, 2, figsize=(12, 3 + 0.45 * len(lab)))
    ax = axes[0][0]
    for r in lab:
        if r["train_tok_s"] is not None and r["trainable_pct"]:
            ax.scatter(r["trainable_pct"], r["train_tok_s"], color="tab:blue")
            ax.annotate(
                r["method"],
                (r["trainable_pct"], r["train_tok_s"]),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set(
        xscale="log",
        xlabel="trainable % of backbone",
        ylabel="train tokens/s",
        title="training throughput vs trainable parameters",
    )

    def bars(ax: Any, cols: list[tuple[str, str]], title: str, xlabel: str) -> None:
        h = 0.8 / len(cols)
        for k, (col, label) in enumerate(cols):
            source = [peft.get(n, {}) for n in names] if col.startswith("peft:") else lab
            key = col.removeprefix("peft:")
            vals = [r.get(key) or 0.0 for r in source]
            err = None
            if f"{key}_q25" in lab[0]:
                err = [
                    [max(0.0, (r.get(key) or 0) - (r.get(f"{key}_q25") or 0)) for r in source],
                    [max(0.0, (r.get(f"{key}_q75") or 0) - (r.get(key) or 0)) for r in source],
                ]
            ax.barh([i + k * h for i in y], vals, height=h, xerr=err, label=label, capsize=2)
        ax.set_yticks([i + 0.4 - h / 2 for i in y], names)
        ax.invert_yaxis()
        ax.set(title=title, xlabel=xlabel)
        ax.legend(fontsize=7, framealpha=0.6)

    with_peft = bool(peft)
    bars(
        axes[0][1],
        [("train_tok_s", "peftlab")] + ([("peft:train_tok_s", "peft")] if with_peft else []),
        "training throughput",
        "tokens/s",
    )
    bars(
        axes[1][0],
        [("infer_tok_s", "unmerged"), ("merged_tok_s", "merged")]
        + ([("peft:infer_tok_s", "peft unmerged")] if with_peft else []),
        "inference throughput",
        "tokens/s",
    )
    bars(
        axes[1][1],
        [("increase_mb", "peftlab")] + ([("peft:increase_mb", "peft")] if with_peft else []),
        "training memory over the loaded model",
        "MB",
    )
    fig.suptitle(
        f"{report['config']['model']}: batch {report['config']['batch']} x {report['config']['seq']}, "
        f"{report['config']['device']} {report['config']['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """bench.md, bench.csv, bench.json (raw per-repeat numbers included) and bench.png, each written whole."""
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Callable[[Path], None]] = {
        "bench.json": lambda p: p.write_text(json.dumps(report, indent=1) + "\n"),
        "bench.csv": lambda p: write_csv(report["rows"], p),
        "bench.md": lambda p: p.write_text(markdown(report)),
        "bench.png": lambda p: plot(report, p),
    }
    for name, write in writers.items():
        write_with(out / name, write)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
