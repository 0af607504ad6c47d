"""Sampler efficiency with error bars: several seeds of each sampler's search on the real MiniLM over the AutoPEFT
space, hypervolume against trials and against compute seconds.

Every study is a ``peftlab search`` in a fresh process, with the defaults a user gets except what the protocol
pins (below). Studies advance in rounds of ``--chunk`` trials, every study of the plan to the same count before
any goes further, so a run stopped at any point leaves a balanced comparison; ``run`` resumes where the studies
stand (each study is a SQLite file under ``--runs``; a trial that was running when the process died is retried by
the next call). A file ``PAUSE`` in the runs folder makes ``run`` wait before its next search call (so timings
taken elsewhere see a quiet machine); delete it to go on.

    python benchmarks/search_evidence.py run --plan sst2:random sst2:autopeft --seeds 0 1 2 --trials 60
    python benchmarks/search_evidence.py report

A sampler named ``autopeft-log`` is the autopeft sampler with ``--cost-scale log`` (its acquisition improves the
hypervolume with stored % on a log10 axis); every study's curve is measured on the linear axis and, in the report's
log-axis table, on the log one. A task named ``sst2@300`` is SST-2 at 300 steps per trial (the fidelity at which
re-trained configurations rank as at the end: ``found_vs_presets.md``), with studies of its own.

Protocol (pinned for every study, so their numbers compare): MiniLM, batch 16, ``--group-by-length``, lr 1e-3,
``--max-steps`` per task (the low fidelity), one dev evaluation per trial (the hopeless check at a quarter of the
budget), a 1000-example dev split held out from train with data seed 0 (the same split for every seed; the test
split, GLUE's dev set, is not looked at during the search), 10 random start-up trials for every model-based
sampler, the AutoPEFT sampler's NUTS settings at the library defaults written out (so a later change of default
does not change a running benchmark), one worker with one thread per study. Seed s sets both ``--seed``
(training) and ``--sampler-seed``. The reference point is the search's default: the constant prediction's dev
score and 1.1 x the space's costliest point, the same for every study of a task.

compute_s of a trial is its Optuna duration: from the trial's creation, through the sampler's suggestion
(recorded alone as ``suggest_s``), to its result; process start-up, backbone loading and the Pareto set's test
scoring after each call are not in it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import optuna
import retrain
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from peftlab.cli import build_parser, search_config
from peftlab.errors import PeftlabError
from peftlab.search import results
from peftlab.search.params import distributions, to_vector
from peftlab.search.pareto import hypervolume_history
from peftlab.search.study import counted, create_study, load_study, search_defaults

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search_evidence"
RUNS = RESULTS / "runs"  # studies and trial adapters: git-ignored (runs/), the exported tables are committed
TASKS = {  # task -> flags of its trials
    "sst2": ["--max-length", "64", "--max-steps", "100"],
    "mrpc": ["--max-length", "128", "--max-steps", "150"],
    "stsb": ["--max-length", "128", "--max-steps", "150"],
}
#: tasks whose dev score is a correlation (STS-B: Spearman's); the others' is an accuracy
CORRELATION_TASKS = {"stsb"}
MARKS = (10, 20, 30, 40, 50, 60)
STARTUP = 10  # random start-up trials of every model-based sampler
DEV_SIZE = 1000  # dev examples held out of train: every trial's score
TASK_OF_PRESETS = "sst2"  # the task of found_vs_presets' re-training runs, which measure the training-seed noise
SURROGATE = RESULTS / "surrogate.json"  # the score GP's held-out predictions (phase surrogate)


def _task_flags(task: str) -> tuple[str, list[str]]:
    """The peftlab task and its trials' flags of a plan's task: ``sst2``, or ``sst2@300`` for the same task at
    another fidelity (300 steps per trial; its studies, tables and reference point are its own)."""
    base, _, steps = task.partition("@")
    if base not in TASKS or (steps and not steps.isdigit()):
        raise SystemExit(f"unknown task {task!r}: one of {', '.join(TASKS)}, optionally @STEPS (e.g. sst2@300)")
    flags = list(TASKS[base])
    if steps:
        flags[flags.index("--max-steps") + 1] = steps
    return base, flags


def dev_sigma(task: str, score):
    """σ of one dev score near ``score`` (a float or an array) on the DEV_SIZE-example dev split: an accuracy's
    binomial sqrt(p(1-p)/n), or a correlation's (1 - r²)/sqrt(n - 3) (Fisher's z, back-transformed; Spearman's is
    about 3% wider for normal data)."""
    base = _task_flags(task)[0]
    if base in CORRELATION_TASKS:
        return (1 - np.square(score)) / np.sqrt(DEV_SIZE - 3)
    return np.sqrt(score * (1 - np.asarray(score)) / DEV_SIZE)


def _dev_sigma_formula(task: str) -> str:
    return f"(1-r²)/sqrt({DEV_SIZE - 3})" if _task_flags(task)[0] in CORRELATION_TASKS else f"sqrt(p(1-p)/{DEV_SIZE})"


def _steps(task: str) -> int:
    flags = _task_flags(task)[1]
    return int(flags[flags.index("--max-steps") + 1])


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _name(task: str, sampler: str, seed: int) -> str:
    return f"{task}-{sampler}-s{seed}"


def command(task: str, sampler: str, seed: int, trials: int, data_dir: str, runs: Path) -> list[str]:
    """The ``peftlab search`` arguments of one study, up to ``trials`` finished trials. A sampler named ``S-log`` is
    sampler S with ``--cost-scale log``."""
    name = _name(task, sampler, seed)
    sampler, log = sampler.removesuffix("-log"), sampler.endswith("-log")
    base, flags = _task_flags(task)
    return [
        "search",
        "--model",
        "minilm",
        "--task",
        base,
        "--space",
        "autopeft",
        "--sampler",
        sampler,
        "--study",
        name,
        "--output",
        str(runs / name),
        "--trials",
        str(trials),
        "--seed",
        str(seed),
        "--sampler-seed",
        str(seed),
        "--batch-size",
        "16",
        "--group-by-length",
        "--dev-size",
        str(DEV_SIZE),
        "--lr",
        "0.001",
        "--startup-trials",
        str(STARTUP),
        "--nuts-warmup",
        "64",
        "--nuts-samples",
        "32",
        "--nuts-thinning",
        "4",
        "--no-plots",
        "--no-progress",
        "--data-dir",
        data_dir,
        *flags,
        *(["--cost-scale", "log"] if log else []),
    ]


def _load(runs: Path, name: str):
    """The study (None before its first call)."""
    if not (runs / name / "study.db").is_file():
        return None
    try:
        return load_study(str(runs / name / "study.db"), name)[0]
    except (PeftlabError, optuna.exceptions.OptunaError):
        return None


def _finished(runs: Path, name: str) -> int:
    study = _load(runs, name)
    return counted(study)[0] if study is not None else 0


def share_startup(runs: Path, task: str, sampler: str, seed: int, data_dir: str) -> bool:
    """Give a new model-based study of seed s the random study's first STARTUP trials of seed s, instead of training
    them again: the start-up trials of the AutoPEFT and TPE samplers and NSGA-II's first generation are drawn by
    ``RandomSampler(s)``, the random study's sampler, so they are the same points (checked: all 10 equal for seeds 0
    and 1), and training is deterministic for a seed (for seed 0 both the AutoPEFT and the random study trained all
    10 and got identical values). The copies keep their timings, so compute_s counts them in both studies. False when
    the random study has not got that far yet (the model-based one then trains its own)."""
    name, source = _name(task, sampler, seed), _load(runs, _name(task, "random", seed))
    if sampler == "random" or _load(runs, name) is not None or source is None:
        return False
    done = [t for t in source.get_trials(deepcopy=False) if t.state.is_finished()][:STARTUP]
    if len(done) < STARTUP:
        return False
    config = search_defaults(search_config(build_parser().parse_args(command(task, sampler, seed, 1, data_dir, runs))))
    study, _ = create_study(config)
    for t in done:
        copy = FrozenTrial(
            number=t.number,
            state=t.state,
            value=None,
            values=t.values,
            datetime_start=t.datetime_start,
            datetime_complete=t.datetime_complete,
            params=t.params,
            distributions=t.distributions,
            user_attrs={**t.user_attrs, "copied_from_study": source.study_name},
            system_attrs={},
            intermediate_values={},
            trial_id=t._trial_id,
        )
        study.add_trial(copy)
    return True


def restore(runs: Path, task: str, sampler: str, seed: int, data_dir: str) -> bool:
    """Rebuild a study whose SQLite file is gone (a new machine) from its committed trial table: the same points,
    values, statuses and timings, so the sampler and the curves go on as if the study had never left. Its trials'
    adapters are not restored (the table does not hold them). False when there is a study or no table."""
    name, table = _name(task, sampler, seed), RESULTS / task / f"{_name(task, sampler, seed)}.csv"
    if (runs / name / "study.db").exists() or not table.is_file():
        return False
    config = search_defaults(search_config(build_parser().parse_args(command(task, sampler, seed, 1, data_dir, runs))))
    study, space = create_study(config)
    dists = distributions(space)
    clock = datetime(2026, 1, 1)  # Optuna keeps naive local times
    for r in _table(task, sampler, seed):
        start, clock = clock, clock + timedelta(seconds=float(r["compute_s"]))
        complete = r["state"] == "complete"
        attrs: dict = {"suggest_s": float(r["suggest_s"]), "timings": {}}
        for key in ("status", "copied_from_study"):
            if r[key]:
                attrs[key] = r[key]
        for key in ("stored_percent", "steps"):
            if r[key]:
                attrs[key] = float(r[key]) if key == "stored_percent" else int(r[key])
        for key in (*TIMINGS[1:], "total_s"):
            if r.get(key):
                attrs["timings"][key] = float(r[key])
        study.add_trial(
            FrozenTrial(
                number=int(r["trial"]),
                state=TrialState.COMPLETE if complete else TrialState.FAIL,
                value=None,
                values=[float(r["score"]), float(r["stored_percent"])] if complete else None,
                datetime_start=start,
                datetime_complete=clock,
                params=json.loads(r["params"]),
                distributions=dists,
                user_attrs=attrs,
                system_attrs={},
                intermediate_values={},
                trial_id=int(r["trial"]),
            )
        )
    return True


def cmd_run(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    plan = [(*item.split(":"), seed) for seed in args.seeds for item in args.plan]
    for task, _, _ in plan:
        _task_flags(task)
    for task, sampler, seed in plan:
        if restore(runs, task, sampler, seed, args.data_dir):
            print(f"{_name(task, sampler, seed)}: restored from its trial table", flush=True)
    for target in range(args.chunk, args.trials + args.chunk, args.chunk):
        target = min(target, args.trials)
        for task, sampler, seed in plan:
            name = _name(task, sampler, seed)
            if _finished(runs, name) >= target:
                continue
            while (runs / "PAUSE").exists():
                time.sleep(10)
            if share_startup(runs, task, sampler, seed, args.data_dir):
                print(f"{name}: start-up trials shared with {_name(task, 'random', seed)}", flush=True)
            cmd = command(task, sampler, seed, target, args.data_dir, runs)
            print(f"{datetime.now(UTC):%H:%M} $ peftlab {shlex.join(cmd)}", flush=True)
            with (runs / f"{name}.log").open("a") as log:
                code = subprocess.call(
                    [sys.executable, "-m", "peftlab.cli", *cmd], stdout=log, stderr=subprocess.STDOUT, env=_env()
                )
            if code:
                raise SystemExit(f"peftlab search failed ({code}); see {runs / f'{name}.log'}")
        cmd_export(args)


def _trial_rows(study) -> list[dict]:
    """One row per trial in number order: status, values, suggestion and compute seconds, the parameters."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else 0.0
        timings = t.user_attrs.get("timings") or {}
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "status": t.user_attrs.get("status", ""),
                "score": t.values[0] if t.state == TrialState.COMPLETE else "",
                "stored_percent": t.user_attrs.get("stored_percent", ""),
                "steps": t.user_attrs.get("steps", ""),
                "suggest_s": round(t.user_attrs.get("suggest_s", 0.0), 3),
                "copied_from_study": t.user_attrs.get("copied_from_study", ""),
                "compute_s": round(seconds, 3),
                **{k: round(v, 3) for k, v in timings.items()},
                "params": json.dumps(t.params, sort_keys=True),
            }
        )
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def cmd_export(args: argparse.Namespace) -> None:
    """Per study a trial table, and the long hypervolume CSV of all of them."""
    runs = Path(args.runs)
    long_rows, refs = [], {}
    for folder in sorted(p for p in runs.iterdir() if (p / "study.db").is_file()):
        study = _load(runs, folder.name)
        if study is None:
            continue
        (task, sampler), seed = folder.name.rsplit("-", 1)[0].split("-", 1), folder.name.rsplit("-", 1)[1]
        rows = _trial_rows(study)
        (RESULTS / task).mkdir(parents=True, exist_ok=True)
        _write_csv(RESULTS / task / f"{folder.name}.csv", rows)
        ref = results.ref_point(study)
        refs.setdefault(task, ref)
        if refs[task] != ref:
            raise SystemExit(f"{folder.name}: reference point {ref} differs from {refs[task]} of the task's others")
        points = [(r["score"], r["stored_percent"]) if r["state"] == "complete" else None for r in rows]
        compute = 0.0
        for n, (r, hv) in enumerate(zip(rows, hypervolume_history(points, ref), strict=True), 1):
            compute += r["compute_s"]
            long_rows.append(
                {
                    "sampler": sampler,
                    "seed": int(seed[1:]),
                    "task": task,
                    "trial": n,
                    "hypervolume": round(hv, 6),
                    "compute_s": round(compute, 1),
                }
            )
    _write_csv(RESULTS / "hypervolume.csv", long_rows)
    (RESULTS / "reference_points.json").write_text(json.dumps(refs, indent=2) + "\n")


def _curves() -> dict[tuple[str, str], dict[int, list[tuple[float, float]]]]:
    """(task, sampler) -> seed -> [(hypervolume, cumulative compute_s)] by trial count."""
    out: dict = {}
    with (RESULTS / "hypervolume.csv").open() as f:
        for r in csv.DictReader(f):
            seeds = out.setdefault((r["task"], r["sampler"]), {})
            seeds.setdefault(int(r["seed"]), []).append((float(r["hypervolume"]), float(r["compute_s"])))
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({len(values)})"


def cmd_report(args: argparse.Namespace) -> None:
    curves = _curves()
    refs = json.loads((RESULTS / "reference_points.json").read_text())
    lines = [
        "# Sampler efficiency: MiniLM over the AutoPEFT space",
        "",
        f"- written {datetime.now(UTC).isoformat(timespec='minutes')}; {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, one worker with one thread per study; python {platform.python_version()}",
        "- protocol and commands: `benchmarks/search_evidence.py` (its docstring); per-study trial tables "
        "`search_evidence/TASK/TASK-SAMPLER-sSEED.csv`; all curves: `search_evidence/hypervolume.csv`",
        "",
        "Hypervolume of (dev score, stored %) after N trials, mean ± sample std over seeds (number of seeds in "
        "brackets); reference points: " + ", ".join(f"{t} {tuple(r)}" for t, r in refs.items()) + ".",
        "",
        "| task | sampler | " + " | ".join(f"N={n}" for n in MARKS) + " | compute s / trial | suggest s / trial |",
        "|---|---|" + "---:|" * (len(MARKS) + 2),
    ]
    for (task, sampler), seeds in sorted(curves.items()):
        cells = [_mean_sd([c[n - 1][0] for c in seeds.values() if len(c) >= n]) for n in MARKS]
        per_trial = [c[-1][1] / len(c) for c in seeds.values()]
        table = [_table(task, sampler, s) for s in seeds]
        suggest = [statistics.mean(float(r["suggest_s"]) for r in t) for t in table if t]
        lines.append(
            f"| {task} | {sampler} | " + " | ".join(cells) + f" | {statistics.mean(per_trial):.1f} | "
            f"{statistics.mean(suggest):.2f} |"
        )
    lines += ["", "## Statuses", "", "| task | sampler | seed | trials | statuses |", "|---|---|---:|---:|---|"]
    for (task, sampler), seeds in sorted(curves.items()):
        for seed in sorted(seeds):
            rows = _table(task, sampler, seed)
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["status"] or r["state"]] = counts.get(r["status"] or r["state"], 0) + 1
            lines.append(f"| {task} | {sampler} | {seed} | {len(rows)} | {counts} |")
    lines += _breakdown(curves)
    lines += _analysis(curves, refs)
    lines += _surrogate_lines(refs)
    _plot(curves, refs)
    text = "\n".join(lines) + "\n"
    (HERE / "results" / "search_evidence.md").write_text(text)
    print(text)


TIMINGS = ("suggest_s", "data_s", "setup_s", "tokenize_s", "train_s", "eval_s", "checkpoint_s", "other_s")


def _breakdown(curves: dict) -> list[str]:
    """Where a trial's time goes (mean seconds over the trials each study trained itself, not the shared or copied
    ones), and the non-training share."""
    lines = [
        "",
        "## Where a trial's time goes",
        "",
        "Mean seconds per trained trial (a hopeless trial stops at half of its steps). suggest: the sampler; "
        "data / setup / tokenize: splits, the backbone (lent by the worker after its first trial) and token ids "
        "(cached per worker); eval: the dev split (1000 examples) and the hopeless check's 200; other: the rest. "
        "Seconds compare only roughly between samplers: a sampler's trials take the time of the configurations it "
        "proposes (larger modules train slower), and studies of different samplers ran at different times (each on "
        "one thread, with one other benchmark job on the other core, whose own load varied).",
        "",
        "| task | sampler | trials | " + " | ".join(t.removesuffix("_s") for t in TIMINGS) + " | total | not train |",
        "|---|---|---:|" + "---:|" * (len(TIMINGS) + 2),
    ]
    for task, sampler in sorted(curves):
        rows = [
            r
            for seed in curves[(task, sampler)]
            for r in _table(task, sampler, seed)
            if r.get("train_s") and not r.get("copied_from_study")
        ]
        if not rows:
            continue
        means = {k: statistics.mean(float(r.get(k) or 0) for r in rows) for k in TIMINGS}
        total = sum(means.values())
        cells = " | ".join(f"{means[k]:.1f}" for k in TIMINGS)
        lines.append(
            f"| {task} | {sampler} | {len(rows)} | {cells} | {total:.1f} | {1 - means['train_s'] / total:.0%} |"
        )
    return lines


def _points(task: str, sampler: str, seed: int) -> list[tuple[float, float]]:
    return [(float(r["score"]), float(r["stored_percent"])) for r in _table(task, sampler, seed) if r["score"]]


def _seeds_for_power(a: list[float], b: list[float]) -> str:
    """Seeds per sampler that a two-sided test at 5% needs to find the observed difference of means 80% of the time,
    if it and the pooled spread were the truth (normal approximation): how far 3 seeds are from settling it."""
    diff = abs(statistics.mean(a) - statistics.mean(b))
    var = (statistics.variance(a) + statistics.variance(b)) / 2
    if diff == 0:
        return "–"
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    return str(math.ceil(2 * z**2 * var / diff**2))


def _by_marks_header() -> list[str]:
    """The header of a table of one value per sampler at each trial count of MARKS."""
    return ["| sampler | " + " | ".join(f"N={n}" for n in MARKS) + " |", "|---|" + "---:|" * len(MARKS)]


def _log_cost_table(task: str, samplers: list[str], curves: dict, ref: list[float]) -> list[str]:
    """The same studies' hypervolume with the cost on a log10 axis (computed afterwards from the trial tables; only
    ``-log`` samplers optimised it): each decade of stored % weighs the same, so the fronts' shape counts."""
    lines = [
        "Hypervolume with stored % on a log10 axis (`--cost-scale log`; same trials, same reference point, log10 "
        "of its cost; a view that only the `-log` samplers optimised), mean ± std over seeds:",
        "",
        *_by_marks_header(),
    ]
    histories = {}
    for s in samplers:
        history = histories[s] = _log_histories(task, s, curves[(task, s)], ref)
        cells = [_mean_sd([h[n - 1] for h in history.values() if len(h) >= n]) for n in MARKS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in samplers:
        if s != "random" and "random" in samplers:
            lines += _against_random(s, histories, "on the log axis")
    return lines


def _log_histories(task: str, sampler: str, seeds, ref: list[float]) -> dict[int, list[float]]:
    """Seed -> hypervolume after each trial with stored % on a log10 axis (from the trial tables)."""
    out = {}
    for seed in seeds:
        rows = _table(task, sampler, seed)
        points = [(float(r["score"]), float(r["stored_percent"])) if r["score"] else None for r in rows]
        out[seed] = hypervolume_history(points, ref, "log")
    return out


def _against_random(sampler: str, histories: dict[str, dict[int, list[float]]], view: str) -> list[str]:
    """``sampler`` against random by N (Welch's t-test over seeds) and the goal: ``sampler`` at N/2 ≥ random at N;
    ``histories``: sampler -> seed -> hypervolume after each trial."""
    lines = [
        f"{sampler} against random {view} (Welch's t-test over seeds; the goal: {sampler} at N/2 ≥ random at N):",
        "",
        f"| N | {sampler} at N | random at N | t | p | seeds for 80% power | {sampler} at N/2 | goal met |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in MARKS:
        a = [h[n - 1] for h in histories[sampler].values() if len(h) >= n]
        r = [h[n - 1] for h in histories["random"].values() if len(h) >= n]
        half = [h[n // 2 - 1] for h in histories[sampler].values() if len(h) >= n // 2]
        if len(a) < 2 or len(r) < 2:
            continue
        t, pv = stats.ttest_ind(a, r, equal_var=False)
        met = "yes" if statistics.mean(half) >= statistics.mean(r) else "no"
        lines.append(
            f"| {n} | {_mean_sd(a)} | {_mean_sd(r)} | {t:.2f} | {pv:.2f} | {_seeds_for_power(a, r)} | "
            f"{_mean_sd(half)} | {met} |"
        )
    return [*lines, ""]


def _analysis(curves: dict, refs: dict) -> list[str]:
    """What the curves say and why: each sampler's distance from the best front any study found (the union of every
    trial of the task), the N/2 goal, Welch's t-test between samplers, and what the model-based trials proposed."""
    lines = ["", "## Against the best known front, and the N/2 goal", ""]
    for task in sorted({t for t, _ in curves}):
        samplers = sorted(s for t, s in curves if t == task)
        union = [p for s in samplers for seed in curves[(task, s)] for p in _points(task, s, seed)]
        best = hypervolume_history(union, refs[task])[-1]
        ceiling = (max(p[0] for p in union) - refs[task][0]) * refs[task][1]
        started = [c[STARTUP - 1][0] for s in samplers for c in curves[(task, s)].values() if len(c) >= STARTUP]
        start = (
            f"after the {STARTUP} random start-up trials every study already stands at "
            f"{100 * min(started) / ceiling:.0f}% of that or more, and the samplers compete for the rest. "
            if started and ceiling > 0
            else ""
        )
        lines += [
            f"**{task}**: the union of all {len(union)} trials has hypervolume {best:.3f}; the most any front could "
            f"have with the best score found is {ceiling:.3f} (that score at 0 stored parameters); {start}"
            "Regret = the union's hypervolume minus the study's, mean ± std over seeds:",
            "",
            *_by_marks_header(),
        ]
        for s in samplers:
            cells = [_mean_sd([best - c[n - 1][0] for c in curves[(task, s)].values() if len(c) >= n]) for n in MARKS]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        shares = []
        for s in samplers:
            for seed in curves[(task, s)]:
                points = _points(task, s, seed)
                top = max(points, key=lambda p: (p[0], -p[1]))
                shares.append(hypervolume_history([top], refs[task])[-1] / hypervolume_history(points, refs[task])[-1])
        top_score = max(p[0] for p in union)
        sigma = float(dev_sigma(task, top_score))
        lines += [
            "",
            f"What the hypervolume measures here: the study's single best-scoring point alone holds {min(shares):.0%}–"
            f"{max(shares):.0%} of its final hypervolume (median {statistics.median(shares):.0%}, {len(shares)} "
            "studies), because the reference point's cost (the space's costliest corner) is far beyond where the good "
            "configurations are. So the curves mostly compare the best dev score each study found, a maximum of "
            f"noisy scores (σ of one near the best, {_dev_sigma_formula(task)}: {100 * sigma:.1f} points), more than "
            "the shape of the fronts.",
            "",
            *_log_cost_table(task, samplers, curves, refs[task]),
        ]
        linear = {s: {seed: [hv for hv, _ in c] for seed, c in curves[(task, s)].items()} for s in samplers}
        for s in samplers:
            if s != "random" and "random" in samplers:
                lines += _against_random(s, linear, "on the linear axis")
        lines += [
            "What each sampler proposed after the 10 start-up trials (all seeds pooled): dev score and stored %, "
            "and how many trials stayed at the constant prediction's score or below:",
            "",
            "| sampler | trials | median score | mean score | at/below constant | median stored % | stored < 1% |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in samplers:
            later = [p for seed in curves[(task, s)] for p in _points(task, s, seed)[STARTUP:]]
            if not later:
                continue
            scores, stored = [p[0] for p in later], [p[1] for p in later]
            lines.append(
                f"| {s} | {len(later)} | {statistics.median(scores):.3f} | {statistics.mean(scores):.3f} | "
                f"{sum(x <= refs[task][0] + 1e-9 for x in scores)} | {statistics.median(stored):.2f} | "
                f"{sum(x < 1 for x in stored)} |"
            )
    return lines


def _plot(curves: dict, refs: dict) -> None:
    """results/search_evidence.png: hypervolume regret (the best known front's hypervolume minus the study's, log
    scale: the raw curves sit within a few percent of each other) against trials and against compute hours, and the
    regret on the log cost axis against trials; mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in curves})
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        union = [p for (t, s), seeds in curves.items() if t == task for seed in seeds for p in _points(t, s, seed)]
        best = hypervolume_history(union, refs[task])[-1]
        best_log = hypervolume_history(union, refs[task], "log")[-1]
        for (t, sampler), seeds in sorted(curves.items()):
            if t != task:
                continue
            n = min(len(c) for c in seeds.values())
            logs = _log_histories(task, sampler, seeds, refs[task])
            hours = np.array([[c[i][1] / 3600 for i in range(n)] for c in seeds.values()]).mean(axis=0)
            trials = np.arange(1, n + 1)
            for ax, x, regret in (
                (row[0], trials, [[best - c[i][0] for i in range(n)] for c in seeds.values()]),
                (row[1], hours, [[best - c[i][0] for i in range(n)] for c in seeds.values()]),
                (row[2], trials, [[best_log - h[i] for i in range(n)] for h in logs.values()]),
            ):
                r = np.maximum(np.array(regret), 1e-3)
                mean, sd = r.mean(axis=0), r.std(axis=0, ddof=1) if len(r) > 1 else np.zeros(n)
                ax.plot(x, mean, label=f"{sampler} ({len(r)} seeds)")
                ax.fill_between(x, mean - sd, mean + sd, alpha=0.2)
        row[0].set(xlabel="trials", ylabel=f"hypervolume regret ({task})", yscale="log")
        row[1].set(xlabel="compute hours (training + suggestion, mean over seeds)", yscale="log")
        row[2].set(xlabel="trials", ylabel="regret, stored % on a log10 axis", yscale="log")
        row[0].legend()
    fig.tight_layout()
    fig.savefig(HERE / "results" / "search_evidence.png", dpi=110)


def cmd_surrogate(args: argparse.Namespace) -> None:
    """The score GP's held-out predictions (5-fold, the sampler's NUTS defaults, one NUTS seed) on each random
    study's trials: a uniform sample of the space, so whether the surrogate can rank configurations at this
    fidelity at all, apart from where the acquisition sends it. Writes ``surrogate.json`` for the report."""
    import bo_cost

    from peftlab.space import load_space

    space = load_space("autopeft", "minilm")
    curves, out = _curves(), {}
    for task, sampler in sorted(curves):
        if sampler != "random":
            continue
        for seed in sorted(curves[(task, sampler)]):
            rows = [r for r in _table(task, sampler, seed) if r["score"]]
            obs = [
                (to_vector(space, json.loads(r["params"])), (float(r["score"]), float(r["stored_percent"])), 0)
                for r in rows
            ]
            print(f"{_name(task, sampler, seed)}: {len(obs)} points", flush=True)
            mean, lpd, observed = bo_cost.cv_predictions(space, obs, (64, 32, 4), seed=0, folds=5)
            out[_name(task, sampler, seed)] = {
                "task": task, "predicted": mean.tolist(), "observed": observed.tolist(), "lpd": lpd.tolist(),
            }  # fmt: skip
    SURROGATE.write_text(json.dumps(out, indent=1) + "\n")


def _noise_ceiling(task: str, observed: list[float], seed_sd: float, rng: np.random.Generator) -> float:
    """Spearman's rho a perfect predictor of the true dev score could reach against these observations, were their
    noise the dev split's sampling (:func:`dev_sigma`) and a training-seed noise of ``seed_sd`` (the observations
    stand in for the truth)."""
    p = np.asarray(observed)
    sd = np.sqrt(dev_sigma(task, p) ** 2 + seed_sd**2)
    return float(np.mean([stats.spearmanr(p, p + rng.normal(0, sd)).statistic for _ in range(200)]))


def _seed_sd(step: int) -> float:
    """The training-seed σ of a dev score at ``step``: root mean square over the re-trained configurations of
    found_vs_presets (3 seeds each, the same 1000-example dev split, so without its sampling noise) of the spread
    of their dev score at that step (inside a 500-step schedule); 0 where those runs are not there."""
    path = HERE / "results" / "found_vs_presets" / "runs.csv"
    if not path.is_file():
        return 0.0
    scores: dict[str, list[float]] = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            if (dev := retrain.dev_at(r, step)) is not None:
                scores.setdefault(r["config"], []).append(dev)
    variances = [statistics.variance(v) for v in scores.values() if len(v) > 1]
    return math.sqrt(statistics.mean(variances)) if variances else 0.0


def _surrogate_lines(refs: dict) -> list[str]:
    if not SURROGATE.is_file():
        return []
    lines = [
        "",
        "## Can the surrogate rank configurations at this fidelity?",
        "",
        "The AutoPEFT sampler's score GP (SAAS, NUTS 64/32/4 as the sampler's defaults) fitted on 4/5 of a random "
        "study's trials and asked for the other fifth, 5 folds (`python benchmarks/search_evidence.py surrogate`). "
        "Spearman's rho of the held-out predictions against the observed dev scores, over all trials and over the "
        "learners alone (score above the constant prediction's by more than 2σ of a dev score, where the front "
        "is decided). Beside each, the ceiling a perfect predictor of the true score could reach against "
        "observations this noisy: with the dev split's sampling noise alone, and with the training-seed noise too. "
        "Seed σ: the spread over 3 seeds of the dev score at the trials' step count of the 28 SST-2 configurations "
        "re-trained by found_vs_presets (root mean square; inside 500-step schedules, so an estimate; – where "
        "there is none).",
        "",
        "| study | seed σ | trials | rho, all | ceiling: dev noise | + seed noise | learners | rho, learners | "
        "ceiling: dev noise | + seed noise | mean log predictive density |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rng = np.random.default_rng(0)
    for name, r in json.loads(SURROGATE.read_text()).items():
        pred, obs = np.asarray(r["predicted"]), np.asarray(r["observed"])
        task = r["task"]
        floor = refs[task][0]
        seed_sd = _seed_sd(_steps(task)) if _task_flags(task)[0] == TASK_OF_PRESETS else 0.0
        cells = [f"{100 * seed_sd:.1f}" if seed_sd else "–"]
        for keep in (np.ones(len(obs), bool), obs > floor + 2 * dev_sigma(task, floor)):
            if keep.sum() < 3:
                cells.append(f"{int(keep.sum())} | – | – | –")
                continue
            x = obs[keep].tolist()
            rho = stats.spearmanr(pred[keep], obs[keep]).statistic
            with_seed = f"{_noise_ceiling(task, x, seed_sd, rng):.2f}" if seed_sd else "–"
            cells.append(f"{int(keep.sum())} | {rho:.2f} | {_noise_ceiling(task, x, 0.0, rng):.2f} | {with_seed}")
        lines.append(f"| {name} | {' | '.join(cells)} | {statistics.mean(r['lpd']):.2f} |")
    return lines


@functools.cache
def _table(task: str, sampler: str, seed: int) -> tuple[dict, ...]:
    """A study's exported trial table (read once per process: the report's sections each walk it)."""
    path = RESULTS / task / f"{_name(task, sampler, seed)}.csv"
    with path.open() as f:
        return tuple(csv.DictReader(f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["run", "export", "report", "surrogate"])
    p.add_argument("--plan", nargs="+", default=["sst2:random", "sst2:autopeft"], help="TASK:SAMPLER items")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--chunk", type=int, default=10, help="trials per study per round")
    p.add_argument("--runs", default=str(RUNS))
    p.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR", str(HERE.parent.parent / "shared/data")))
    args = p.parse_args()
    {"run": cmd_run, "export": cmd_export, "report": cmd_report, "surrogate": cmd_surrogate}[args.phase](args)


if __name__ == "__main__":
    main()
