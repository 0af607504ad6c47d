"""Does the configuration a search finds beat the presets? The AutoPEFT paper's comparison, on MiniLM.

The Pareto set of the best sampler-evidence study (``search_evidence.py``: the task's AutoPEFT study with the
largest hypervolume at its last trial, read from its committed trial table, so no study file is needed) is
re-trained at a larger budget with several seeds, beside the presets ``lora``, ``pfeiffer``, ``houlsby``,
``parallel``, ``prefix``, ``ia3``, ``unipelt`` and ``mam`` at the sizes whose stored % falls in each budget bin
that the front reaches (per preset and bin the size nearest the bin's geometric middle). Every run is a
``peftlab train`` in a fresh process on one thread, at the same settings as the search's trials except the budget:
batch 16, lr 1e-3 for every configuration (the search's; the presets' own paper rates would mix the comparison of
architectures with one of learning rates), ``STEPS`` steps with a dev evaluation every ``EVAL_EVERY`` (the search's
1000-example dev split, data seed 0), the test split (GLUE's dev set) scored at the best dev checkpoint.

    python benchmarks/found_vs_presets.py plan      # results/found_vs_presets/plan.json: configurations and bins
    python benchmarks/found_vs_presets.py run       # every run not done yet (resumable; background, one thread)
    python benchmarks/found_vs_presets.py report    # results/found_vs_presets.md
    python benchmarks/found_vs_presets.py run --task stsb --configs found-t58 lora-r8   # transfer (AutoPEFT's claim)
    python benchmarks/found_vs_presets.py report --task stsb                          # results/found_vs_presets_stsb.md

Transfer: ``--task stsb`` (or ``mrpc``) trains the same plan (the SST-2 front and the presets, sized and binned on
SST-2) on that task, into ``found_vs_presets/transfer-TASK/``; ``--configs`` restricts a run to some of the plan's
configurations.

Runs go seed by seed (every configuration at seed 0, then seed 1, ...), so a stopped run leaves every configuration
with the same seeds. Each run's record is in ``results/found_vs_presets/runs/CONFIG/seedS/record.json`` (git-ignored;
the adapter is deleted after the run); ``report`` also writes every run's numbers to ``found_vs_presets/runs.csv``
(committed), from which the table can be redrawn.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from datetime import UTC, datetime
from pathlib import Path

import retrain
from retrain import EVAL_EVERY, LR, MODEL, SEEDS, STEPS, TASK
from scipy import stats

from peftlab import methods
from peftlab.search.params import to_vector
from peftlab.search.pareto import hypervolume_history, pareto_indices
from peftlab.search.study import CostModel
from peftlab.space import load_space

HERE = Path(__file__).resolve().parent
EVIDENCE = HERE / "results" / "search_evidence"
OUT = HERE / "results" / "found_vs_presets"
REPORT = HERE / "results" / "found_vs_presets.md"
SAMPLER = "autopeft"
#: stored-% bin edges; the bins that the front's points fall in are compared
BINS = (0.0, 0.2, 1.0, 3.0, 100.0)
#: preset -> (its size setting, the sizes to choose from); ia3 has none
SIZES: dict[str, tuple[str | None, tuple[int, ...]]] = {
    "lora": ("r", (1, 2, 4, 8, 16, 32, 64, 128)),
    "pfeiffer": ("size", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    "houlsby": ("size", (1, 2, 4, 8, 16, 32, 64, 128)),
    "parallel": ("size", (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
    "prefix": ("length", (1, 2, 5, 10, 20, 30, 50)),
    "ia3": (None, ()),
    "unipelt": ("size", (1, 2, 4, 8, 16, 48, 128)),
    "mam": ("size", (4, 16, 64, 128, 256, 512)),
}


def _bin(stored: float) -> int:
    return next(i for i in range(len(BINS) - 1) if BINS[i] <= stored < BINS[i + 1])


def _bin_name(i: int) -> str:
    return f"{BINS[i]:g}–{BINS[i + 1]:g}%"


def _study_table() -> tuple[str, list[dict]]:
    """The evidence study of TASK and SAMPLER with the largest final hypervolume, and its completed trials."""
    refs = json.loads((EVIDENCE / "reference_points.json").read_text())
    best, rows = None, []
    for path in sorted((EVIDENCE / TASK).glob(f"{TASK}-{SAMPLER}-s*.csv")):
        with path.open() as f:
            done = [r for r in csv.DictReader(f) if r["state"] == "complete"]
        points = [(float(r["score"]), float(r["stored_percent"])) for r in done]
        hv = hypervolume_history(points, refs[TASK])[-1]
        if best is None or hv > best[0]:
            best, rows = (hv, path.stem), done
    if best is None:
        raise SystemExit(f"no {TASK}-{SAMPLER} trial table under {EVIDENCE / TASK}: run search_evidence.py first")
    return best[1], rows


def cmd_plan(_: argparse.Namespace) -> None:
    """Choose the configurations: the study's front (above the constant prediction) and the presets per bin."""
    study, rows = _study_table()
    floor = json.loads((EVIDENCE / "reference_points.json").read_text())[TASK][0]
    points = [(float(r["score"]), float(r["stored_percent"])) for r in rows]
    front = [rows[i] for i in pareto_indices(points) if points[i][0] > floor + 1e-9]
    cost = CostModel(MODEL)
    space = load_space("autopeft", cost)
    configs = []
    for r in front:
        spec = space.decode(to_vector(space, json.loads(r["params"])))
        stored = cost.percents(spec)["stored"]
        name = f"found-t{int(r['trial']):02d}"
        configs.append({"name": name, "spec": spec.to_dict(), "stored": stored, "search_dev": float(r["score"])})
    bins = sorted({_bin(c["stored"]) for c in configs})
    for preset, (key, sizes) in SIZES.items():
        options = [(s, methods.get(preset, **{key: s})) for s in sizes] if key else [(None, methods.get(preset))]
        sized = [(s, spec, cost.percents(spec)["stored"]) for s, spec in options]
        for b in bins:
            inside = [o for o in sized if _bin(o[2]) == b]
            if not inside:
                continue
            middle = math.sqrt(max(BINS[b], 0.01) * BINS[b + 1])
            size, spec, stored = min(inside, key=lambda o: abs(math.log(o[2] / middle)))
            name = preset if key is None else f"{preset}-{key}{size}"
            configs.append({"name": name, "spec": spec.to_dict(), "stored": stored, "preset": preset})
    OUT.mkdir(parents=True, exist_ok=True)
    plan = {"study": study, "task": TASK, "model": MODEL, "bins": [_bin_name(b) for b in bins], "configs": configs}
    (OUT / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    for c in configs:
        print(f"{c['name']:>24}  stored {c['stored']:.3f}%  bin {_bin_name(_bin(c['stored']))}")


def _plan() -> dict:
    if not (OUT / "plan.json").is_file():
        raise SystemExit("no plan yet: run `python benchmarks/found_vs_presets.py plan` first")
    return json.loads((OUT / "plan.json").read_text())


def _folder(task: str) -> tuple[Path, Path]:
    """Where a task's runs (and runs.csv) and report go: the search's task, or a transfer task."""
    if task == TASK:
        return OUT, REPORT
    return OUT / f"transfer-{task}", HERE / "results" / f"found_vs_presets_{task}.md"


def _configs(plan: dict, names: list[str] | None) -> list[dict]:
    known = [c["name"] for c in plan["configs"]]
    if unknown := sorted(set(names or []) - set(known)):
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}: the plan has {', '.join(known)}")
    return [c for c in plan["configs"] if names is None or c["name"] in names]


def cmd_run(args: argparse.Namespace) -> None:
    folder, _ = _folder(args.task)
    configs = _configs(_plan(), args.configs)
    done = set(retrain.committed(folder / "runs.csv"))
    for seed in SEEDS:
        for c in configs:
            out = folder / "runs" / c["name"] / f"seed{seed}"
            if not (out / "record.json").is_file() and (c["name"], seed) not in done:
                retrain.train(c["name"], c["spec"], seed, out, args.data_dir, args.task)


def _single_seed_rhos(rows: list[dict], flat: list[dict], step: int) -> list[float]:
    """Per seed, Spearman's rho of that seed's dev score at ``step`` against the seed-mean test score: how well
    one run, as a search trial is, ranks the configurations."""
    rhos = []
    for seed in SEEDS:
        pairs = [
            (d, statistics.mean(r["test"].values()))
            for r in rows
            for x in flat
            if x["config"] == r["name"] and int(x["seed"]) == seed and (d := retrain.dev_at(x, step)) is not None
        ]
        if len(pairs) > 2:
            rhos.append(float(stats.spearmanr(*zip(*pairs, strict=True)).statistic))
    return rhos


def _fidelity(rows: list[dict], flat: list[dict]) -> list[str]:
    """Whether a short run ranks configurations as the long one does: Spearman's rho, over the configurations, of
    the seed-mean dev score at each evaluated step (step 100 is the search's trial length, though here inside a
    500-step schedule whose learning rate has decayed less) against the seed-mean test score at the end (the last
    step's rho is the dev split's own noise against the test split's); and, for the front's points, of the search
    trial's own dev score against it."""
    lines = ["## Fidelity: does a short run rank configurations as the full budget does?", ""]
    for step in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY):
        at_step, final = [], []
        for r in rows:
            devs = [d for x in flat if x["config"] == r["name"] and (d := retrain.dev_at(x, step)) is not None]
            if devs:
                at_step.append(statistics.mean(devs))
                final.append(statistics.mean(r["test"].values()))
        if len(at_step) > 2:
            rho = stats.spearmanr(at_step, final)
            single = _single_seed_rhos(rows, flat, step)
            lines.append(
                f"- dev at step {step} vs test after {STEPS} steps, {len(at_step)} configurations (seed means): "
                f"Spearman rho = {rho.statistic:.2f} (p = {rho.pvalue:.2g}); one seed's dev (as a search trial has): "
                f"rho {retrain.mean_sd(single)} over seeds {', '.join(str(s) for s in SEEDS)}"
            )
    found = [r for r in rows if "search_dev" in r]
    if len(found) > 2:
        rho = stats.spearmanr([r["search_dev"] for r in found], [statistics.mean(r["test"].values()) for r in found])
        lines.append(
            f"- the front's points: the search trial's {TASK} dev score (100 steps) vs test after {STEPS} steps, "
            f"{len(found)} configurations: Spearman rho = {rho.statistic:.2f} (p = {rho.pvalue:.2g})"
        )
    return [*lines, ""] if len(lines) > 2 else []


def cmd_report(args: argparse.Namespace) -> None:
    plan = _plan()
    folder, report = _folder(args.task)
    runs = retrain.committed(folder / "runs.csv")  # then what this machine has run (the same runs, or more)
    runs |= {
        (c["name"], seed): retrain.run_row(c["name"], c["stored"], seed, r)
        for c in plan["configs"]
        for seed, r in retrain.records(folder / "runs" / c["name"]).items()
    }
    if not runs:
        raise SystemExit(f"no runs on {args.task} yet: `python benchmarks/found_vs_presets.py run --task {args.task}`")
    flat = sorted(runs.values(), key=lambda r: (int(r["seed"]), r["config"]))
    rows = []
    for c in plan["configs"]:
        tests = {int(r["seed"]): float(r["test"]) for r in flat if r["config"] == c["name"]}
        if tests:
            rows.append({**c, "test": tests, "bin": _bin(c["stored"])})
    lines = [
        f"# Found configurations against the presets: {MODEL}, {args.task}",
        "",
        f"- written {datetime.now(UTC).isoformat(timespec='minutes')}; command and protocol: "
        f"`benchmarks/found_vs_presets.py` (its docstring); runs: `{folder.relative_to(HERE / 'results')}/runs.csv`",
        f"- the front of `{plan['study']}` (its trials above the constant prediction), "
        + ("" if args.task == TASK else f"found on {TASK} and trained here on {args.task} (transfer), ")
        + f"re-trained for {STEPS} steps (the search's trials had 100), lr {LR:g} for every row, seeds "
        f"{', '.join(map(str, SEEDS))}; test = {retrain.TASKS[args.task][1]}, scored at the best of the evaluations "
        "on the 1000-example dev split",
        "- paired t-test: each row against the bin's best preset (by mean test score) over the seeds both have "
        "(the same seed trains on the same batches)",
        "",
    ]
    for b in sorted({r["bin"] for r in rows}):
        inside = sorted((r for r in rows if r["bin"] == b), key=lambda r: -statistics.mean(r["test"].values()))
        presets = [r for r in inside if "preset" in r]
        best = presets[0] if presets else None
        lines += [
            f"## Stored {_bin_name(b)}",
            "",
            "| configuration | stored % | seeds | test (mean ± std) | search's dev (100 steps) | vs best preset | p |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in inside:
            diff, p = retrain.paired(r["test"], best["test"]) if best is not None and r is not best else ("", "")
            dev = f"{r['search_dev']:.3f}" if "search_dev" in r else ""
            lines.append(
                f"| {r['name']} | {r['stored']:.3f} | {len(r['test'])} | {retrain.mean_sd(list(r['test'].values()))} | "
                f"{dev} | {diff} | {p} |"
            )
        lines.append("")
    lines += _fidelity(rows, flat)
    seeds = {r["name"]: len(r["test"]) for r in rows}
    missing = [c["name"] for c in plan["configs"] if seeds.get(c["name"], 0) < len(SEEDS)]
    if missing:
        lines += [f"Not all seeds run yet: {', '.join(missing)}.", ""]
    report.write_text("\n".join(lines))
    retrain.write_runs(folder / "runs.csv", flat)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["plan", "run", "report"])
    p.add_argument("--task", default=TASK, choices=sorted(retrain.TASKS), help=f"train here (not {TASK}: transfer)")
    p.add_argument("--configs", nargs="+", help="run only these configurations of the plan")
    p.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR", str(HERE.parent.parent / "shared/data")))
    args = p.parse_args()
    {"plan": cmd_plan, "run": cmd_run, "report": cmd_report}[args.phase](args)


if __name__ == "__main__":
    main()
