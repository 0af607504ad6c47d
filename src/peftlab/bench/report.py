"""From raw results to what a reader sees: pooled medians with spreads, ratios to full fine-tuning and to the
peft library, the environment, and bench.md / .csv / .json / .png."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peftlab import optional
from peftlab.atomic import write_with
from peftlab.bench import survey
from peftlab.bench.entries import CACHED, FLOOR, FULL
from peftlab.bench.flops import TARGET
from peftlab.bench.profile import CATEGORIES
from peftlab.bench.worker import KINDS
from peftlab.train import library_versions

MB = 2**20


def summarize(xs: list[float]) -> dict[str, float]:
    """Median, quartiles (linear interpolation), IQR, min and max; one value is its own quartiles."""
    if not xs:
        raise ValueError("no values to summarize")
    q25, med, q75 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "min": min(xs), "max": max(xs), "n": len(xs)}


def _pooled(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [x for r in runs for x in r[key]]


def _paired(runs: list[dict[str, Any]], num: str, den: str) -> list[float]:
    return [a / b for r in runs for a, b in zip(r[num], r[den], strict=True)]


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _put(row: dict[str, Any], name: str, xs: list[float], scale: float = 1.0) -> None:
    """Median, q25 and q75 of ``xs`` (times ``scale``) into row columns ``name``, ``name_q25``, ``name_q75``."""
    s = summarize(xs) if xs else None
    for suffix, key in (("", "median"), ("_q25", "q25"), ("_q75", "q75")):
        row[name + suffix] = s[key] * scale if s else None


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (method, implementation): the table of bench.csv and bench.md."""
    backbone = report["setup"]["backbone_params"]
    ok = [r for r in report["runs"] if "error" not in r]
    out = []
    for method, info in report["methods"].items():
        counts = info["counts"]
        for impl in ("peftlab", "peft"):
            mine = {
                k: [
                    r for r in ok if r["job"]["method"] == method and r["job"]["impl"] == impl and r["job"]["kind"] == k
                ]
                for k in KINDS
            }
            if impl == "peft" and info["peft_config"] is None:
                continue
            measured = next((r["trainable_params"] for k in ("train", "infer") for r in mine[k]), None)
            trainable = counts["trainable_params"] if impl == "peftlab" else measured
            row: dict[str, Any] = {
                "method": method,
                "impl": impl,
                "trainable_params": trainable,
                "trainable_pct": 100.0 * trainable / backbone if trainable is not None else None,
                "stored_params": counts["stored_params"] if impl == "peftlab" else None,
                "changed_params": counts["changed_params"] if impl == "peftlab" else None,
                "measured_trainable_params": measured,
            }
            train, infer, merged = mine["train"], mine["infer"], mine["merged"]
            for name in ("peak", "loaded"):
                row[f"{name}_mb"] = _median(train, f"{name}_bytes") / MB if train else None
            row["increase_mb"] = row["peak_mb"] - row["loaded_mb"] if train else None
            tokens = (train or infer or merged or [{"tokens": 0}])[0]["tokens"]
            _put(row, "train_tok_s", [tokens / t for t in _pooled(train, "step_s")])
            _put(row, "step_ms", _pooled(train, "step_s"), 1e3)
            _put(row, "train_forward_ms", _pooled(train, "forward_s"), 1e3)
            _put(row, "step_over_forward", _paired(train, "step_s", "forward_s"))
            _put(row, "fwd_bwd_over_forward", _paired(train, "fwd_bwd_s", "forward_s"))
            _put(row, "infer_tok_s", [tokens / t for t in _pooled(infer, "forward_s")])
            _put(row, "merged_tok_s", [tokens / t for t in _pooled(merged, "forward_s")])
            for col in ("step_s", "fwd_bwd_s"):
                xs = _pooled(train, col)
                row[f"{col}_median"] = statistics.median(xs) if xs else None
            flops = info.get("flops")
            row["predicted_gflop"] = (flops["forward"] + flops["backward"]) / 1e9 if flops else None
            row["prediction_note"] = info.get("flops_note")
            row["n_train"], row["n_infer"] = len(_pooled(train, "step_s")), len(_pooled(infer, "forward_s"))
            profiles = [r["profile_ms"] for r in train if "profile_ms" in r]
            for c in CATEGORIES:  # ms per forward + backward, median over the rounds
                row[f"profile_{c}_ms"] = statistics.median(p[c] for p in profiles) if profiles else None
            score = mine["score"][0] if mine["score"] else None
            for col in ("score", "metric", "status"):
                row[f"score_{col}" if col != "score" else col] = score[col] if score else None
            out.append(row)
    _cost_model(out)
    full = next((r for r in out if r["method"] == "full" and r["impl"] == "peftlab"), None)
    for row in out:
        for col in ("train", "infer"):
            ref = full[f"{col}_tok_s"] if full else None
            mine = row[f"{col}_tok_s"]
            row[f"{col}_pct_of_full"] = 100.0 * mine / ref if ref and mine is not None else None
    return out


def _cost_model(table: list[dict[str, Any]]) -> None:
    """Per row: its step and forward+backward over the floor's (ratios of medians), the cost model's prediction of the
    latter (counted FLOPs over the floor's) and measured over predicted, a target above :data:`TARGET`."""
    floor = next((r for r in table if r["method"] == FLOOR and r["impl"] == "peftlab"), None)
    for row in table:
        for col, name in (("step_s", "step_over_floor"), ("fwd_bwd_s", "fwd_bwd_over_floor")):
            ref = floor[f"{col}_median"] if floor else None
            mine = row[f"{col}_median"]
            row[name] = mine / ref if ref and mine is not None else None
        ref, mine = (floor["predicted_gflop"] if floor else None), row["predicted_gflop"]
        row["predicted_over_floor"] = predicted = mine / ref if ref and mine is not None else None
        measured = row["fwd_bwd_over_floor"]
        row["measured_over_predicted"] = ratio = measured / predicted if measured is not None and predicted else None
        row["optimisation_target"] = ratio is not None and ratio > TARGET


def ratios(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """peftlab / peft per method: ratio of medians and a conservative range (q25/q75 .. q75/q25)."""
    by = {(r["method"], r["impl"]): r for r in table}
    out: dict[str, dict[str, Any]] = {}
    for (method, impl), lab in by.items():
        ref = by.get((method, "peft"))
        if impl != "peftlab" or ref is None or ref["n_train"] + ref["n_infer"] == 0:
            continue  # no peft row, or every measurement of it failed (listed under failures)
        entry: dict[str, Any] = {
            "trainable_peftlab": lab["trainable_params"],
            "trainable_peft": ref["trainable_params"],
        }
        for col in ("train_tok_s", "infer_tok_s"):
            a, b = lab[col], ref[col]
            ok = a is not None and b is not None
            entry[col] = a / b if ok else None
            entry[f"{col}_range"] = (
                [lab[f"{col}_q25"] / ref[f"{col}_q75"], lab[f"{col}_q75"] / ref[f"{col}_q25"]] if ok else None
            )
        for col in ("peak_mb", "increase_mb"):
            a, b = lab[col], ref[col]
            entry[col] = a / b if a is not None and b else None
        out[method] = entry
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int, device: str = "cpu") -> dict[str, str]:
    """The machine and library versions a reader needs to compare numbers across runs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    env = {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable; torch threads = {threads}",
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
        **library_versions(),
    }
    if optional.available("peft"):
        env["peft"] = optional.require("peft", "naming peft's version").__version__
    if device == "cuda":
        env["GPU"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return env


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "–" if x is None else format(x, fmt)


def _spread(row: dict[str, Any], col: str, fmt: str = ",.0f") -> str:
    """``median (q25–q75)``."""
    if row[col] is None:
        return "–"
    return f"{format(row[col], fmt)} ({format(row[col + '_q25'], fmt)}–{format(row[col + '_q75'], fmt)})"


def markdown(report: dict[str, Any]) -> str:
    cfg, setup = report["config"], report["setup"]
    mem = "peak alloc" if cfg["device"] == "cuda" else "peak RSS"
    lines = [
        f"# PEFT efficiency on `{cfg['model']}`",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; wall time of the run: {report['wall_time_s']:.0f} s"
        + (
            f" ({report['resumed']} of {len(report['runs'])} measurements taken by an earlier run of this command, "
            "`--resume`)"
            if report.get("resumed")
            else ""
        ),
        *[f"- {k}: {v}" for k, v in report["environment"].items()],
        f"- model: `{cfg['model']}` ({setup['model_class']}, backbone {setup['backbone_params']:,} parameters"
        + (f"; block linears quantized {cfg['quantize']} by bitsandbytes)" if cfg.get("quantize") else ")"),
        _batch_line(cfg, setup),
        f"- timing: {cfg['repeats']} timed (+{cfg['warmup']} warm-up) iterations in each fresh process, "
        f"{cfg['rounds']} round(s); statistics are median (q25–q75)",
        "",
        "## Results",
        "",
        f"| method | trainable | % | stored | changed | {mem} (MB) | Δ over loaded (MB) | train tok/s | "
        "train % of full | step / fwd | (fwd+bwd) / fwd | infer tok/s | merged infer tok/s | infer % of full"
        + (" | score |" if cfg["score_steps"] else " |"),
        "|---|" + "---:|" * (13 + bool(cfg["score_steps"])),
    ]
    for r in report["rows"]:
        name = r["method"] + (" (peft)" if r["impl"] == "peft" else "")
        cells = [
            name,
            _num(r["trainable_params"]),
            _num(r["trainable_pct"], ".4f"),
            _num(r["stored_params"]),
            _num(r["changed_params"]),
            _num(r["peak_mb"]),
            _num(r["increase_mb"]),
            _spread(r, "train_tok_s"),
            _num(r["train_pct_of_full"], ".1f"),
            _spread(r, "step_over_forward", ".2f"),
            _spread(r, "fwd_bwd_over_forward", ".2f"),
            _spread(r, "infer_tok_s"),
            _spread(r, "merged_tok_s"),
            _num(r["infer_pct_of_full"], ".1f"),
        ]
        if cfg["score_steps"]:
            score = r["score"]
            cells.append(f"{r['score_metric']} {score:.4f}" if score is not None else r["score_status"] or "–")
        lines.append("| " + " | ".join(cells) + " |")
    if cfg.get("protocol") == "survey":
        lines += ["", "## Beside the survey's Table 5", "", *survey.comparison(cfg["model"], report["rows"])]
    lines += ["", "## Cost model: a training step over the frozen floor", "", *_cost_table(report["rows"])]
    if any(_profile(r) for r in report["rows"]):
        lines += ["", "## Where the forward + backward goes (profiler)", "", *_profile_table(report["rows"])]
    if report["ratios"]:
        lines += [
            "",
            "## peftlab / peft",
            "",
            "| method | peft config | trainable (peftlab / peft) | train tok/s | infer tok/s | "
            f"{mem} | Δ over loaded |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for method, e in report["ratios"].items():
            cfg_peft = report["methods"][method]["peft_config"]
            shown = {k: v for k, v in cfg_peft.items() if k not in ("task_type",) and v not in (None, {}, [])}
            cells = [method, f"`{json.dumps(shown)}`", f"{e['trainable_peftlab']:,} / {e['trainable_peft']:,}"]
            for col in ("train_tok_s", "infer_tok_s"):
                rng = e[f"{col}_range"]
                cells.append(f"{e[col]:.3f} ({rng[0]:.2f}–{rng[1]:.2f})" if e[col] is not None else "–")
            cells += [_num(e["peak_mb"], ".3f"), _num(e["increase_mb"], ".3f")]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {m}: {info['peft_note']}" for m, info in report["methods"].items() if info["peft_note"]]
    if notes:
        lines += ["", "Not compared with peft:", "", *notes]
    if cfg.get("cache_frozen"):
        labels = list(report["methods"])
        twins = {CACHED.format(m) for m in labels if CACHED.format(m) in labels}
        uncached = [m for m in labels if m not in (FLOOR, FULL) and m not in twins and CACHED.format(m) not in twins]
        if uncached:
            lines += ["", f"No frozen-cache row (they act on the first layer or the input): {', '.join(uncached)}."]
    if report["failures"]:
        lines += ["", "## Failures", "", *[f"- {f}" for f in report["failures"]]]
    lines += ["", "## Legend", "", *LEGEND, ""]
    return "\n".join(lines)


def _batch_line(cfg: dict[str, Any], setup: dict[str, Any]) -> str:
    """What one measured step runs on."""
    tokens = f"{setup['tokens']:,} non-padding of {setup['padded_tokens']:,} tokens"
    where = f"{cfg['device']}, {cfg['dtype']}" + (" autocast" if cfg["dtype"] == "bf16" else "")
    if cfg.get("protocol") == "survey":
        return (
            f"- batch: the survey's protocol: {survey.BATCH} training examples of `{cfg['task']}` (prompts of its "
            f"Appendix A, inputs cut to {survey.MAX_INPUT} tokens, targets to {survey.MAX_OUTPUT}) in "
            f"{cfg['accumulate']} microbatches of {cfg['batch']} (Table 3), each padded to its longest row (widths "
            f"{', '.join(map(str, setup['widths']))}): {tokens} per step; {where}"
        )
    step = f"{cfg['accumulate']} x " if cfg.get("accumulate", 1) > 1 else ""
    return (
        f"- batch: {step}{cfg['batch']} x {cfg['seq']} (right-padded, random ids, row lengths "
        f"{', '.join(map(str, setup['lengths'][: cfg['batch']]))}): {tokens}; {where}"
    )


def _cost_table(table: list[dict[str, Any]]) -> list[str]:
    """The cost-model table and the rows without a prediction (with why)."""
    lines = [
        "| method | step ÷ floor | (fwd+bwd) ÷ floor | predicted ÷ floor | measured ÷ predicted | predicted GFLOP | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        name = r["method"] + (" (peft)" if r["impl"] == "peft" else "")
        cells = [
            name,
            _num(r["step_over_floor"], ".2f"),
            _num(r["fwd_bwd_over_floor"], ".2f"),
            _num(r["predicted_over_floor"], ".2f"),
            _num(r["measured_over_predicted"], ".2f"),
            _num(r["predicted_gflop"], ".3g"),
            f"**> {TARGET:.2f}: optimisation target**" if r["optimisation_target"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = {r["method"]: r["prediction_note"] for r in table if r["prediction_note"]}
    if notes:
        lines += ["", "No prediction:", "", *[f"- {m}: {why}" for m, why in notes.items()]]
    return lines


def _profile(row: dict[str, Any]) -> dict[str, float] | None:
    """A row's profile: ms per forward + backward by category, or None when it was not profiled."""
    found = {c: row.get(f"profile_{c}_ms") for c in CATEGORIES}
    return found if all(v is not None for v in found.values()) else None


def _profile_table(table: list[dict[str, Any]]) -> list[str]:
    """Per row: milliseconds per step by operator category, and the excess over the floor's."""
    floor = next((_profile(r) for r in table if r["method"] == FLOOR and r["impl"] == "peftlab"), None)
    head = " | ".join(CATEGORIES)
    lines = [
        f"| method | {head} | profiled total | total − floor's | of which not matmul |",
        "|---|" + "---:|" * (len(CATEGORIES) + 3),
    ]
    for r in table:
        prof = _profile(r)
        if prof is None:
            continue
        total = sum(prof.values())
        cells = [r["method"] + (" (peft)" if r["impl"] == "peft" else ""), *(f"{prof[c]:.1f}" for c in CATEGORIES)]
        cells.append(f"{total:.1f}")
        if floor:
            extra = total - sum(floor.values())
            beyond = extra - (prof["matmul"] - floor["matmul"])
            cells += [f"{extra:+.1f}", f"{beyond:+.1f}"]
        else:
            cells += ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


LEGEND = [
    "- **+ frozen cache** (`--cache-frozen`): the row above it trained from the frozen-prefix cache (the states "
    "entering the first layer the method acts on computed once, before the timings, as from a run's second epoch "
    "on): no forward or backward below that layer, so the only rows that can go under the floor; training only.",
    "- **trainable / stored / changed**: what the optimiser holds / what the saved adapter holds / parameters of "
    "the final model that differ from the backbone (`pm.counts()`); % is trainable over the backbone. peft rows "
    "count `requires_grad` parameters of the peft model.",
    "- **peak memory**: on the CPU the peak resident set (`ru_maxrss`) of the training process, which also holds "
    "Python, torch and the model; **Δ over loaded** subtracts the resident set after the model was built and the "
    "method attached (before the first step): gradients, optimiser state and activations. On CUDA: "
    "`torch.cuda.max_memory_allocated` and its increase over the memory allocated after loading.",
    "- **train tok/s**: non-padding input tokens per second of a training step (forward, backward, AdamW step, "
    "zero_grad) in train mode (dropout on). **infer tok/s**: eval mode under `torch.inference_mode`, adapters "
    "unmerged (as in the survey's Table 5); **merged**: after `pm.merge()`, for methods with mergeable modules.",
    "- **% of full**: throughput relative to full fine-tuning = 100, as in the survey's Table 5.",
    "- **step / fwd**: a training step's time over a no-grad forward of the same batch in the same mode, paired per "
    "iteration; **(fwd+bwd) / fwd** leaves out the optimiser. Expected about 3 for full fine-tuning (the backward "
    "computes activation and weight gradients), towards 2 for PEFT (activation gradients only) and about 1 for "
    "`head` (no backward through the backbone).",
    "- **floor**: the backbone with every weight frozen and gradients flowing to the embedding output only: a forward "
    "and a backward through every block's activations, no weight gradient, no optimiser; every run measures it "
    "first. **full** (full fine-tuning) is added unless listed or left out (`--no-full`).",
    "- **cost model** (`peftlab/bench/flops.py`): **step ÷ floor** is the median training step (optimiser included) "
    "over the floor's; **(fwd+bwd) ÷ floor** leaves the optimiser out, and is what the model predicts: "
    "**predicted ÷ floor** is the step's counted matmul FLOPs over the floor's (forward F; activation gradients ≈ F, "
    "attention's 2×; weight gradients ≈ F of the weights trained; what each module adds, forward and 2× backward; "
    "the longer sequence of a prompt; the backward only from the lowest layer a method acts on). **measured ÷ "
    "predicted** above 1.10 marks an optimisation target: the method costs more than its arithmetic (elementwise "
    "work, hooks, memory traffic, kernel choice).",
    "- **profiler** (`--profile`, `peftlab/bench/profile.py`): ms per forward + backward (no optimiser) under "
    "`torch.profiler`, each operator's own time summed by category: **matmul** (mm, addmm, bmm, ...), **attention** "
    "(softmax and fused attention kernels), **norm**, **dropout**, **elementwise** (every other aten operator: "
    "gates, scales, activations, masks), **copy** (copies, concatenations, layout and view changes), **framework** "
    "(time outside aten operators: autograd nodes, hooks, Python); median over the rounds. **total − floor's** is "
    "the method's extra time; **of which not matmul** is what the FLOP-counting cost model cannot see. The "
    "profiler adds overhead of its own, so totals exceed the timed step.",
    "- **peftlab / peft**: ratio of medians (above 1: peftlab faster, or for memory: peftlab larger), in brackets "
    "q25(peftlab)/q75(peft) – q75(peftlab)/q25(peft). Both run the same backbone weights and batch in separate "
    "fresh processes. A peft process's peak RSS also holds the peft library itself (about 10 MB): Δ over loaded is "
    "the like-for-like memory comparison.",
    "- every number comes from its own fresh process (`python -m peftlab.bench --worker`); warm-up iterations are "
    "not timed; `gc` is collected before and disabled during each timed call; times are wall clock "
    "(`time.perf_counter`, with `torch.cuda.synchronize` on a GPU).",
]


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    columns = list(table[0]) if table else ["method", "impl"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in table)


def plot(report: dict[str, Any], path: Path) -> None:
    """Training throughput against trainable %, and bars of train / inference throughput and memory."""
    plt = optional.plotting()
    table = report["rows"]
    lab = [r for r in table if r["impl"] == "peftlab"]
    peft = {r["method"]: r for r in table if r["impl"] == "peft"}
    names = [r["method"] for r in lab]
    y = range(len(lab))
    fig, axes = plt.subplots(2, 2, figsize=(12, 3 + 0.45 * len(lab)))
    ax = axes[0][0]
    for r in lab:
        if r["train_tok_s"] is not None and r["trainable_pct"]:
            ax.scatter(r["trainable_pct"], r["train_tok_s"], color="tab:blue")
            ax.annotate(
                r["method"],
                (r["trainable_pct"], r["train_tok_s"]),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set(
        xscale="log",
        xlabel="trainable % of backbone",
        ylabel="train tokens/s",
        title="training throughput vs trainable parameters",
    )

    def bars(ax: Any, cols: list[tuple[str, str]], title: str, xlabel: str) -> None:
        h = 0.8 / len(cols)
        for k, (col, label) in enumerate(cols):
            source = [peft.get(n, {}) for n in names] if col.startswith("peft:") else lab
            key = col.removeprefix("peft:")
            vals = [r.get(key) or 0.0 for r in source]
            err = None
            if f"{key}_q25" in lab[0]:
                err = [
                    [max(0.0, (r.get(key) or 0) - (r.get(f"{key}_q25") or 0)) for r in source],
                    [max(0.0, (r.get(f"{key}_q75") or 0) - (r.get(key) or 0)) for r in source],
                ]
            ax.barh([i + k * h for i in y], vals, height=h, xerr=err, label=label, capsize=2)
        ax.set_yticks([i + 0.4 - h / 2 for i in y], names)
        ax.invert_yaxis()
        ax.set(title=title, xlabel=xlabel)
        ax.legend(fontsize=7, framealpha=0.6)

    with_peft = bool(peft)
    bars(
        axes[0][1],
        [("train_tok_s", "peftlab")] + ([("peft:train_tok_s", "peft")] if with_peft else []),
        "training throughput",
        "tokens/s",
    )
    bars(
        axes[1][0],
        [("infer_tok_s", "unmerged"), ("merged_tok_s", "merged")]
        + ([("peft:infer_tok_s", "peft unmerged")] if with_peft else []),
        "inference throughput",
        "tokens/s",
    )
    bars(
        axes[1][1],
        [("increase_mb", "peftlab")] + ([("peft:increase_mb", "peft")] if with_peft else []),
        "training memory over the loaded model",
        "MB",
    )
    fig.suptitle(
        f"{report['config']['model']}: batch {report['config']['batch']} x {report['config']['seq']}, "
        f"{report['config']['device']} {report['config']['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """bench.md, bench.csv, bench.json (raw per-repeat numbers included) and bench.png, each written whole."""
    out.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Callable[[Path], None]] = {
        "bench.json": lambda p: p.write_text(json.dumps(report, indent=1) + "\n"),
        "bench.csv": lambda p: write_csv(report["rows"], p),
        "bench.md": lambda p: p.write_text(markdown(report)),
        "bench.png": lambda p: plot(report, p),
    }
    for name, write in writers.items():
        write_with(out / name, write)
