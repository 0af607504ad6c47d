"""Trials per hour of ``peftlab search`` with one worker and with two (one thread each), on the sampler evidence's
protocol (MiniLM, SST-2, the AutoPEFT space, 100 steps per trial): the wall time of a whole search from the command to
its exit, start-up and the Pareto set's test scoring included, as a user sees it.

    python benchmarks/search_throughput.py run --trials 12 --rounds 2    # needs both cores free (~35 minutes)
    python benchmarks/search_throughput.py report                          # results/search_throughput.md

Each measurement is a fresh study in a fresh folder; settings alternate (1 worker, 2 workers, then 2, 1) within and
across rounds so that a drift of the machine falls on both. Results append to ``results/search_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search_throughput.json"
REPORT = HERE / "results" / "search_throughput.md"
PROTOCOL = [
    "--model", "minilm", "--task", "sst2", "--space", "autopeft", "--batch-size", "16", "--group-by-length",
    "--dev-size", "1000", "--lr", "0.001", "--startup-trials", "10", "--max-length", "64", "--max-steps", "100",
    "--no-plots", "--no-progress",
]  # fmt: skip


def _one(sampler: str, workers: int, trials: int, seed: int, data_dir: str) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="throughput-"))
    cmd = [
        sys.executable, "-m", "peftlab.cli", "search", *PROTOCOL, "--sampler", sampler, "--trials", str(trials),
        "--workers", str(workers), "--seed", str(seed), "--sampler-seed", str(seed),
        "--output", str(folder / "search"), "--data-dir", data_dir,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    code = subprocess.call(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    if code:
        raise SystemExit(f"search failed ({code}): {' '.join(cmd)}")
    return {
        "sampler": sampler, "workers": workers, "trials": trials, "seed": seed, "wall_s": round(wall, 1),
        "trials_per_hour": round(3600 * trials / wall, 1), "date": datetime.now(UTC).isoformat(timespec="minutes"),
    }  # fmt: skip


def cmd_run(args: argparse.Namespace) -> None:
    done = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    for r in range(args.rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        for sampler in args.samplers:
            for workers in order:
                row = _one(sampler, workers, args.trials, r, args.data_dir)
                done.append(row)
                RESULTS.write_text(json.dumps(done, indent=1) + "\n")
                print(row, flush=True)


def cmd_report(_: argparse.Namespace) -> None:
    rows = json.loads(RESULTS.read_text())
    lines = [
        "# Search throughput: trials per hour at 1 and 2 workers",
        "",
        f"- {platform.processor() or 'cpu'}, {os.cpu_count()} cores, one thread per worker; command and protocol: "
        "`benchmarks/search_throughput.py`; raw rows: `search_throughput.json`",
        "",
        "| sampler | workers | runs | trials per hour (mean ± std) | speed-up over 1 worker |",
        "|---|---:|---:|---:|---:|",
    ]
    for sampler in sorted({r["sampler"] for r in rows}):
        mine = [r for r in rows if r["sampler"] == sampler]
        rates = {w: [r["trials_per_hour"] for r in mine if r["workers"] == w] for w in (1, 2)}
        for w, xs in rates.items():
            if not xs:
                continue
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            ratio = statistics.mean(xs) / statistics.mean(rates[1]) if rates[1] else float("nan")
            lines.append(f"| {sampler} | {w} | {len(xs)} | {statistics.mean(xs):.1f} ± {sd:.1f} | {ratio:.2f} |")
    REPORT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["run", "report"])
    p.add_argument("--samplers", nargs="+", default=["random", "autopeft"])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR", str(HERE.parent.parent / "shared/data")))
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.phase](args)


if __name__ == "__main__":
    main()
