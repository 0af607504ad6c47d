"""LoRA training-step and merged-inference speed: peftlab against the ``peft`` library and the bare model.

One run measures, on identical copies of one model (same seed) and one batch:

1. a training step (forward + backward + AdamW step + zero_grad) of peftlab LoRA against peft LoRA
   (r=8, alpha=16, query+value, SEQ_CLS, no dropout), both starting from the same LoRA weights, with the
   first-step loss checked equal so both do the same work;
2. inference under ``torch.inference_mode``: peftlab LoRA after ``merge()`` against the bare model, with
   unmerged peftlab (and unmerged peft) for information.

Contenders alternate inside every round (the order flips each round), warm-up rounds are not timed, and
each statistic is the median over the rounds with its interquartile range. Ratios are given two ways: the
ratio of the medians and the median of the per-round ratios (paired, so slow drift of a shared, noisy
machine cancels).

    python benchmarks/lora_step.py --model shape:bert-base --batch 4 --seq 64 --repeats 30 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

import peftlab
from peftlab.bench import cpu_model
from peftlab.modules.whole import head_copy

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "lora_step.md"


# -- statistics ---------------------------------------------------------------------------------------


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75) with linear interpolation."""
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def summary(xs: list[float]) -> dict[str, float]:
    q25, med, q75 = quartiles(xs)
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "min": min(xs), "max": max(xs)}


Timings = dict[str, list[float]]


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int) -> tuple[Timings, Timings]:
    """Time each contender once per round, flipping the order every round; warm-up rounds are dropped.

    Returns wall-clock times (``perf_counter``) and the process CPU time of the same calls
    (``process_time``; it leaves out time spent descheduled, so it is less sensitive to other jobs)."""
    names = list(contenders)
    times: Timings = {n: [] for n in names}
    cpu: Timings = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    try:
        for i in range(warmup + rounds):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                gc.collect()
                gc.disable()
                c0, t0 = time.process_time(), time.perf_counter()
                contenders[name]()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                gc.enable()
                if i >= warmup:
                    times[name].append(dt)
                    cpu[name].append(dc)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, cpu


# -- models ---------------------------------------------------------------------------------------------


def build(model: str, seed: int) -> nn.Module:
    m = peftlab.load_model(model, head="seq-cls", seed=seed)
    m.eval()  # no dropout anywhere: both contenders do exactly the same, deterministic work
    return m


def peft_lora(model: nn.Module, r: int, alpha: int) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS, lora_dropout=0.0
    )
    return get_peft_model(model, cfg)


def lab_lora(model: nn.Module, r: int, alpha: int) -> peftlab.PeftModel:
    return peftlab.apply(model, peftlab.methods.lora(r=r, alpha=alpha, targets="qv"))


def init_lora_nonzero(pm: peftlab.PeftModel, seed: int) -> None:
    """Give B a nonzero value (A keeps its Kaiming init) so the LoRA path changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in pm.adapters[pm.active_adapter].peft_modules():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)


def copy_lab_into_peft(pm: peftlab.PeftModel, pp: nn.Module) -> int:
    """Copy peftlab's LoRA A/B and task-head copy into the peft model; returns the tensors copied."""
    names = {id(mod): name for name, mod in pm.base_model.named_modules()}
    inner = pp.base_model.model  # the transformers model inside peft's wrappers
    adapter = pp.active_adapter
    copied = 0
    with torch.no_grad():
        for _, m in pm.adapters[pm.active_adapter].peft_modules():
            target = inner.get_submodule(names[id(m.ref.module)])
            target.lora_A[adapter].weight.copy_(m.lora_A)
            target.lora_B[adapter].weight.copy_(m.lora_B)
            copied += 2
            if target.scaling[adapter] != m.scaling:
                theirs = target.scaling[adapter]
                raise SystemExit(f"LoRA scaling differs: peft {theirs} vs peftlab {m.scaling}")
        head = head_copy(pm.adapters[pm.active_adapter])
        if head is not None:
            wrapped = inner.get_submodule("classifier")
            wrapped.modules_to_save[adapter].load_state_dict(head.state_dict())
            copied += len(head.state_dict())
    return copied


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float) -> Callable[[], float]:
    opt = torch.optim.AdamW(trainable(model), lr=lr)

    def step() -> float:
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def make_infer(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def infer() -> torch.Tensor:
        with torch.inference_mode():
            return model(**inputs).logits

    return infer


# -- environment ----------------------------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def environment(threads: int) -> dict[str, str]:
    import peft
    import transformers

    return {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable_cores()} usable; torch threads = {threads}",
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peftlab": peftlab.__version__,
    }


# -- report -----------------------------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def bootstrap_ci(xs: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def ratio_row(label: str, num: list[float], den: list[float], target: str) -> str:
    med_ratio = statistics.median(num) / statistics.median(den)
    paired = [a / b for a, b in zip(num, den, strict=True)]
    q25, pmed, q75 = quartiles(paired)
    lo, hi = bootstrap_ci(paired)
    cells = [label, f"{med_ratio:.3f}", f"{pmed:.3f}", f"{lo:.3f} – {hi:.3f}", f"{q25:.3f} – {q75:.3f}"]
    cells.append(target)
    return "| " + " | ".join(cells) + " |"


RATIO_HEADER = [
    "| ratio | ratio of medians | median of per-round ratios | 95% CI (bootstrap) | per-round IQR | target |",
    "|---|---:|---:|---:|---:|---|",
]


def section(title: str, wall: Timings, cpu: Timings, ratios: list[tuple[str, str, str, str]]) -> list[str]:
    """Markdown for one section: wall times and ratios (the headline), then the same from CPU time."""
    lines = [f"## {title}", "", "Wall clock (`time.perf_counter`):", "", *time_rows(wall), "", *RATIO_HEADER]
    lines += [ratio_row(label, wall[num], wall[den], target) for label, num, den, target in ratios]
    lines += ["", "Process CPU time of the same calls (`time.process_time`; excludes time descheduled):", ""]
    lines += [*time_rows(cpu), "", *RATIO_HEADER]
    lines += [ratio_row(label, cpu[num], cpu[den], target) for label, num, den, target in ratios]
    return [*lines, ""]


def time_rows(times: dict[str, list[float]]) -> list[str]:
    rows = [
        "| contender | median (ms) | IQR (ms) | q25 – q75 (ms) | min – max (ms) | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, xs in times.items():
        s = summary(xs)
        rows.append(
            f"| {name} | {ms(s['median'])} | {ms(s['iqr'])} | {ms(s['q25'])} – {ms(s['q75'])} | "
            f"{ms(s['min'])} – {ms(s['max'])} | {len(xs)} |"
        )
    return rows


def command(args: argparse.Namespace) -> str:
    parts = [
        "python",
        "benchmarks/lora_step.py",
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    parts += [flag for flag, on in (("--skip-train", args.skip_train), ("--skip-infer", args.skip_infer)) if on]
    if args.output != DEFAULT_OUTPUT:
        parts += ["--output", str(args.output)]
    return shlex.join(parts)


# -- main -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        default="shape:bert-base",
        help="peftlab.load_model name: shape:bert-base, shape:minilm, shape:tiny-bert, minilm",
    )
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds per section")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the whole run (1: on a shared machine, multi-threaded ops wait at "
        "OpenMP barriers for descheduled threads, which times the op count instead of the work)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--r", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--alpha", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=1e-4, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown file for the results")
    p.add_argument("--skip-train", action="store_true", help="only the inference section")
    p.add_argument("--skip-infer", action="store_true", help="only the training section")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = datetime.now(UTC)
    t_start = time.perf_counter()
    log = print

    # Identical model copies: same name and seed give the same random (or pretrained) weights.
    lab_model = build(args.model, args.seed)
    vocab = lab_model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed + 1)
    batch = {
        "input_ids": torch.randint(0, vocab, (args.batch, args.seq), generator=g),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, lab_model.config.num_labels, (args.batch,), generator=g),
    }
    pm = lab_lora(lab_model, args.r, args.alpha)
    init_lora_nonzero(pm, args.seed + 2)
    pp = peft_lora(build(args.model, args.seed), args.r, args.alpha)
    copied = copy_lab_into_peft(pm, pp)
    n_base = sum(p.numel() for p in pm.base_model.parameters())
    n_lab, n_peft = sum(p.numel() for p in trainable(pm)), sum(p.numel() for p in trainable(pp))
    log(
        f"model {args.model}, batch {args.batch} x {args.seq}, threads {args.threads}; trainable: "
        f"peftlab {n_lab:,} / peft {n_peft:,}; copied {copied} tensors peftlab -> peft"
    )
    if n_lab != n_peft:
        raise SystemExit("the two LoRA models train different numbers of parameters")

    lines: list[str] = []
    env = environment(args.threads)
    header = [
        "# LoRA training step and merged inference: peftlab vs peft vs bare model",
        "",
        f"- command: `{command(args)}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        *[f"- {k}: {v}" for k, v in env.items()],
        f"- model: `{args.model}` ({type(lab_model).__name__}, {n_base:,} parameters, eval mode: no dropout)",
        f"- batch: {args.batch} x {args.seq} tokens (random ids, full attention mask, float32)",
        f"- LoRA: r={args.r}, alpha={args.alpha}, targets query+value, dropout 0, classifier trained "
        f"({n_lab:,} trainable parameters in both)",
        f"- rounds: {args.repeats} timed (+{args.warmup} warm-up) per section; contenders interleaved, "
        "order flipped every round",
        "",
    ]

    checks: list[str] = []
    if not args.skip_train:
        step_lab = make_step(pm, batch, args.lr)
        step_peft = make_step(pp, batch, args.lr)
        # Equal work: same loss before any update, and still equal after one AdamW step.
        loss_lab, loss_peft = step_lab(), step_peft()
        loss2_lab, loss2_peft = step_lab(), step_peft()
        checks.append(
            f"- first-step loss: peftlab {loss_lab:.6f}, peft {loss_peft:.6f} "
            f"(|diff| {abs(loss_lab - loss_peft):.1e}); second step: peftlab {loss2_lab:.6f}, "
            f"peft {loss2_peft:.6f} (|diff| {abs(loss2_lab - loss2_peft):.1e})"
        )
        log(checks[-1][2:])
        if abs(loss_lab - loss_peft) > 1e-4 * max(1.0, abs(loss_lab)):
            raise SystemExit("peftlab and peft give different first-step losses: not the same work")
        log(f"timing training steps: {args.repeats} rounds ...")
        wall, cpu = interleaved({"peftlab": step_lab, "peft": step_peft}, args.repeats, args.warmup)
        lines += section(
            "Training step (forward + backward + AdamW step + zero_grad)",
            wall,
            cpu,
            [("peft / peftlab", "peft", "peftlab", ">= 1.0 (peftlab not slower)")],
        )

    if not args.skip_infer:
        bare = build(args.model, args.seed)
        # A second peftlab copy with the same LoRA weights, merged; the training copy stays unmerged.
        merged = lab_lora(build(args.model, args.seed), args.r, args.alpha)
        merged.load_state_dict(pm.state_dict())
        merged.merge()
        infer = {
            "bare model": make_infer(bare, batch),
            "peftlab merged": make_infer(merged, batch),
            "peftlab unmerged": make_infer(pm, batch),
            "peft unmerged": make_infer(pp, batch),
        }
        out = {k: f() for k, f in infer.items()}
        diff = (out["peftlab merged"] - out["peftlab unmerged"]).abs().max().item()
        diff_peft = (out["peftlab unmerged"] - out["peft unmerged"]).abs().max().item()
        checks.append(
            f"- logits: peftlab merged vs unmerged max |diff| {diff:.1e}; peftlab vs peft unmerged "
            f"{diff_peft:.1e}; live hooks after merge: {len(merged.hooks._handles)}"
        )
        log(checks[-1][2:])
        log(f"timing inference: {args.repeats} rounds ...")
        wall, cpu = interleaved(infer, args.repeats, args.warmup)
        lines += section(
            "Inference (forward under torch.inference_mode)",
            wall,
            cpu,
            [
                ("peftlab merged / bare", "peftlab merged", "bare model", "<= 1.01"),
                ("peftlab unmerged / bare", "peftlab unmerged", "bare model", "(info)"),
                ("peft unmerged / bare", "peft unmerged", "bare model", "(info)"),
                ("peft unmerged / peftlab unmerged", "peft unmerged", "peftlab unmerged", "(info)"),
            ],
        )

    elapsed = time.perf_counter() - t_start
    checks.append(f"- wall time of the whole run: {elapsed:.0f} s")
    text = "\n".join([*header, *lines, "## Checks", "", *checks, ""])
    print()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
