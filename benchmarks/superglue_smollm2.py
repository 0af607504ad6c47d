"""SmolLM2-135M-Instruct (the packaged GGUF) on SuperGLUE as text-to-text: RTE, CB, COPA and BoolQ written with the
survey's prompts (``gen/<task>``), the label word (COPA: the plausible alternative) generated greedily and scored by
exact match after normalisation; the base model zero-shot on the same prompts, LoRA and (IA)3 at one budget.

    python benchmarks/superglue_smollm2.py run            # every (task, row) not done yet, each in a fresh process
    python benchmarks/superglue_smollm2.py run --tasks rte cb --rows base lora
    python benchmarks/superglue_smollm2.py report         # results/superglue_smollm2.md from the rows' JSON

Budget (one CPU thread per row): 60 optimiser steps of batch 4 from the official train set (data seed 0; CB and COPA
have 250 and 400 examples), max length 256 tokens, the method's default learning rate, the dev loss on 50 held-out
training examples every 20 steps selects the state; the test split is SuperGLUE's labelled validation set (RTE 277,
CB 56, COPA 100; BoolQ's first 500 of 3,270), σ of one row = sqrt(p(1-p)/n). Resumable: each finished row is a JSON
file in results/superglue_smollm2/.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import fresh_rows

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "superglue_smollm2"
REPORT = HERE / "results" / "superglue_smollm2.md"
TASKS = ("rte", "cb", "copa", "boolq")
ROWS = ("base", "lora", "ia3")
TEST = {"rte": 277, "cb": 56, "copa": 100, "boolq": 500}  # validation examples scored (all but BoolQ's)
SETTINGS = {
    "model": "smollm2-135m",
    "dev_size": 50,
    "max_steps": 60,
    "batch_size": 4,
    "eval_every": 20,
    "max_length": 256,
    "eval_batch_size": 8,
    "score_test": False,
    "progress": False,
}


def run_row(task: str, name: str, data_dir: str) -> dict:
    """Train (unless ``base``) and score one (task, row) in this process."""
    import torch

    from peftlab import methods
    from peftlab.memory import peak_rss
    from peftlab.train import TrainConfig
    from peftlab.train.evaluation import evaluate
    from peftlab.train.loop import Run

    torch.manual_seed(0)
    config = TrainConfig(data_dir=data_dir, task=f"gen/{task}", **SETTINGS)
    start = time.perf_counter()
    # base: LoRA as initialised (B = 0), which leaves every output of the backbone exactly as it was
    run = Run(methods.get("lora" if name == "base" else name), config, None)
    record = fresh_rows.UNTRAINED if name == "base" else fresh_rows.train_row(run)
    rows = run.splits.test[: TEST[task]]
    scoring = time.perf_counter()
    scores = evaluate(run.pm, run.encoder, rows, config.eval_batch_size, run.device)
    p = scores["exact_match"]
    return {
        "task": task,
        "row": name,
        **record,
        "scores": scores,
        "exact_match": p,
        "sigma": math.sqrt(p * (1 - p) / len(rows)),
        "test_examples": len(rows),
        "score_s": time.perf_counter() - scoring,
        "wall_s": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss(),
        "settings": SETTINGS,
        "torch_threads": torch.get_num_threads(),
    }


def _path(task: str, name: str) -> Path:
    return OUT / f"{task}-{name}.json"


def cmd_row(args: argparse.Namespace) -> None:
    result = run_row(args.task, args.row, args.data_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    _path(args.task, args.row).write_text(json.dumps(result, indent=2))


def cmd_run(args: argparse.Namespace) -> None:
    for task in args.tasks:
        for name in args.rows:
            if not _path(task, name).is_file():
                fresh_rows.run_fresh(__file__, [task, name], args.data_dir)


def cmd_report(_: argparse.Namespace) -> None:
    found = {(t, n): json.loads(_path(t, n).read_text()) for t in TASKS for n in ROWS if _path(t, n).is_file()}
    lines = [
        "# SmolLM2-135M-Instruct on SuperGLUE as text-to-text",
        "",
        f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python benchmarks/superglue_smollm2.py "
        "report`; rows by `python benchmarks/superglue_smollm2.py run` (protocol: the script's docstring)",
        "- exact match (%) of the generated label word on SuperGLUE's validation set (BoolQ: its first 500), ± σ = "
        "sqrt(p(1-p)/n) of one row; one thread per row, minutes indicative",
        "",
        "| task (n) | " + " | ".join(ROWS) + " |",
        "|---|" + "---:|" * len(ROWS),
    ]
    for t in TASKS:
        cells = []
        for n in ROWS:
            r = found.get((t, n))
            cells.append(f"{100 * r['exact_match']:.1f} ± {100 * r['sigma']:.1f}" if r else "–")
        lines.append(f"| {t} ({TEST[t]}) | " + " | ".join(cells) + " |")
    lines += ["", "| task | row | lr | steps | train tokens/s | train min | score min | peak RSS GiB |", "|---|" * 8]
    for (t, n), r in found.items():
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        lines.append(
            f"| {t} | {n} | {r['lr'] or '-'} | {r['steps']} | {tps} | {r['train_s'] / 60:.1f} | "
            f"{r['score_s'] / 60:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} |"
        )
    missing = [f"{t}/{n}" for t in TASKS for n in ROWS if (t, n) not in found]
    lines += ["", f"Not measured yet: {', '.join(missing) or 'none'}.", ""]
    REPORT.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    fresh_rows.main(__doc__, (cmd_run, cmd_row, cmd_report), [("task", TASKS), ("row", ROWS)])


if __name__ == "__main__":
    main()
