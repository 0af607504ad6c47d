"""S4's refinement with error bars, and the design it chooses against the uniform designs, on MiniLM and SST-2.

Phase 1 (``refine``): ``peftlab refine`` over ``s4_minilm.json`` (4 groups, 0.5% budget; groupings, allocations,
tuned groups, then one strategy per group among adapter, prefix, BitFit and LoRA) at the search evidence's fidelity
(``search_evidence.py``: 100 steps, batch 16, lr 1e-3, max length 64, the 1000-example dev split, test untouched),
``SAMPLES`` points per candidate. Each stage's margin (chosen mean minus the runner-up's) is reported in standard
errors of that difference: a margin under 2 σ is a choice the data cannot tell from noise.

Phase 2 (``retrain``): the chosen design and the uniform designs (uniform grouping and allocation, every group tuned,
one strategy everywhere: adapter, prefix and LoRA sized to the same budget; BitFit has no size and stores what it
stores) re-trained at the evidence's full budget (``retrain.py``: 500 steps, seeds 0, 1, 2, test at the best dev
checkpoint), with a paired t-test of the design against each.

    python benchmarks/s4_evidence.py run       # both phases, resumable (background, one thread)
    python benchmarks/s4_evidence.py report    # results/s4_evidence.md

Compute: 26 candidates x SAMPLES trials of ~40 s (about 50 minutes at 3 samples on one core), then 15 runs of ~3
minutes. A killed refinement resumes from its study (``results/s4_evidence/runs/``, git-ignored); the committed
``s4_evidence/refine.json`` (every candidate's scores) and ``s4_evidence/runs.csv`` redraw the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import retrain
from retrain import MODEL, SEEDS, STEPS, TASK

from peftlab.search.study import CostModel
from peftlab.space import load_space
from peftlab.space.design import DesignChoice

HERE = Path(__file__).resolve().parent
SPACE = HERE / "s4_minilm.json"
OUT = HERE / "results" / "s4_evidence"
RUNS = OUT / "runs"
REPORT = HERE / "results" / "s4_evidence.md"
SAMPLES = 3
#: the refinement's trials: the search evidence's SST-2 fidelity
TRIAL_FLAGS = [
    "--batch-size", "16", "--group-by-length", "--dev-size", "1000", "--max-length", "64", "--max-steps", "100",
    "--eval-every", "100", "--lr", "0.001", "--seed", "0", "--sampler-seed", "0",
]  # fmt: skip
UNIFORM = ("adapter", "prefix", "bitfit", "lora")


def cmd_refine(args: argparse.Namespace) -> None:
    if (OUT / "refine.json").is_file():
        return
    out = RUNS / "refine"
    cmd = [
        sys.executable, "-m", "peftlab.cli", "refine", "--model", MODEL, "--task", TASK, "--space", str(SPACE),
        "--samples", str(SAMPLES), "--study", "s4", "--output", str(out), "--no-progress", "--data-dir",
        args.data_dir, *TRIAL_FLAGS,
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True, exist_ok=True)
    print(f"{datetime.now(UTC):%H:%M} refine, {SAMPLES} samples per candidate", flush=True)
    with (RUNS / "refine.log").open("a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code:
        raise SystemExit(f"refine failed ({code}); see {RUNS / 'refine.log'}")
    shutil.copy(out / "refine.json", OUT / "refine.json")


def design_name(spec: dict) -> str:
    """The chosen design's row: named by its spec, so a refinement run again that chooses another design does not
    inherit the runs of the old one (they stay in runs.csv under their own name)."""
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:6]
    return f"s4-design-{digest}"


def configs() -> list[dict]:
    """The design the refinement chose and the uniform designs, with their specs and stored %."""
    chosen = json.loads((OUT / "refine.json").read_text())
    cost = CostModel(MODEL)
    space = load_space(SPACE, MODEL)
    out = [{"name": design_name(chosen["spec"]), "spec": chosen["spec"], "stored": chosen["stored_percent"]}]
    for strategy in UNIFORM:
        spec = space.spec(DesignChoice("uniform", "uniform", (1, 2, 3, 4), ((strategy,),) * 4))
        out.append({"name": f"uniform-{strategy}", "spec": spec.to_dict(), "stored": cost.percents(spec)["stored"]})
    return out


def cmd_run(args: argparse.Namespace) -> None:
    cmd_refine(args)
    done = set(retrain.committed(OUT / "runs.csv"))
    for seed in SEEDS:
        for c in configs():
            out = RUNS / c["name"] / f"seed{seed}"
            if not (out / "record.json").is_file() and (c["name"], seed) not in done:
                retrain.train(c["name"], c["spec"], seed, out, args.data_dir)


def _stage_lines(refinement: dict) -> list[str]:
    lines = [
        f"## The refinement: {SAMPLES} points per candidate at 100 steps, dev accuracy on 1000 examples",
        "",
        "σ of one dev accuracy ≈ 1.3 points; a candidate's points differ in the dimensions not fixed yet, so its "
        "spread is that of the designs it holds, not only of the seed. Margin: the chosen mean minus the runner-up's, "
        "and in standard errors of that difference.",
        "",
        "| stage | candidates (mean ± std of dev) | chosen | margin | margin / σ |",
        "|---|---|---|---:|---:|",
    ]
    for st in refinement["stages"]:
        if st["skipped"]:
            lines.append(f"| {st['stage']} | – ({st['skipped']}) | {st['chosen']} | | |")
            continue
        cands = "; ".join(
            f"{c['value']} {retrain.mean_sd(c['scores'])}" if c["scores"] else f"{c['value']} –"
            for c in st["candidates"]
        )
        margin = "" if st["margin"] is None else f"{st['margin']:+.3f}"
        sigma = "" if st["margin_sigma"] is None else f"{st['margin_sigma']:.1f}"
        lines.append(f"| {st['stage']} | {cands} | {st['chosen']} | {margin} | {sigma} |")
    # the constant prediction's dev score: the search evidence's reference point, computed on the same dev split
    constant = json.loads((HERE / "results" / "search_evidence" / "reference_points.json").read_text())[TASK][0]
    scores = [x for st in refinement["stages"] for c in st["candidates"] for x in c["scores"]]
    stuck = sum(x <= constant + 0.005 for x in scores)
    lines += [
        "",
        f"{stuck} of the {len(scores)} samples stayed within half a point of the constant prediction's dev score "
        f"({constant:.3f}): they had not started to learn at 100 steps, whatever their design. These samples (and a "
        "few that had barely left it) give most candidates a spread of 10 points or more, which keeps most margins "
        "under 2 σ.",
    ]
    design = ", ".join(f"{k} {v}" for k, v in refinement["design"].items())
    return [*lines, "", f"Chosen design: {design}; stored {refinement['stored_percent']:.3f}%.", ""]


def cmd_report(_: argparse.Namespace) -> None:
    if not (OUT / "refine.json").is_file():
        raise SystemExit("no refinement yet: run `python benchmarks/s4_evidence.py run` first")
    refinement = json.loads((OUT / "refine.json").read_text())
    runs = retrain.committed(OUT / "runs.csv")  # then what this machine has run
    cs = configs()
    runs |= {
        (c["name"], seed): retrain.run_row(c["name"], c["stored"], seed, r)
        for c in cs
        for seed, r in retrain.records(RUNS / c["name"]).items()
    }
    flat = sorted(runs.values(), key=lambda r: (int(r["seed"]), r["config"]))  # earlier designs' runs too
    tests = {c["name"]: {int(r["seed"]): float(r["test"]) for r in flat if r["config"] == c["name"]} for c in cs}
    lines = [
        f"# S4 with error bars: {MODEL}, {TASK}",
        "",
        f"- written {datetime.now(UTC).isoformat(timespec='minutes')}; command and protocol: "
        "`benchmarks/s4_evidence.py` (its docstring); every candidate's scores: `s4_evidence/refine.json`; every "
        "re-training run: `s4_evidence/runs.csv`",
        "",
        *_stage_lines(refinement),
        f"## The chosen design against the uniform designs: {STEPS} steps, seeds {', '.join(map(str, SEEDS))}",
        "",
        f"Test = {retrain.TEST_SIGMA}. Paired t-test of the design against each row over the seeds both have.",
        "",
        "| configuration | stored % | seeds | test (mean ± std) | design − row | p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    name = cs[0]["name"]
    design = tests[name]
    for c in cs:
        t = tests[c["name"]]
        if not t:
            lines.append(f"| {c['name']} | {c['stored']:.3f} | 0 | – | | |")
            continue
        diff, p = retrain.paired(design, t) if c["name"] != name else ("", "")
        lines.append(
            f"| {c['name']} | {c['stored']:.3f} | {len(t)} | {retrain.mean_sd(list(t.values()))} | {diff} | {p} |"
        )
    best_uniform = max((n for n in tests if n != name and tests[n]), default=None,
                       key=lambda n: statistics.mean(tests[n].values()))  # fmt: skip
    if best_uniform and design:
        diff, p = retrain.paired(design, tests[best_uniform])
        lines += ["", f"Against the best uniform design ({best_uniform}): {diff} (paired p {p or '–'})."]
    missing = [c["name"] for c in cs if len(tests[c["name"]]) < len(SEEDS)]
    if missing:
        lines += ["", f"Not all seeds run yet: {', '.join(missing)} (`python benchmarks/s4_evidence.py run` resumes)."]
    REPORT.write_text("\n".join([*lines, ""]))
    if flat:
        retrain.write_runs(OUT / "runs.csv", flat)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["run", "report"])
    p.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR", str(HERE.parent.parent / "shared/data")))
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.phase](args)


if __name__ == "__main__":
    main()
