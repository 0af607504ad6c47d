"""A real configuration search on the real MiniLM: BO against random search, the Pareto set re-trained at full
budget against presets of similar size, and an S4 refinement.

Every phase is a ``peftlab`` command run in a fresh process (printed as it runs, and listed in the report);
every phase resumes: searches continue their SQLite study, re-training reuses finished runs' records.

    python benchmarks/search_minilm.py search --task sst2 --samplers random autopeft --trials 20 --steps 80
    python benchmarks/search_minilm.py retrain --task sst2 --steps 400 --seeds 0 1 2
    python benchmarks/search_minilm.py refine --task sst2 --steps 40 --samples 2
    python benchmarks/search_minilm.py report --task sst2

Trials train ``--steps`` steps (the low fidelity) at batch 16 with ``--group-by-length`` and are scored on
200 held-out dev examples; the test split (the official GLUE dev set) is recorded and never used to choose.
Both samplers' studies share one reference point (score ``--ref-score``, the space's costliest corner), so
their hypervolumes compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search_minilm"
PRESETS = {  # preset -> (setting that sizes it, candidate values)
    "lora": ("r", [1, 2, 4, 8, 16, 32, 64]),
    "pfeiffer": ("size", [2, 4, 8, 16, 32, 64, 128, 256]),
    "prefix": ("length", [1, 2, 5, 10, 20, 40, 80]),
    "unipelt": ("size", [6, 12, 24, 48, 96]),
}


def common(seed: int = 0) -> list[str]:
    """Flags every run shares (the trials' and the re-training runs' data, batch and seed)."""
    return [
        "--model",
        "minilm",
        "--batch-size",
        "16",
        "--max-length",
        "128",
        "--dev-size",
        "200",
        "--seed",
        str(seed),
        "--group-by-length",
    ]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], log: Path) -> float:
    """Run a peftlab command (its output to ``log``); returns seconds; a failure stops the benchmark."""
    full = [sys.executable, "-m", "peftlab.cli", *cmd]
    print("$ peftlab " + shlex.join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("a") as f:
        code = subprocess.call(full, stdout=f, stderr=subprocess.STDOUT, env=_env())
    if code:
        raise SystemExit(f"command failed ({code}), see {log}: peftlab {shlex.join(cmd)}")
    return time.perf_counter() - start


def _record(folder: Path, entry: dict) -> None:
    path = folder / "commands.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps([*done, entry], indent=2) + "\n")


def _ref_point(task: str, ref_score: float) -> str:
    from peftlab.search.study import SearchConfig, default_ref_point
    from peftlab.space import load_space

    config = SearchConfig(model="minilm", task=task)
    return f"{ref_score},{default_ref_point(load_space('autopeft', 'minilm'), config)[1]}"


def cmd_search(args: argparse.Namespace) -> None:
    folder = RESULTS / args.task
    folder.mkdir(parents=True, exist_ok=True)
    ref = _ref_point(args.task, args.ref_score)

    def one(sampler: str) -> None:
        cmd = [
            "search",
            *common(),
            "--task",
            args.task,
            "--space",
            "autopeft",
            "--sampler",
            sampler,
            "--study",
            f"{args.task}-{sampler}",
            "--storage",
            str(folder / "study.db"),
            "--output",
            str(folder / sampler),
            "--trials",
            str(args.trials),
            "--max-steps",
            str(args.steps),
            "--eval-every",
            str(args.steps // 2),
            "--startup-trials",
            str(args.startup),
            "--ref-point",
            ref,
            "--lr",
            str(args.lr),
            "--data-dir",
            args.data_dir,
        ]
        seconds = run(cmd, folder / f"search-{sampler}.log")
        _record(
            folder,
            {
                "phase": "search",
                "command": "peftlab " + shlex.join(cmd),
                "seconds": round(seconds),
                "finished": datetime.now(UTC).isoformat(timespec="minutes"),
            },
        )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, args.samplers))


def _study(task: str, sampler: str):
    from peftlab.search.study import load_study

    return load_study(str(RESULTS / task / "study.db"), f"{task}-{sampler}")[0]


def _closest(cost, preset: str, target: float) -> int:
    from peftlab import methods

    key, values = PRESETS[preset]
    return min(values, key=lambda v: abs(cost.stored(methods.get(preset, **{key: v})) - target))


def cmd_retrain(args: argparse.Namespace) -> None:
    from peftlab import methods
    from peftlab.search import results
    from peftlab.search.results import pareto_trials
    from peftlab.search.study import CostModel, SearchConfig

    folder = RESULTS / args.task
    study = _study(args.task, args.sampler)
    # The front's points that beat the reference score (the others add no hypervolume), best dev scores first.
    ref_score = results.ref_point(study)[0]
    front = sorted((t for t in pareto_trials(study) if t.values[0] > ref_score), key=lambda t: -t.values[0])
    front = sorted(front[: args.max_points], key=lambda t: t.values[1])
    cmd = [
        "pareto",
        "retrain",
        "--storage",
        str(folder / "study.db"),
        "--study",
        study.study_name,
        "--max-steps",
        str(args.steps),
        "--seeds",
        *map(str, args.seeds),
        "--output",
        str(folder / "retrain"),
        "--trial",
        *(str(t.number) for t in front),
    ]
    seconds = run(cmd, folder / "retrain.log")
    _record(folder, {"phase": "retrain", "command": "peftlab " + shlex.join(cmd), "seconds": round(seconds)})
    target = statistics.median(t.values[1] for t in front)
    cost = CostModel.for_search(SearchConfig(model="minilm", task=args.task))
    jobs = []
    for preset in PRESETS:
        key, _ = PRESETS[preset]
        value = _closest(cost, preset, target)
        for seed in args.seeds:
            out = folder / "presets" / preset / f"seed{seed}"
            if (out / "record.json").is_file():
                continue
            out.mkdir(parents=True, exist_ok=True)
            stored = round(cost.stored(methods.get(preset, **{key: value})), 4)
            (out / "preset.json").write_text(json.dumps({"preset": preset, key: value, "stored_percent": stored}))
            jobs.append(
                [
                    "train",
                    *common(seed),
                    "--task",
                    args.task,
                    "--method",
                    preset,
                    "--set",
                    f"{key}={value}",
                    "--max-steps",
                    str(args.steps),
                    "--eval-every",
                    str(args.steps // 4),
                    "--lr",
                    str(args.lr),
                    "--data-dir",
                    args.data_dir,
                    "--no-progress",
                    "--output",
                    str(out),
                ]
            )

    def one(cmd: list[str]) -> None:
        seconds = run(cmd, Path(cmd[-1]) / "train.log")
        _record(folder, {"phase": "presets", "command": "peftlab " + shlex.join(cmd), "seconds": round(seconds)})

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))


def cmd_refine(args: argparse.Namespace) -> None:
    folder = RESULTS / args.task
    space = HERE / "s4_minilm.json"
    cmd = [
        "refine",
        *common(),
        "--task",
        args.task,
        "--space",
        str(space),
        "--samples",
        str(args.samples),
        "--max-steps",
        str(args.steps),
        "--eval-every",
        str(args.steps),
        "--lr",
        str(args.lr),
        "--storage",
        str(folder / "study.db"),
        "--study",
        f"{args.task}-s4-{args.steps}steps-lr{args.lr:g}",
        "--output",
        str(folder / "refine"),
        "--data-dir",
        args.data_dir,
    ]
    seconds = run(cmd, folder / "refine.log")
    _record(folder, {"phase": "refine", "command": "peftlab " + shlex.join(cmd), "seconds": round(seconds)})
    for seed in args.seeds:  # the design it chose, at the re-training budget and learning rate of the presets
        out = folder / "s4" / f"seed{seed}"
        if (out / "record.json").is_file():
            continue
        cmd = [
            "train",
            *common(seed),
            "--task",
            args.task,
            "--spec",
            str(folder / "refine" / "spec.json"),
            "--max-steps",
            str(args.full_steps),
            "--eval-every",
            str(args.full_steps // 4),
            "--lr",
            str(args.full_lr),
            "--data-dir",
            args.data_dir,
            "--no-progress",
            "--output",
            str(out),
        ]
        seconds = run(cmd, out / "train.log")
        _record(folder, {"phase": "s4-design", "command": "peftlab " + shlex.join(cmd), "seconds": round(seconds)})


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def cmd_report(args: argparse.Namespace) -> None:
    from peftlab.search import results
    from peftlab.search.study import trial_rows

    folder = RESULTS / args.task
    studies = [_study(args.task, s) for s in args.samplers]
    for s in studies:
        results.export(s, folder / "exports" / s.study_name)
    results.plot_front(studies, folder / "front.png")
    results.plot_hypervolume(studies, folder / "hypervolume.png")
    lines = [
        f"# Search on MiniLM + {args.task.upper()}: {' vs '.join(args.samplers)}",
        "",
        f"- table written {datetime.now(UTC).isoformat(timespec='minutes')} on {platform.processor() or 'cpu'}"
        f" ({os.cpu_count()} cores, shared); python {platform.python_version()}",
        "",
    ]
    commands = json.loads((folder / "commands.json").read_text()) if (folder / "commands.json").is_file() else []
    lines += ["## Commands", ""] + [f"- `{c['command']}` ({c['seconds']} s)" for c in commands] + [""]
    ref = results.ref_point(studies[0])
    most = max(len(s.trials) for s in studies)
    marks = [n for n in (5, 10, 15, 20, 30, 40, 60, 80, 100) if n < most] + [most]
    lines += [
        "## Hypervolume after N trials",
        "",
        f"Reference point (dev score, stored %) = {ref}; higher is better. Plot: `{args.task}/hypervolume.png`;"
        f" fronts: `{args.task}/front.png`.",
        "",
        "| sampler | " + " | ".join(f"N={n}" for n in marks) + " | trials | statuses | training time (s) |",
        "|---|" + "---:|" * (len(marks) + 3),
    ]
    for s in studies:
        curve = results.hypervolume_curve(s)
        rows = trial_rows(s)
        stat: dict[str, int] = {}
        for r in rows:
            stat[r["status"]] = stat.get(r["status"], 0) + 1
        wall = sum(r["wall_time_s"] or 0 for r in rows)
        cells = [_fmt(curve[n - 1]) if len(curve) >= n else "" for n in marks]
        name = results.definition_of(s)["sampler"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(rows)} | {stat} | {wall:.0f} |")
    for s in studies:
        lines += ["", f"## Pareto set of {s.study_name}", "", "```", results.front_table(s), "```"]
    retrain = folder / "retrain" / "retrain.json"
    if retrain.is_file():
        data = json.loads(retrain.read_text())
        lines += [
            "",
            f"## Re-trained at full budget ({data['settings'].get('max_steps')} steps, seeds "
            f"{data['seeds']}) against presets of similar size",
            "",
            "| configuration | stored % | test (mean ± std) | seeds |",
            "|---|---:|---|---:|",
        ]
        for r in data["rows"]:
            params = " ".join(f"{k}={v}" for k, v in r["params"].items())
            lines.append(
                f"| trial {r['trial']} ({params}) | {r['stored_percent']:.3f} | "
                f"{_fmt(r['test_mean'])} ± {_fmt(r['test_std'])} | {r['seeds']} |"
            )
        for preset in PRESETS:
            recs = sorted((folder / "presets" / preset).glob("seed*/record.json"))
            if not recs:
                continue
            rs = [json.loads(p.read_text()) for p in recs]
            metric = rs[0]["best"]["metric"]
            scores = [r["test"][metric] for r in rs if r.get("test")]
            stored = rs[0]["counts"]["stored_pct"]
            key = PRESETS[preset][0]
            size = f"{key}={json.loads((recs[0].parent / 'preset.json').read_text())[key]}"
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            lines.append(
                f"| {preset} ({size}) | {stored:.3f} | {_fmt(statistics.mean(scores))} ± {_fmt(std)} | {len(scores)} |"
            )
    refine = folder / "refine" / "refine.json"
    if refine.is_file():
        data = json.loads(refine.read_text())
        lines += [
            "",
            "## S4 refinement",
            "",
            f"Space: `{(HERE / 's4_minilm.json').read_text().strip()}`",
            "",
            "| stage | chosen | candidates (mean dev score) |",
            "|---|---|---|",
        ]
        for st in data["stages"]:
            if st.get("skipped"):
                lines.append(f"| {st['stage']} | – | skipped: {st['skipped']} |")
                continue
            cands = ", ".join(f"{c['value']}: {_fmt(c['mean'])}" for c in st["candidates"])
            lines.append(f"| {st['stage']} | **{st['chosen']}** | {cands} |")
        lines += [
            "",
            f"Design: {data['design']}; stored {_fmt(data['stored_percent'], 3)}% (spec: `refine/spec.json`).",
        ]
        recs = [json.loads(p.read_text()) for p in sorted((folder / "s4").glob("seed*/record.json"))]
        if recs:
            metric = recs[0]["best"]["metric"]
            scores = [r["test"][metric] for r in recs if r.get("test")]
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            lines += [
                "",
                f"Trained like the presets above ({recs[0]['config']['max_steps']} steps, lr "
                f"{recs[0]['config']['lr']}, {len(scores)} seeds): test {metric} "
                f"{_fmt(statistics.mean(scores))} ± {_fmt(std)} at "
                f"{recs[0]['counts']['stored_pct']:.3f}% stored.",
            ]
    (HERE / "results" / f"search_minilm_{args.task}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["search", "retrain", "refine", "report"])
    p.add_argument("--task", default="sst2")
    p.add_argument("--samplers", nargs="+", default=["random", "autopeft"])
    p.add_argument("--sampler", default="autopeft", help="retrain: the study whose Pareto set is re-trained")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--startup", type=int, default=6)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--full-steps", type=int, default=200, help="refine: steps when the chosen design is trained")
    p.add_argument("--full-lr", type=float, default=1e-3, help="refine: lr when the chosen design is trained")
    p.add_argument(
        "--max-points",
        type=int,
        default=3,
        help="retrain: the front's best-scoring points above the reference score, at most this many",
    )
    p.add_argument("--ref-score", type=float, default=0.5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    args = p.parse_args()
    {"search": cmd_search, "retrain": cmd_retrain, "refine": cmd_refine, "report": cmd_report}[args.phase](args)


if __name__ == "__main__":
    main()
