"""The frozen-layer cache (``--cache-frozen``) on the real MiniLM and SST-2: step time and dev scores, with and
without it, for specs whose modules sit in the upper half of the model.

Two parts, both at dropout 0 and one thread:

1. **Steps**: for each spec, one model with the spec applied, AdamW on its trainable parameters, and a few real
   SST-2 training batches. The contenders, a training step without and with the cache (forward, backward, AdamW
   step, zero_grad), alternate inside every round on the same batch (the order flips every round); untimed
   warm-up rounds first fill the cache with every batch, so the timed rounds measure the steady state of the
   second epoch on. The first forward of each batch is also checked: the same loss within 1e-5.
2. **Runs**: ``peftlab.train.train`` twice with the same settings, without and with ``cache_frozen``, alternating
   across seeds; the dev score of every evaluation, the test score and the time per step (training and gathering
   cached states, which includes computing them in the first epoch) are compared.

    python benchmarks/frozen_cache.py --model minilm --rounds 20 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

import peftlab
from peftlab.bench.report import environment
from peftlab.core.spec import Spec
from peftlab.train import TrainConfig, load_for_task, task_encoder, task_splits, train
from peftlab.train.frozen import FrozenCache, FrozenPrefix

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "frozen_cache.md"
LORA = {"kind": "lora", "r": 8, "alpha": 16.0}
#: the specs timed: modules in layers 3-5 of MiniLM's 0-5, and the task head alone (the whole stack cached)
SPECS: dict[str, Spec] = {
    "lora q,v layers 3-5": Spec.from_dict({"layers": {"3-5": {"q": LORA, "v": LORA}}}),
    "pfeiffer layers 3-5": Spec.from_dict({"layers": {"3-5": {"after_ffn": {"kind": "adapter", "size": 48}}}}),
    "head only": Spec.from_dict({}),
}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def bootstrap_ci(xs: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def interleaved(contenders: dict[str, Callable[[int], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each contender once per round on the round's batch, the order flipped every round; warm-up rounds untimed."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            gc.collect()
            gc.disable()
            start = time.perf_counter()
            contenders[name](i)
            elapsed = time.perf_counter() - start
            gc.enable()
            if i >= warmup:
                times[name].append(elapsed)
    return times


def step_benchmark(args: argparse.Namespace, name: str, spec: Spec) -> dict:
    """Part 1 for one spec: the two step times, interleaved, and their ratio."""
    config = TrainConfig(model=args.model, task="sst2", data_dir=args.data_dir, k=args.batches * args.batch_size)
    task, splits = task_splits(config)
    torch.manual_seed(0)
    model, seq2seq = load_for_task(args.model, task)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    encoder = task_encoder(args.model, model, task, args.max_length, seq2seq)
    rows = splits.train
    batches = [encoder(rows[i : i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    pm = peftlab.apply(model, spec)
    pm.train()
    frozen = FrozenPrefix(pm, FrozenCache(), budget_mb=512)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)

    def step(cached: bool) -> Callable[[int], float]:
        def run(i: int) -> float:
            batch = batches[i % len(batches)]
            if cached:
                with frozen.feeding(batch):
                    loss = pm(**batch).loss
            else:
                loss = pm(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return run

    with torch.no_grad():  # the same loss from both forwards (before any step)
        plain = pm(**batches[0]).loss.item()
        with frozen.feeding(batches[0]):
            cached = pm(**batches[0]).loss.item()
    if abs(plain - cached) > 1e-5:
        raise SystemExit(f"{name}: cached loss {cached} != uncached {plain}")
    times = interleaved({"uncached": step(False), "cached": step(True)}, args.rounds, warmup=len(batches))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    paired = [a / b for a, b in zip(times["uncached"], times["cached"], strict=True)]
    return {
        "spec": name,
        "layer": frozen.layer,
        "tokens": tokens,
        "uncached": statistics.median(times["uncached"]),
        "cached": statistics.median(times["cached"]),
        "uncached_iqr": quartiles(times["uncached"]),
        "cached_iqr": quartiles(times["cached"]),
        "ratio": statistics.median(times["uncached"]) / statistics.median(times["cached"]),
        "paired": statistics.median(paired),
        "ci": bootstrap_ci(paired),
        "loss_diff": abs(plain - cached),
        "hits": frozen.hits,
        "misses": frozen.misses,
    }


def run_pair(args: argparse.Namespace, spec: Spec, seed: int) -> dict[str, object]:
    """Part 2 for one seed: the same run without and with the cache (order alternating with the seed)."""
    base = {
        "model": args.model,
        "task": "sst2",
        "data_dir": args.data_dir,
        "k": args.run_k,
        "dev_size": args.dev_size,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "epochs": args.epochs,
        "dropout": 0.0,
        "seed": seed,
        "progress": False,
    }
    records = {}
    order = (False, True) if seed % 2 == 0 else (True, False)
    for cached in order:
        records[cached] = train(spec, TrainConfig(**base, cache_frozen=cached))
    return {"uncached": records[False], "cached": records[True]}


def per_step(record) -> float:
    return (record.timings["train_s"] + record.timings.get("cache_s", 0.0)) / record.steps


def report(args: argparse.Namespace, steps: list[dict], runs: list[dict], spent: float) -> str:
    lines = ["# The frozen-layer cache (`--cache-frozen`): MiniLM on SST-2", ""]
    lines.append(f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")
    lines.append(f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; the whole script took {spent:.0f} s")
    for k, v in environment(args.threads).items():
        lines.append(f"- {k}: {v}")
    lines.append(
        f"- model: `{args.model}` (6 layers), dropout 0, float32, CPU; batches of {args.batch_size} real SST-2 "
        f"training sentences, dynamic padding, max length {args.max_length}"
    )
    lines += ["", "## Training step, steady state (every batch cached)", ""]
    lines.append(
        f"{args.rounds} timed rounds per spec after {args.batches} untimed ones "
        "that fill the cache; the two contenders alternate inside each round on the same batch (forward, "
        "backward, AdamW step, zero_grad). Times in ms; ratio = uncached / cached."
    )
    lines += [
        "",
        "| spec | k | tokens/batch | uncached median (q25–q75) | cached median (q25–q75) | ratio of medians "
        "| median paired ratio (95% CI) | first loss diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        u, c = s["uncached_iqr"], s["cached_iqr"]
        lines.append(
            f"| {s['spec']} | {s['layer']} | {s['tokens']:.0f} | {s['uncached'] * 1e3:.1f} ({u[0] * 1e3:.1f}–"
            f"{u[2] * 1e3:.1f}) | {s['cached'] * 1e3:.1f} ({c[0] * 1e3:.1f}–{c[2] * 1e3:.1f}) | {s['ratio']:.2f} "
            f"| {s['paired']:.2f} ({s['ci'][0]:.2f}–{s['ci'][1]:.2f}) | {s['loss_diff']:.1e} |"
        )
    lines += ["", f"## Whole runs: `{args.run_spec}`, with and without `cache_frozen`", ""]
    lines.append(
        f"`peftlab.train.train` with k={args.run_k} training examples, {args.dev_size} dev examples, "
        f"{args.epochs:g} epochs, evaluation every epoch, dropout 0; time per step = (train_s + cache_s) / steps "
        "(cache_s includes computing the states in the first epoch)."
    )
    lines += [
        "",
        "| seed | run | dev accuracy per evaluation | test accuracy | ms / step | cache hits / misses |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for seed, pair in enumerate(runs):
        for name in ("uncached", "cached"):
            r = pair[name]
            dev = ", ".join(f"{e['accuracy']:.4f}" for e in r.evaluations)
            cache = f"{r.cache['hits']} / {r.cache['misses']}" if r.cache else "-"
            lines.append(f"| {seed} | {name} | {dev} | {r.test['accuracy']:.4f} | {per_step(r) * 1e3:.1f} | {cache} |")
    same = all(
        [e["accuracy"] for e in p["uncached"].evaluations] == [e["accuracy"] for e in p["cached"].evaluations]
        and p["uncached"].test == p["cached"].test
        for p in runs
    )
    ratios = [per_step(p["uncached"]) / per_step(p["cached"]) for p in runs]
    lines += [
        "",
        f"Dev and test scores identical with and without the cache: **{'yes' if same else 'NO'}**. "
        f"Time per step, uncached / cached, over the whole run: {', '.join(f'{r:.2f}' for r in ratios)}.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir", default=None, help="GLUE data (default: $PEFTLAB_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batches", type=int, default=6, help="distinct batches in the step benchmark")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per spec")
    p.add_argument("--run-k", type=int, default=256)
    p.add_argument("--dev-size", type=int, default=200)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--seeds", type=int, default=1, help="run pairs (part 2)")
    p.add_argument("--run-spec", default="lora q,v layers 3-5", choices=list(SPECS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    steps = []
    for name, spec in SPECS.items():
        steps.append(step_benchmark(args, name, spec))
        s = steps[-1]
        print(
            f"{name}: k={s['layer']} uncached {s['uncached'] * 1e3:.1f} ms, cached {s['cached'] * 1e3:.1f} ms, "
            f"ratio {s['ratio']:.2f}",
            flush=True,
        )
    runs = [run_pair(args, SPECS[args.run_spec], seed) for seed in range(args.seeds)]
    text = report(args, steps, runs, time.perf_counter() - start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
