"""A search's results: the Pareto set, hypervolume per trial, JSON / CSV / Markdown tables and PNG plots.

Hypervolume is of (dev score, stored %) with the reference point stored in the study (``peftlab search
--ref-point``; by default score 0 and the budget or the space's costliest corner), so numbers of studies
with the same reference point compare, and the same study always gives the same number.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from peftlab import optional
from peftlab.atomic import write_json, write_text, write_with
from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError
from peftlab.search.holdout import trial_test
from peftlab.search.pareto import hypervolume_history
from peftlab.search.study import definition_of, finished_points, pareto_trials, trial_rows
from peftlab.train import RunRecord, TrainConfig, train
from peftlab.train.metrics import oriented


def ref_point(study: optuna.Study) -> tuple[float, float]:
    ref = definition_of(study)["ref_point"]
    return float(ref[0]), float(ref[1])


def cost_scale(study: optuna.Study) -> str:
    """The study's cost axis for hypervolume ("linear" for a study made before the scale was stored)."""
    return definition_of(study).get("cost_scale", "linear")


def hypervolume_curve(study: optuna.Study) -> list[float]:
    """Hypervolume after each trial (in trial-number order), on the study's cost scale."""
    return hypervolume_history(finished_points(study), ref_point(study), cost_scale(study))


def summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by status, the front, the final hypervolume and the reference point."""
    rows = trial_rows(study)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    curve = hypervolume_curve(study)
    front = pareto_trials(study)
    return {
        "study": study.study_name,
        "definition": definition_of(study),
        "trials": len(rows),
        "statuses": statuses,
        "ref_point": list(ref_point(study)),
        "cost_scale": cost_scale(study),
        "hypervolume": curve[-1] if curve else 0.0,
        "pareto": [_front_row(t, study.user_attrs) for t in front],
    }


def _front_row(t: FrozenTrial, study_attrs: dict[str, Any]) -> dict[str, Any]:
    return {
        "number": t.number,
        "score": t.values[0],
        "stored_percent": t.values[1],
        "trainable_percent": t.user_attrs.get("trainable_percent"),
        "test": trial_test(study_attrs, t),
        "params": t.params,
        "spec": t.user_attrs.get("spec"),
    }


def front_table(study: optuna.Study) -> str:
    """The Pareto set as an aligned text table (the CLI prints it)."""
    lines = [f"{'trial':>5}  {'dev score':>9}  {'stored %':>9}  {'test':>8}  params"]
    attrs = study.user_attrs
    for t in pareto_trials(study):
        test = trial_test(attrs, t) or {}
        main = (t.user_attrs.get("dev") or {}).get("metric")
        shown = f"{oriented(main, test[main]):.4f}" if main in test else "-"
        params = " ".join(f"{k}={v}" for k, v in t.params.items())
        lines.append(f"{t.number:>5}  {t.values[0]:>9.4f}  {t.values[1]:>9.4f}  {shown:>8}  {params}")
    return "\n".join(lines)


def export(study: optuna.Study, folder: str | Path, plots: bool = True) -> list[Path]:
    """Write trials.csv/json, pareto.json/csv, hypervolume.csv and (with matplotlib) front.png and
    hypervolume.png into ``folder``; returns the paths written."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    curve = hypervolume_curve(study)
    s = summary(study)
    written = [
        _write_csv(out / "trials.csv", rows),
        _write_json(out / "trials.json", rows),
        _write_json(out / "pareto.json", s),
        _write_csv(
            out / "pareto.csv",
            [
                {k: v for k, v in r.items() if k not in ("spec", "params", "test")}
                | {f"param_{k}": v for k, v in r["params"].items()}
                | {f"test_{k}": v for k, v in (r["test"] or {}).items()}
                for r in s["pareto"]
            ],
        ),
        _write_csv(out / "hypervolume.csv", [{"trial": i, "hypervolume": h} for i, h in enumerate(curve)]),
    ]
    if plots:
        written += [plot_front([study], out / "front.png"), plot_hypervolume([study], out / "hypervolume.png")]
    return written


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows)

    return write_with(path, write)


def _write_json(path: Path, data: Any) -> Path:
    return write_json(path, data, default=str)


def _pyplot():
    if not optional.available("matplotlib"):
        raise PeftlabError("plots need matplotlib: pip install 'peftlab[bench]' (or pass --no-plots)")
    return optional.plotting()


def _label(study: optuna.Study) -> str:
    return f"{study.study_name} ({definition_of(study)['sampler']})"


def plot_front(studies: Sequence[optuna.Study], path: str | Path) -> Path:
    """Dev score against stored % for every completed trial, each study's front as a step line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, study in enumerate(studies):
        color = f"C{k}"
        pts = [p for p in finished_points(study) if p is not None]
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], s=14, alpha=0.5, color=color)
        front = pareto_trials(study)
        ax.step(
            [t.values[1] for t in front],
            [t.values[0] for t in front],
            where="post",
            color=color,
            marker="o",
            label=_label(study),
        )
    ax.set_xscale("symlog", linthresh=0.01)
    return _save(plt, fig, ax, path, "stored parameters (% of the backbone)", "dev score")


def plot_hypervolume(studies: Sequence[optuna.Study], path: str | Path) -> Path:
    """Hypervolume against trials, one line per study (so per sampler when each study has its own)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, study in enumerate(studies):
        curve = hypervolume_curve(study)
        ax.plot(range(1, len(curve) + 1), curve, color=f"C{k}", label=_label(study))
    refs = {(ref_point(s), cost_scale(s)) for s in studies}
    if len(refs) == 1:
        (ref, scale), *_ = refs
        title = f"reference point (score, stored %) = {ref}" + (", stored % on a log10 axis" if scale == "log" else "")
    else:
        title = "reference points or cost scales differ"
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, ax, path, "trials", "hypervolume")


def _save(plt, fig, ax, path: str | Path, xlabel: str, ylabel: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_with(path, lambda p: fig.savefig(p, dpi=120))
    plt.close(fig)
    return Path(path)


def trial_spec(study: optuna.Study, number: int):
    """The spec a trial trained (for `peftlab train --spec`, e.g. on another task)."""

    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials) or "spec" not in trials[number].user_attrs:
        done = [t.number for t in trials if "spec" in t.user_attrs]
        raise PeftlabError(
            f"study '{study.study_name}' has no trial {number} with a spec; trials with one: {_ranges(done)}"
        )
    return Spec.from_dict(trials[number].user_attrs["spec"])


def _ranges(numbers: Sequence[int]) -> str:
    return ", ".join(str(n) for n in numbers[:20]) + (" ..." if len(numbers) > 20 else "") or "none"


def retrain(
    study: optuna.Study,
    seeds: Sequence[int],
    output: str | Path,
    overrides: dict[str, Any],
    numbers: Sequence[int] | None = None,
) -> str:
    """Re-train the Pareto set (or the given trials) at a full budget over several seeds. Each run writes its
    own folder (an existing finished one is reused, never overwritten); returns the Markdown table, also
    written with JSON and CSV as ``retrain.{md,json,csv}`` in ``output``."""

    definition = definition_of(study)
    if numbers:
        for n in numbers:
            trial_spec(study, n)  # an unknown trial fails here, before any training
    chosen = [study.trials[n] for n in numbers] if numbers else pareto_trials(study)
    settings = dict(definition["train"]) | {"score_test": True, "stop_hopeless": False}  # full runs, test-scored
    if overrides:  # one budget: the given one replaces the search's low fidelity
        for key in ("max_steps", "fraction"):
            settings.pop(key, None)
        settings |= overrides
    out = Path(output)
    rows = []
    for t in chosen:
        spec = trial_spec(study, t.number)
        scores, devs, times = [], [], []
        metric = None
        for seed in seeds:
            run = out / f"trial{t.number:05d}" / f"seed{seed}"
            if (run / "record.json").is_file():
                record = RunRecord(**json.loads((run / "record.json").read_text()))
            else:
                config = TrainConfig(
                    model=definition["model"],
                    task=definition["task"],
                    output=str(run),
                    progress=False,
                    **(settings | {"seed": seed}),
                )
                record = train(spec, config)
            if record.status == "diverged" or not record.test:
                continue
            metric = record.best["metric"]
            scores.append(oriented(metric, record.test[metric]))
            devs.append(record.best["score"])
            times.append(record.wall_time_s)
        rows.append(
            {
                "trial": t.number,
                "stored_percent": t.values[1] if t.values else t.user_attrs.get("stored_percent"),
                "search_dev": t.values[0] if t.values else None,
                "metric": metric,
                "seeds": len(scores),
                "test_mean": statistics.mean(scores) if scores else None,
                "test_std": statistics.stdev(scores) if len(scores) > 1 else 0.0 if scores else None,
                "dev_mean": statistics.mean(devs) if devs else None,
                "test_scores": scores,
                "wall_time_s": sum(times),
                "params": t.params,
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(
        out / "retrain.json", {"study": study.study_name, "settings": settings, "seeds": list(seeds), "rows": rows}
    )
    _write_csv(out / "retrain.csv", [{k: v for k, v in r.items() if k not in ("params", "test_scores")} for r in rows])
    lines = ["| trial | stored % | search dev | test (mean ± std) | seeds | params |", "|---:|---:|---:|---|---:|---|"]
    for r in rows:
        test = f"{r['test_mean']:.4f} ± {r['test_std']:.4f}" if r["test_mean"] is not None else "–"
        dev = f"{r['search_dev']:.4f}" if r["search_dev"] is not None else "–"
        params = " ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {r['trial']} | {r['stored_percent']:.4f} | {dev} | {test} | {r['seeds']} | {params} |")
    table = "\n".join(lines)
    write_text(out / "retrain.md", table + "\n")
    return table
