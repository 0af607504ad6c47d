"""Re-training configurations at the evidence benchmarks' full budget with several seeds (``found_vs_presets.py``,
``s4_evidence.py``): one ``peftlab train`` per (configuration, seed) in a fresh one-thread process, the runs' lines
kept in a committed ``runs.csv`` (a new machine does not run them again), and the paired comparison of two rows.

The protocol is the search evidence's except the budget: MiniLM on SST-2 (or MRPC, for transfer), batch 16 with
``--group-by-length``, the task's max length (64, 128), lr 1e-3 for every configuration, ``STEPS`` steps with a dev
evaluation every ``EVAL_EVERY`` on the search's 1000-example dev split (data seed 0), the test split (GLUE's dev set)
scored at the best dev checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scipy import stats

TASK, MODEL = "sst2", "minilm"
STEPS, EVAL_EVERY, LR, SEEDS = 500, 100, 1e-3, (0, 1, 2)
TRAIN_FLAGS = ["--batch-size", "16", "--group-by-length", "--dev-size", "1000"]
#: per task: its max length (the search evidence's) and what the reports say of its test split's noise
TASKS = {
    "sst2": ("64", "GLUE's dev set (872 examples: σ of one accuracy ≈ sqrt(p(1-p)/872) ≈ 1.3 points at p = 0.83)"),
    "mrpc": ("128", "GLUE's dev set (408 examples: σ of one accuracy ≈ sqrt(p(1-p)/408) ≈ 2.2 points at p = 0.75)"),
    "stsb": (
        "128",
        "GLUE's dev set (1500 examples: σ of one Spearman correlation ≈ (1-r²)/sqrt(1497) ≈ 0.02 at r = 0.5)",
    ),
}
TEST_SIGMA = TASKS[TASK][1]


def train(name: str, spec: dict[str, Any], seed: int, out: Path, data_dir: str, task: str = TASK) -> None:
    """Train ``spec`` at ``seed`` on ``task`` into ``out`` (restarted if a killed run left it half done); keep the
    record only."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / "spec.json"
    path.write_text(json.dumps(spec))
    cmd = [
        sys.executable, "-m", "peftlab.cli", "train", "--model", MODEL, "--task", task, "--spec", str(path),
        "--max-steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--lr", str(LR), "--seed", str(seed),
        "--output", str(out), "--no-progress", "--data-dir", data_dir, *TRAIN_FLAGS, "--max-length", TASKS[task][0],
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"{datetime.now(UTC):%H:%M} {name} seed {seed}", flush=True)
    with (out.parent / f"seed{seed}.log").open("w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code:
        raise SystemExit(f"{name} seed {seed} failed ({code}); see {out.parent / f'seed{seed}.log'}")
    for adapter in out.glob("adapter*"):  # the table needs the record only
        shutil.rmtree(adapter) if adapter.is_dir() else adapter.unlink()


def dev_at(row: dict, step: int) -> float | None:
    """The dev score a run had at ``step`` (from its ``dev_by_step``), if it was evaluated there."""
    for item in (row.get("dev_by_step") or "").split(";"):
        if item and int(item.split(":")[0]) == step:
            return float(item.split(":")[1])
    return None


def test_score(record: dict[str, Any]) -> float:
    return float(record["test"][record["best"]["metric"]])


def run_row(name: str, stored: float, seed: int, record: dict[str, Any]) -> dict[str, Any]:
    """One run's line of ``runs.csv``."""
    metric = record["best"]["metric"]
    return {
        "config": name, "seed": seed, "stored_percent": round(stored, 4), "metric": metric,
        "dev": record["best"]["score"], "test": test_score(record), "best_step": record["best"]["step"],
        "steps": record["steps"], "wall_time_s": round(record["wall_time_s"], 1),
        "dev_by_step": ";".join(f"{e['step']}:{e[metric]}" for e in record["evaluations"] if metric in e),
    }  # fmt: skip


def records(folder: Path) -> dict[int, dict[str, Any]]:
    """The finished runs' records under ``folder`` (``seedS/record.json``), by seed."""
    found = {}
    for seed in SEEDS:
        path = folder / f"seed{seed}" / "record.json"
        if path.is_file():
            found[seed] = json.loads(path.read_text())
    return found


def committed(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The runs of a committed ``runs.csv``, by (configuration, seed)."""
    if not path.is_file():
        return {}
    with path.open() as f:
        return {(r["config"], int(r["seed"])): r for r in csv.DictReader(f) if r.get("seed")}


def write_runs(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["config"]
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[str, str]:
    """Mean difference of ``a`` minus ``b`` over the seeds both have (the same seed trains on the same batches) and
    the paired t-test's p ('' under 3 seeds, where two equal differences would make it 0)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "", ""
    x, y = [a[s] for s in seeds], [b[s] for s in seeds]
    diff = f"{statistics.mean(x) - statistics.mean(y):+.3f}"
    if len(seeds) < 3 or x == y:
        return diff, ""
    if len({round(a - b, 9) for a, b in zip(x, y, strict=True)}) == 1:  # no spread: the t-test degenerates to p = 0
        return diff, "– (equal in every seed)"
    return diff, f"{stats.ttest_rel(x, y).pvalue:.2f}"
