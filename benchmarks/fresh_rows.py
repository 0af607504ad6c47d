"""The command line the row benchmarks share (``gsm8k_smollm2.py``, ``superglue_smollm2.py``): ``run`` does every row
not done yet, each in a fresh one-thread process running the script's ``row`` command (so peak memory is the row's
own); ``row`` does one; ``report`` writes the table."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

Command = Callable[[argparse.Namespace], None]
#: a row that trains nothing (the base model)
UNTRAINED = {"steps": 0, "tokens_per_s": None, "train_s": 0.0, "lr": None, "best_step": None}


def train_row(run: Any) -> dict[str, Any]:
    """Train a ``peftlab.train.loop.Run`` to its budget and finish it; what a row reports of its training."""
    run.loop(None)
    rec = run.finish()
    return {
        "steps": rec.steps,
        "tokens_per_s": rec.tokens_per_s,
        "train_s": rec.timings["train_s"],
        "lr": rec.config["lr"],
        "best_step": rec.best["step"],
        "trainable": rec.counts.get("trainable_params", rec.counts.get("trainable")),  # a peft model's counts
    }


def run_fresh(script: str, row: Sequence[str], data_dir: str) -> None:
    """``python SCRIPT row ROW... --data-dir DATA_DIR`` on one thread, logged with the time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(time.strftime("%H:%M"), *row, flush=True)
    subprocess.run([sys.executable, script, "row", *row, "--data-dir", data_dir], env=env, check=True)


def main(doc: str, commands: tuple[Command, Command, Command], axes: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Parse and run: ``commands`` are (run, row, report); each axis (name, choices) is a ``--NAMEs`` selection of
    ``run`` (default: all) and a positional argument of ``row``."""
    run, row, report = commands
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    for name, choices in axes:
        p.add_argument(f"--{name}s", dest=f"{name}s", nargs="+", default=list(choices), choices=choices)
    p.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR", "../shared/data"))
    p.set_defaults(fn=run)
    p = sub.add_parser("row")
    for name, choices in axes:
        p.add_argument(name, choices=choices)
    p.add_argument("--data-dir", required=True)
    p.set_defaults(fn=row)
    sub.add_parser("report").set_defaults(fn=report)
    args = parser.parse_args()
    args.fn(args)
