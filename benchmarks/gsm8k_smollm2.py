"""SmolLM2-135M-Instruct (the packaged GGUF) fine-tuned on GSM8K by each method at one budget, scored by exact match
of the final number it generates on a fixed subset of the test split; `peft`'s own LoRA trained by the same loop as a
side-by-side row, and the base model zero-shot on the same prompt.

    python benchmarks/gsm8k_smollm2.py run            # every row not done yet, each in a fresh process
    python benchmarks/gsm8k_smollm2.py run --rows base lora
    python benchmarks/gsm8k_smollm2.py report         # results/gsm8k_smollm2.md from the rows' JSON

Budget (one CPU thread per row): 60 optimiser steps of batch 4 (240 of the TRAIN examples drawn with data seed 0),
max length 320 tokens (3 of the 340 examples a row sees have their response cut; counted in the log), the method's
default learning rate (peftlab's, from its paper), and the dev loss on 100 held-out training examples every 20 steps
selects the state; then greedy generation (at most 160 new tokens) on the first TEST examples of GSM8K's test split,
the same prompt for every row. Peak memory is the row
process's peak RSS; tokens/s counts non-padding training tokens over training time. Resumable: each finished row is
a JSON file in results/gsm8k_smollm2/.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import fresh_rows

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "gsm8k_smollm2"
REPORT = HERE / "results" / "gsm8k_smollm2.md"
#: the T5 row: T5-Base's shape with random weights and a hashing tokenizer (no GGUF or tokenizer of T5 is packaged),
#: LoRA trained at the same budget for its speed and memory only: its losses and generations mean nothing
T5_ROW, T5_MODEL = "t5-base-lora", "shape:t5-base"
#: its settings: a dev split of 8 (its end-of-run generated dev metrics would be minutes of meaningless decoding)
T5_SETTINGS = {"model": T5_MODEL, "dev_size": 8}
ROWS = ("base", "lora", "peft-lora", "dora", "ia3", "prompt", "prefix", "pfeiffer", "unipelt", "full", T5_ROW)
TEST = 200  # test examples scored: a binomial sigma of sqrt(p(1-p)/200), 1.5 points at p = 5%
TRAIN = 1000  # training examples drawn (data seed 0); 60 steps x 4 see 240 of them
SETTINGS = {
    "model": "smollm2-135m",
    "task": "gsm8k",
    "k": TRAIN,
    "dev_size": 100,
    "max_steps": 60,
    "batch_size": 4,
    "eval_every": 20,
    "max_length": 320,
    "max_new_tokens": 160,
    "eval_batch_size": 8,
    "score_test": False,
    "final_dev_metrics": False,  # ~10 min of dev decoding per row that the table does not show (rows before 12-07: on)
    "progress": False,
}


def _peft_lora(model):
    """peft's LoRA with peftlab's lora() defaults: r 8, alpha 16, query and value, no dropout."""
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def run_row(name: str, data_dir: str) -> dict:
    """Train (unless ``base``) and score one row in this process."""
    import torch

    from peftlab import methods
    from peftlab.memory import peak_rss
    from peftlab.train import TrainConfig
    from peftlab.train.data import load_for_task, task_splits
    from peftlab.train.generation import Sampling, generate_texts, response_loss
    from peftlab.train.generative import score_texts
    from peftlab.train.loop import Run

    torch.manual_seed(0)
    config = TrainConfig(data_dir=data_dir, **(SETTINGS | (T5_SETTINGS if name == T5_ROW else {})))
    start = time.perf_counter()
    # base: LoRA as initialised (B = 0), which leaves every output of the backbone exactly as it was
    spec = methods.get("lora" if name in ("base", "peft-lora", T5_ROW) else name)
    model = None
    if name == "peft-lora":
        task, _ = task_splits(config)
        model = _peft_lora(load_for_task(config.model, task)[0])
        config.lr = spec.default_lr()
    run = Run(spec, config, model)
    record = fresh_rows.UNTRAINED if name == "base" else fresh_rows.train_row(run)
    if name == T5_ROW:  # random weights: nothing to score
        common = {"dev_loss": None, "test_loss": None, "exact_match": None, "sigma": None, "score_s": 0.0}
        return {"row": name, **record, **common, "wall_s": time.perf_counter() - start, "peak_rss_bytes": peak_rss(),
                "settings": SETTINGS | T5_SETTINGS, "torch_threads": torch.get_num_threads()}  # fmt: skip
    batch, rows = config.eval_batch_size, run.splits.test[:TEST]
    dev_loss = response_loss(run.pm, run.encoder, run.splits.dev, batch, run.device)
    scoring = time.perf_counter()
    test_loss = response_loss(run.pm, run.encoder, rows, batch, run.device)
    texts = generate_texts(run.pm, run.encoder, rows, batch, run.device, Sampling(config.max_new_tokens))
    p = score_texts("number", texts, [r["reference"] for r in rows])["exact_match"]
    shown = [
        {"question": r["prompt"], "generated": t, "reference": r["reference"]} for r, t in zip(rows, texts, strict=True)
    ]
    return {
        "row": name,
        **record,
        "dev_loss": dev_loss,
        "test_loss": test_loss,
        "exact_match": p,
        "sigma": math.sqrt(p * (1 - p) / TEST),
        "test_examples": TEST,
        "score_s": time.perf_counter() - scoring,
        "wall_s": time.perf_counter() - start,
        "peak_rss_bytes": peak_rss(),
        "generations": shown,
        "settings": SETTINGS,
        "torch_threads": torch.get_num_threads(),
    }


def cmd_row(args: argparse.Namespace) -> None:
    result = run_row(args.row, args.data_dir)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.row}.json").write_text(json.dumps(result, indent=2))


def cmd_run(args: argparse.Namespace) -> None:
    for name in args.rows:
        if not (OUT / f"{name}.json").is_file():
            fresh_rows.run_fresh(__file__, [name], args.data_dir)


def cmd_report(_: argparse.Namespace) -> None:
    rows = [json.loads((OUT / f"{n}.json").read_text()) for n in ROWS if (OUT / f"{n}.json").is_file()]
    lines = [
        "| row | lr | trainable | exact match (± σ) | dev loss | test loss | train tokens/s | peak RSS GiB | "
        "train min | score min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        scored = r["exact_match"] is not None
        em = f"{100 * r['exact_match']:.1f} ± {100 * r['sigma']:.1f}" if scored else "- (random weights)"
        losses = f"{r['dev_loss']:.3f} | {r['test_loss']:.3f}" if scored else "- | -"
        lines.append(
            f"| {r['row']} | {r['lr'] or '-'} | {r.get('trainable') or '-'} | {em} | {losses} | "
            f"{tps} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['train_s'] / 60:.1f} | {r['score_s'] / 60:.1f} |"
        )
    missing = [n for n in ROWS if n not in {r["row"] for r in rows}]
    head = [
        "# SmolLM2-135M-Instruct on GSM8K: every method at one budget",
        "",
        f"- written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python benchmarks/gsm8k_smollm2.py "
        "report`; rows by `python benchmarks/gsm8k_smollm2.py run` (protocol: the script's docstring)",
        f"- exact match of the final number on the first {TEST} test examples, greedy, at most "
        f"{SETTINGS['max_new_tokens']} new tokens; σ = sqrt(p(1-p)/{TEST}) of one row",
        "- one thread per row on a 2-core CPU shared with another benchmark: tokens/s and minutes are indicative only",
        f"- `{T5_ROW}`: LoRA on `{T5_MODEL}` (T5-Base's shape, random weights, a hashing tokenizer whose token counts "
        "differ from SmolLM2's) at the same budget, for its training speed and memory only",
        f"- rows not measured yet: {', '.join(missing) or 'none'}",
        "",
    ]
    REPORT.write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))


def main() -> None:
    fresh_rows.main(__doc__, (cmd_run, cmd_row, cmd_report), [("row", ROWS)])


if __name__ == "__main__":
    main()
