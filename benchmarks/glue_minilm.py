"""The real MiniLM (all-MiniLM-L6-v2) on five real GLUE tasks with seven PEFT methods: score, size, time.

Trains every (task, method) pair with ``peftlab train`` in a fresh process per run (so memory and time are
per run), two runs at a time by default, each on one thread. Every run writes ``<output>/<task>/<method>/``
(``record.json``, ``train.log``, ``bench.json``, the adapter); a run whose ``record.json`` already exists is
skipped, so a killed benchmark resumes where it stopped (and ``peftlab train`` itself continues a run that
was interrupted after its first checkpoint). At the end, and with ``--report-only`` without training, it
writes a Markdown table, a CSV and a JSON file: the main metric on the test split (the official GLUE dev
set), the task's trivial baseline computed from the same test labels (the best constant prediction:
majority-class accuracy, F1 of always-positive for MRPC, MCC 0 for CoLA, Pearson/Spearman 0 for STS-B),
whether the score is above it, trainable and stored %, steps, wall time, tokens/s and peak memory.

    python benchmarks/glue_minilm.py --jobs 2 --threads 1          # all 35 runs with the defaults below
    python benchmarks/glue_minilm.py --tasks mrpc --steps mrpc=400 --eval-every 100 \
        --lr lora=2e-3 pfeiffer=2e-3 prefix=5e-3 unipelt=2e-3 bitfit=5e-3 ln=5e-3 full=1e-4   # one task, other settings
    python benchmarks/glue_minilm.py --report-only     # just rebuild the table from the records

Runs pass ``--group-by-length`` (batches of similar length: less padding, fewer FLOPs per step) unless
``--no-group-by-length``. The table always covers all tasks and methods and reads every run's settings (steps,
lr, evaluation interval, group-by-length) from its record, so tasks run by different invocations with different
settings are reported correctly; the invocations that produced the records are listed in its header (from
``<output>/invocations.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DEFAULT_OUTPUT = RESULTS / "glue_minilm"
DEFAULT_TABLE = RESULTS / "glue_minilm.md"

TASKS = ("rte", "mrpc", "stsb", "sst2", "cola")
METHODS = ("lora", "pfeiffer", "prefix", "unipelt", "bitfit", "ln", "full")

#: Optimiser steps per task (batch 16): the script's defaults, those of the first pass. Later passes overrode them
#: per task and method with --steps and --lr (the table reads every run's settings from its record and lists the
#: invocations). RTE and MRPC have the longest inputs (a padded batch of about 126 and 76 tokens without
#: --group-by-length, against 61 for STS-B, 36 for SST-2 and 21 for CoLA), so a step costs 2-7x more there. RTE
#: (80 steps, 0.56 epoch) and CoLA (400, 0.77 epoch) are far too short for the PEFT methods to leave the majority
#: prediction (see NOTES.md); on CoLA, Pfeiffer needed about 2,000 steps (4 epochs) of a 10-epoch run.
STEPS = {"rte": 80, "mrpc": 400, "stsb": 150, "sst2": 100, "cola": 400}
#: Learning rates of the first pass, still those of the STS-B and SST-2 rows (peftlab's per-method defaults are
#: the papers' values, tuned for runs of many epochs on BERT-base). On MRPC, 100 steps, full fine-tuning at 1e-4
#: beat 5e-5 on the held-out dev examples. Later passes gave other rates with --lr (the table lists each row's).
LRS = {"lora": 1e-3, "pfeiffer": 1e-3, "prefix": 1e-3, "unipelt": 1e-3, "bitfit": 1e-3, "ln": 1e-3, "full": 1e-4}
#: Seconds per step measured on this machine (one thread, another job on the cores), to start the longest
#: runs first.
STEP_COST = {"rte": 4.4, "mrpc": 2.5, "stsb": 1.9, "sst2": 1.1, "cola": 0.65}

_print_lock = threading.Lock()


def log(msg: str) -> None:
    with _print_lock:
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_map(pairs: list[str], cast, what: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{what} expects KEY=VALUE, got {pair!r}")
        out[key] = cast(value)
    return out


def rel(path: Path) -> str:
    return os.path.relpath(path, REPO)


@dataclass
class Run:
    task: str
    method: str
    steps: int
    lr: float | None
    out: Path

    def command(self, args: argparse.Namespace) -> list[str]:
        """The ``peftlab train`` command, with paths relative to the repository root (where it runs)."""
        cmd = [
            "peftlab",
            "train",
            "--model",
            args.model,
            "--task",
            self.task,
            "--method",
            self.method,
            "--data-dir",
            rel(args.data_dir),
            "--output",
            rel(self.out),
            "--max-steps",
            str(self.steps),
            "--dev-size",
            str(args.dev_size),
            "--eval-every",
            str(args.eval_every),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--seed",
            str(args.seed),
            "--no-progress",
        ]
        if args.k is not None:
            cmd += ["--k", str(args.k)]
        if self.lr is not None:
            cmd += ["--lr", f"{self.lr:g}"]
        if args.patience is not None:
            cmd += ["--patience", str(args.patience)]
        if args.group_by_length:
            cmd += ["--group-by-length"]
        return cmd


def run_one(run: Run, args: argparse.Namespace) -> None:
    """One training run in a fresh process with one thread; writes bench.json beside record.json."""
    run.out.mkdir(parents=True, exist_ok=True)
    cmd = run.command(args)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    # `python -m peftlab.cli` is what the `peftlab` console script runs; it needs no PATH entry.
    argv = [sys.executable, "-m", "peftlab.cli", *cmd[1:]]
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    log(f"start {run.task}/{run.method}: {shlex.join(cmd)}")
    with open(run.out / "train.log", "a") as fh:
        proc = subprocess.run(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    elapsed = time.perf_counter() - t0
    info = {
        "command": shlex.join(cmd),
        "env": {"OMP_NUM_THREADS": str(args.threads)},
        "returncode": proc.returncode,
        "process_wall_s": round(elapsed, 1),
        "started": started.isoformat(timespec="seconds"),
    }
    (run.out / "bench.json").write_text(json.dumps(info, indent=2) + "\n")
    status = "ok" if proc.returncode == 0 and (run.out / "record.json").is_file() else f"FAILED rc={proc.returncode}"
    score = ""
    if status == "ok":
        rec = json.loads((run.out / "record.json").read_text())
        score = f" test={rec.get('test')} status={rec.get('status')}"
    log(f"done  {run.task}/{run.method} in {elapsed:.0f}s: {status}{score}")


# -- the report ------------------------------------------------------------------------------------------
def noise(metric: str, base: float, n: int) -> float | None:
    """A rough standard deviation of the main metric of a chance-level predictor on ``n`` test examples, to
    tell a real gain from a lucky one: binomial for accuracy, 1/sqrt(n) for MCC (n·MCC² ~ chi²(1) under
    independence), 1/sqrt(n-3) for correlations (Fisher); none for F1."""
    if metric == "accuracy":
        return math.sqrt(base * (1 - base) / n)
    if metric == "mcc":
        return 1 / math.sqrt(n)
    if metric in ("spearman", "pearson"):
        return 1 / math.sqrt(n - 3)
    return None


def baseline(task: str, data_dir: Path) -> tuple[float, str, dict[str, float], int]:
    """The best constant prediction on the test labels under the task's main metric: (score, what, all
    metrics, number of test examples)."""
    from peftlab.train import metrics
    from peftlab.train.tasks import get_task, load_task

    info = get_task(task)
    labels = [ex["label"] for ex in load_task(task, "dev", data_dir)]  # the benchmark's test split
    if info.is_regression:
        train = [ex["label"] for ex in load_task(task, "train", data_dir)]
        const = sum(train) / len(train)
        scores = metrics.compute(info.metrics, [const] * len(labels), labels)
        return scores[info.main_metric], f"constant {const:.2f} (0 by definition)", scores, len(labels)
    best = None
    for cls, name in enumerate(info.label_names):
        scores = metrics.compute(info.metrics, [cls] * len(labels), labels)
        share = sum(1 for y in labels if y == cls) / len(labels)
        if best is None or (scores[info.main_metric], share) > (best[0], best[4]):  # ties: the majority class
            best = (
                scores[info.main_metric],
                f"always '{name}' ({share:.1%} of {len(labels)})",
                scores,
                len(labels),
                share,
            )
    if info.main_metric == "mcc":
        best = (best[0], f"any constant prediction, e.g. {best[1]}: 0 by definition", *best[2:])
    return best[:4]


def collect(args: argparse.Namespace, runs: list[Run]) -> list[dict]:
    from peftlab import methods
    from peftlab.train.tasks import get_task

    base = {t: baseline(t, args.data_dir) for t in dict.fromkeys(r.task for r in runs)}
    rows = []
    for run in runs:
        info = get_task(run.task)
        b_score, b_what, _, n_test = base[run.task]
        sigma = noise(info.main_metric, b_score, n_test)
        row = {
            "task": run.task,
            "method": run.method,
            "metric": info.main_metric,
            "baseline": round(b_score, 4),
            "baseline_what": b_what,
            "default_lr": methods.get(run.method).default_lr(),
            "lr": run.lr,
            "max_steps": run.steps,
            "status": "missing",
        }
        rec_path = run.out / "record.json"
        if rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            bench = json.loads((run.out / "bench.json").read_text()) if (run.out / "bench.json").is_file() else {}
            test = rec.get("test") or {}
            counts = rec.get("counts") or {}
            score = test.get(info.main_metric)
            row.update(
                {
                    "status": rec["status"],
                    "score": None if score is None else round(score, 4),
                    "other": {k: round(v, 4) for k, v in test.items() if k != info.main_metric},
                    "above_baseline": None if score is None else score > b_score,
                    "delta": None if score is None else round(score - b_score, 4),
                    "z": None if score is None or sigma is None else round((score - b_score) / sigma, 1),
                    "dev_best": rec.get("best"),
                    "lr": rec["config"]["lr"],
                    "steps": rec["steps"],
                    "total_steps": rec["total_steps"],
                    "trainable_params": counts.get("trainable_params"),
                    "trainable_pct": counts.get("trainable_pct"),
                    "stored_pct": counts.get("stored_pct"),
                    "wall_time_s": round(rec["wall_time_s"], 1),
                    "process_wall_s": bench.get("process_wall_s"),
                    "tokens_per_s": round(rec["tokens_per_s"], 1),
                    "peak_rss_mib": round(rec["peak_memory_bytes"] / 2**20),
                    "command": bench.get("command"),
                    "eval_every": rec["config"].get("eval_every"),
                    "group_by_length": bool(rec["config"].get("group_by_length", False)),  # absent before the option
                    "setup": {
                        k: rec["config"].get(k)
                        for k in (
                            "model",
                            "batch_size",
                            "max_length",
                            "dev_size",
                            "seed",
                            "k",
                            "patience",
                            "grad_accum",
                            "dropout",
                            "precision",
                        )
                    },
                }
            )
        rows.append(row)
    return rows


def common_settings(rows: list[dict]) -> str:
    """The settings every finished run shares (read from the records), as one line of the header."""
    setups = [r["setup"] for r in rows if r.get("setup")]
    if not setups:
        return "every run: (no records yet)"
    keys = list(setups[0])
    same = {k: setups[0][k] for k in keys if all(s.get(k) == setups[0][k] for s in setups)}
    differ = [k for k in keys if k not in same]
    flags = [f"--model {same['model']}"] if "model" in same else []
    shared = ("batch_size", "max_length", "dev_size", "seed")
    flags += [f"--{k.replace('_', '-')} {same[k]}" for k in shared if k in same]
    text = f"every run: `{' '.join(flags)}`"
    text += " (all remaining train examples, no `--k`)" if same.get("k", 0) is None else ""
    text += " (no early stopping)" if same.get("patience", 0) is None else ""
    text += "; AdamW, linear schedule with 6% warm-up, gradient clipping 1.0, the backbone's dropout (0.1), fp32"
    if differ:
        text += f"; differing between runs: {', '.join(differ)} (see each record)"
    return text


def settings_table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """One line per task: steps, epochs, evaluation interval, group-by-length and each method's lr."""
    from peftlab.train.tasks import load_task

    methods_ = list(dict.fromkeys(r["method"] for r in rows))
    out = [
        "| task | train examples | steps | ≈ epochs | eval every | group by length | "
        + " | ".join(f"lr {m}" for m in methods_)
        + " |",
        "|---|---:|---:|---:|---:|:---:|" + "---:|" * len(methods_),
    ]

    def one(values, spec=""):
        vals = sorted({v for v in values if v is not None}, key=_numbers_first)
        return "–" if not vals else " / ".join(format(v, spec) for v in vals)

    for task in dict.fromkeys(r["task"] for r in rows):
        done = [r for r in rows if r["task"] == task and r["status"] != "missing"]
        if not done:
            continue
        n_train = len(load_task(task, "train", args.data_dir)) - done[0]["setup"]["dev_size"]
        steps = {r["total_steps"] for r in done}
        epochs = one([s * done[0]["setup"]["batch_size"] / n_train for s in steps], ".2f")
        gbl = one(["yes" if r["group_by_length"] else "no" for r in done])
        lrs = {r["method"]: r["lr"] for r in done}
        out.append(
            f"| {task} | {n_train} | {one(steps)} | {epochs} | {one([r['eval_every'] for r in done])} | {gbl} | "
            + " | ".join(format(lrs[m], "g") if m in lrs else "–" for m in methods_)
            + " |"
        )
    return out


def _numbers_first(value) -> tuple:
    """Sort key: numbers in numeric order (400 before 2000), then strings."""
    return (isinstance(value, str), 0 if isinstance(value, str) else value, str(value))


def machine() -> dict[str, str]:
    from peftlab.train import library_versions

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = next(
            int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
        )
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        mem = "?"
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable",
        "memory": mem,
        "os": platform.platform(),
        **library_versions(),
    }


def fmt(x, spec: str = "", missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


def write_report(args: argparse.Namespace, runs: list[Run], history: list[dict]) -> None:
    """The Markdown table, CSV and JSON; ``history`` lists the invocations that ran the runs."""
    rows = collect(args, runs)
    meta = machine()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    done = [r for r in rows if r["status"] != "missing"]
    defaults = {r["method"]: r["default_lr"] for r in rows}
    missing = [f"{r['task']}/{r['method']}" for r in rows if r["status"] == "missing"]
    from peftlab.train.tasks import get_task

    lines = [
        "# MiniLM on GLUE: seven PEFT methods, five tasks",
        "",
        "The real `all-MiniLM-L6-v2` weights (BERT, 6 layers, hidden 384, 22.7M parameters) fine-tuned with "
        "`peftlab train` on RTE, MRPC, STS-B, SST-2 and CoLA. **Score** is the task's main metric on the test "
        "split, which is the official GLUE dev set (GLUE test labels are not public); model selection uses "
        f"{args.dev_size} examples held out from the official train set, evaluated every few steps (per task below), "
        "and the test score is that of the best dev checkpoint. **Baseline** is the best constant prediction "
        "scored on the same test labels (majority class for accuracy, always-positive for MRPC's F1, any constant "
        "gives MCC 0 on CoLA and Pearson/Spearman 0 on STS-B); *above* means strictly above it.",
        "",
        "- produced by"
        + (
            ", in this order (from `glue_minilm/invocations.json`; invocations whose runs were all "
            "deleted later are not listed, see the notes):"
            if history
            else ": (no recorded invocation)"
        ),
        *(
            f"  {i}. `{h['command']}` (started {h['started']}, {h['runs']} runs to do, "
            + (f"{h['minutes']} min" if h.get("minutes") is not None else "interrupted")
            + (f"; {h['note']}" if h.get("note") else "")
            + ")"
            for i, h in enumerate(history, 1)
        ),
        f"- table written: {now}",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory']} RAM, shared with other work; each "
        "run in its own process (the runs in parallel and the threads per run are in each invocation's command)",
        "- versions of the environment that wrote this table (records written since 2026-12-02 hold their run's "
        f"own, under `versions`): python {meta['python']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peftlab {meta['peftlab']}",
        "- " + common_settings(rows),
        "- per-task settings (read from the records; *epochs* = steps × batch size / train examples, the train "
        "examples being the official train set less the held-out dev examples):",
        "",
        *settings_table(rows, args),
        "",
        "- peftlab's per-method default lr (not used where the table's lr differs; marked *): "
        + ", ".join(f"{m} {lr:g}" for m, lr in defaults.items()),
        "- each run's exact `peftlab train` command is in `glue_minilm/<task>/<method>/bench.json` and in "
        "`glue_minilm.csv`; the records are `glue_minilm/<task>/<method>/record.json`",
    ]
    if missing:
        lines += ["", f"**Partial table: {len(missing)} of {len(rows)} runs missing** ({', '.join(missing)})."]
    lines += [
        "",
        "| task | method | metric | score | baseline | Δ | Δ/σ | above baseline | other test metrics | lr "
        "| trainable % | stored % | steps (best) | wall time (s) | tokens/s | peak RSS (MiB) | status |",
        "|---|---|---|---:|---:|---:|---:|:---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] == "missing":
            lr = r["lr"] if r["lr"] is not None else r["default_lr"]
            mark = "*" if lr != r["default_lr"] else ""
            lines.append(
                f"| {r['task']} | {r['method']} | {r['metric']} | – | {r['baseline']:.4f} | – | – | – | – | "
                f"{lr:g}{mark} | – | – | – | – | – | – | missing |"
            )
            continue
        other = ", ".join(f"{k} {v:.4f}" for k, v in r["other"].items()) or "–"
        above = {True: "yes", False: "**no**", None: "–"}[r["above_baseline"]]
        best_step = (r.get("dev_best") or {}).get("step")
        lr_mark = "*" if r["lr"] != r["default_lr"] else ""
        lines.append(
            f"| {r['task']} | {r['method']} | {r['metric']} | {fmt(r.get('score'), '.4f')} | {r['baseline']:.4f} "
            f"| {fmt(r.get('delta'), '+.4f')} | {fmt(r.get('z'), '+.1f')} | {above} | {other} | {r['lr']:g}{lr_mark} "
            f"| {fmt(r['trainable_pct'], '.3f')} | {fmt(r['stored_pct'], '.3f')} | {r['steps']} ({fmt(best_step)}) "
            f"| {r['wall_time_s']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']} | {r['status']} |"
        )
    lines += ["", "Baselines (from the test labels):", ""]
    seen = set()
    for r in rows:
        if r["task"] not in seen:
            seen.add(r["task"])
            lines.append(
                f"- {r['task']} ({get_task(r['task']).main_metric}): {r['baseline']:.4f} = {r['baseline_what']}"
            )
    below = [f"{r['task']}/{r['method']}" for r in done if r.get("above_baseline") is False]
    total_train = sum(r.get("wall_time_s") or 0 for r in done)
    total_proc = sum(r.get("process_wall_s") or 0 for r in done)
    lines += [
        "",
        f"Runs above baseline: {sum(1 for r in done if r.get('above_baseline'))} of {len(done)} finished"
        + (f"; at or below: {', '.join(below)}." if below else "."),
        f"Summed per-run time: {total_train / 60:.1f} min in the training loop (the *wall time* column: "
        f"training plus the dev evaluations), {total_proc / 60:.1f} min of whole processes (start-up, loading, "
        "test evaluation and saving included).",
        "",
        "Columns: *Δ/σ* = Δ over a rough standard deviation of a chance-level score on this many test examples "
        "(binomial for accuracy, 1/√n for MCC, 1/√(n−3) for correlations, none for F1): below about 2 the gain "
        "is within noise; *steps (best)* = optimiser steps run (the step whose dev score was best and whose weights "
        "were evaluated on the test split); *trainable %* / *stored %* = trainable / saved parameters as a "
        "percentage of the 22.7M backbone parameters (the classifier head included); *tokens/s* = non-padding "
        "training tokens per second of training-loop wall time; *peak RSS* = the run's process maximum resident "
        "set size.",
    ]
    if args.notes and args.notes.is_file():
        lines += ["", args.notes.read_text().rstrip()]
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(lines) + "\n")

    fields = [
        "task",
        "method",
        "metric",
        "score",
        "baseline",
        "delta",
        "z",
        "above_baseline",
        "status",
        "lr",
        "default_lr",
        "trainable_params",
        "trainable_pct",
        "stored_pct",
        "steps",
        "total_steps",
        "wall_time_s",
        "process_wall_s",
        "tokens_per_s",
        "peak_rss_mib",
        "other",
        "command",
    ]
    with open(args.table.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), dict) else r.get(k) for k in fields})
    args.table.with_suffix(".json").write_text(
        json.dumps({"invocations": history, "date": now, "machine": meta, "rows": rows}, indent=2, default=str) + "\n"
    )
    log(f"wrote {args.table} ({len(done)} of {len(rows)} runs)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run (default 1)")
    p.add_argument("--model", default="minilm")
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("PEFTLAB_DATA_DIR", REPO.parent / "shared" / "data"))
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the per-run folders")
    p.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="Markdown summary (.csv and .json beside it)")
    p.add_argument("--steps", nargs="*", default=[], metavar="TASK=N", help="override the steps of a task")
    p.add_argument(
        "--lr",
        nargs="*",
        default=[],
        metavar="METHOD=LR",
        help="override a method's learning rate ('default' = peftlab's per-method default)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dev-size", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pass --group-by-length to peftlab train: batches of similar length, less padding "
        "(default on; --no-group-by-length for plain shuffled batches)",
    )
    p.add_argument("--k", type=int, default=None, help="train examples per task (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--notes",
        type=Path,
        default=None,
        help="Markdown appended to the table (default: <output>/NOTES.md when it exists)",
    )
    p.add_argument("--report-only", action="store_true", help="write the table from existing records only")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args()
    command = shlex.join(["python", "benchmarks/glue_minilm.py", *sys.argv[1:]])

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    steps = STEPS | parse_map(args.steps, int, "--steps")
    lrs = LRS | parse_map(args.lr, lambda v: None if v == "default" else float(v), "--lr")
    args.data_dir = args.data_dir.resolve()
    args.output = args.output.resolve()
    if args.notes is None and (args.output / "NOTES.md").is_file():
        args.notes = args.output / "NOTES.md"
    runs = [Run(t, m, steps[t], lrs[m], args.output / t / m) for t in args.tasks for m in args.methods]
    # The lr of the table header: the value passed, or (None) the default, filled in from the spec.
    from peftlab import methods

    args.lrs = {m: (lrs[m] if lrs[m] is not None else methods.get(m).default_lr()) for m in args.methods}
    args.steps = {t: steps[t] for t in args.tasks}

    if args.dry_run:
        for run in runs:
            print(shlex.join(run.command(args)))
        return
    start = time.perf_counter()
    history_path = args.output / "invocations.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    todo = [] if args.report_only else [r for r in runs if not (r.out / "record.json").is_file()]
    if not args.report_only:
        log(f"{len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to run, {args.jobs} at a time")
    if todo:
        # Logged before the runs start, so an invocation that is killed still appears in the table.
        entry = {
            "command": command,
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "runs": len(todo),
            "minutes": None,
            "steps": args.steps,
            "lrs": args.lrs,
        }
        history.append(entry)
        args.output.mkdir(parents=True, exist_ok=True)
        history_path.write_text(json.dumps(history, indent=2) + "\n")
        # Longest first (a full fine-tuning step costs about 1.7x a PEFT step): better packing.
        todo.sort(key=lambda r: -r.steps * STEP_COST.get(r.task, 1.0) * (1.7 if r.method == "full" else 1.0))
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for fut in [pool.submit(run_one, r, args) for r in todo]:
                fut.result()
        entry["minutes"] = round((time.perf_counter() - start) / 60, 1)
        # Re-read: another invocation (other tasks, same output) may have logged itself meanwhile.
        history = json.loads(history_path.read_text())
        for h in history:
            if (h["command"], h["started"]) == (entry["command"], entry["started"]):
                h["minutes"] = entry["minutes"]
        history_path.write_text(json.dumps(history, indent=2) + "\n")
    # The table always covers every task and method (whatever --tasks/--methods ran now), from the records.
    everything = [Run(t, m, steps[t], lrs.get(m), args.output / t / m) for t in TASKS for m in METHODS]
    write_report(args, everything, history)


if __name__ == "__main__":
    main()
