"""``peftlab bench --protocol survey``: the efficiency comparison of the survey (Lialin et al. 2023, "Scaling Down to
Scale Up", section 11.3, Tables 3 and 5), so that its table can be measured again and set beside ours.

The survey trains T5 text to text on SuperGLUE with the prompts of its Appendix A, inputs up to 512 tokens and
targets up to 8, batches of 32 made of microbatches (its Table 3) with gradient accumulation, and reports per method
the trainable parameters, peak training memory and the training and inference throughput as % of full fine-tuning.
Its 14 methods run here as peftlab presets with the settings it used (the libraries' defaults: size-64 adapters,
LoRA r 8 on every query and value, AdapterHub's prefix, MAM and UniPELT configurations and prompt length 10).
"""

from __future__ import annotations

from typing import Any

import torch
from scipy import stats

from peftlab.errors import PeftlabError
from peftlab.train.responses import ResponseEncoder
from peftlab.train.tasks import get_task, load_task

#: The survey's training batch; microbatches accumulate to it.
BATCH = 32
MAX_INPUT, MAX_OUTPUT = 512, 8
TASKS = ("gen/rte", "gen/copa", "gen/boolq")
#: Table 3: the microbatch per model and dataset (T5-11B: 1 everywhere); other T5 sizes take T5-Large's.
MICROBATCH = {
    "t5-large": {"gen/rte": 32, "gen/copa": 32, "gen/boolq": 16},
    "t5-3b": {"gen/rte": 4, "gen/copa": 4, "gen/boolq": 2},
    "t5-11b": dict.fromkeys(TASKS, 1),
}
#: The survey's row names and the bench items that configure them (full fine-tuning is the bench's own row).
METHODS = {
    "houlsby-64": "Houlsby",
    "pfeiffer-64": "Pfeiffer",
    "parallel": "Parallel Adapter",
    "ia3": "IA3",
    "prefix-survey": "Prefix tuning",
    "prompt:length=10": "Prompt tuning",
    "ln": "LN tuning",
    "lora-qv": "LoRA (q and v)",
    "lora-all": "LoRA (all)",
    "krona": "KronA",
    "compacter": "Compacter",
    "compacter++": "Compacter++",
    "mam-survey": "MAM",
    "unipelt-survey": "UniPELT",
}
#: Table 5 (section 11.3), typed in from the paper: per model and row, (trainable parameters in millions, peak GPU
#: memory in GB, training throughput % of full, inference throughput % of full); A100 40GB, see its section 11.1.
TABLE5: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "t5-large": {
        "full": (737.67, 20.7, 100.0, 100.0),
        "houlsby-64": (12.69, 12.1, 101.7, 70.1),
        "pfeiffer-64": (6.34, 14.0, 108.6, 76.8),
        "parallel": (50.41, 14.7, 123.1, 73.2),
        "ia3": (0.34, 16.2, 124.7, 76.2),
        "prefix-survey": (77.31, 15.4, 113.2, 65.0),
        "prompt:length=10": (4.42, 10.6, 108.8, 64.5),
        "ln": (0.12, 14.6, 143.2, 103.1),
        "lora-qv": (2.36, 14.3, 123.7, 87.4),
        "lora-all": (8.65, 15.9, 80.9, 66.9),
        "krona": (0.22, 14.6, 109.3, 82.3),
        "compacter": (0.30, 14.4, 81.3, 59.0),
        "compacter++": (0.15, 13.9, 95.4, 68.1),
        "mam-survey": (171.07, 16.6, 106.1, 59.1),
        "unipelt-survey": (86.22, 16.7, 61.1, 45.2),
    },
    "t5-3b": {
        "full": (2851.60, 32.9, 100.0, 100.0),
        "houlsby-64": (12.69, 9.3, 93.1, 58.2),
        "pfeiffer-64": (6.34, 9.6, 102.9, 64.5),
        "parallel": (50.41, 10.0, 102.7, 61.2),
        "ia3": (1.38, 10.8, 103.9, 65.6),
        "prefix-survey": (77.25, 12.3, 105.2, 56.8),
        "prompt:length=10": (17.69, 8.9, 100.0, 58.8),
        "ln": (0.12, 9.7, 140.7, 101.8),
        "lora-qv": (3.93, 9.6, 103.0, 79.8),
        "lora-all": (25.17, 10.6, 70.2, 56.7),
        "krona": (0.41, 10.8, 81.2, 74.0),
        "compacter": (0.30, 9.7, 71.5, 46.0),
        "compacter++": (0.15, 9.5, 86.9, 54.3),
        "mam-survey": (171.07, 14.2, 84.5, 52.1),
        "unipelt-survey": (316.70, 12.8, 51.0, 38.2),
    },
    "t5-11b": {
        "full": (11307.32, 104.9, 100.0, 100.0),
        "houlsby-64": (12.69, 28.8, 214.9, 70.3),
        "pfeiffer-64": (6.34, 28.6, 239.5, 76.3),
        "parallel": (50.41, 29.0, 233.3, 73.9),
        "ia3": (3.48, 31.0, 232.2, 75.5),
        "prefix-survey": (1211.99, 37.9, 182.3, 62.3),
        "prompt:length=10": (70.78, 30.2, 209.5, 64.0),
        "ln": (0.12, 28.4, 275.9, 97.8),
        "lora-qv": (20.05, 28.9, 216.9, 81.3),
        "lora-all": (91.23, 30.8, 161.7, 62.4),
        "krona": (0.77, 33.2, 174.0, 71.8),
        "compacter": (0.30, 28.6, 162.7, 56.8),
        "compacter++": (0.15, 28.5, 208.8, 64.2),
        "mam-survey": (1262.39, 43.3, 152.8, 57.3),
        "unipelt-survey": (1224.78, 38.9, 100.2, 46.8),
    },
}
SOURCE = "Lialin et al. 2023, arXiv:2303.15647, section 11.3, Table 5 (T5, A100 40GB)"


def size_of(model: str) -> str | None:
    """The survey's model a ``shape:`` name is (``shape:t5-large`` -> ``t5-large``), or None."""
    name = model.removeprefix("shape:")
    return name if name in TABLE5 else None


def microbatch(model: str, task: str) -> int:
    """Table 3's microbatch for the model and task (T5-Large's for other T5 sizes)."""
    return MICROBATCH.get(size_of(model) or "t5-large", MICROBATCH["t5-large"])[task]


def check(model_type: str, task: str) -> None:
    if model_type != "t5":
        raise PeftlabError(f"--protocol survey measures T5 text to text (shape:t5-large, ...); this is a {model_type}")
    if task not in TASKS:
        raise PeftlabError(f"--protocol survey runs on one of {', '.join(TASKS)}, got {task!r}")


def batches(tokenizer: Any, task: str, data_dir: str | None, micro: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """One training batch of the survey: ``BATCH`` real training examples (a seeded draw), their prompts as the
    survey wrote them cut to ``MAX_INPUT`` tokens and targets to ``MAX_OUTPUT``, in microbatches of ``micro``, each
    padded to its longest row."""
    rows = load_task(task, "train", data_dir)
    if len(rows) < BATCH:
        raise PeftlabError(f"{task} has {len(rows)} training examples, fewer than the survey's batch of {BATCH}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:BATCH].tolist()
    encoder = ResponseEncoder(tokenizer, get_task(task), MAX_INPUT, seq2seq=True)
    out = []
    for i in range(0, BATCH, micro):
        batch = encoder([rows[j] for j in order[i : i + micro]])
        labels = batch["labels"][:, :MAX_OUTPUT]
        out.append({**batch, "labels": labels})
    return out


def comparison(model: str, table: list[dict[str, Any]]) -> list[str]:
    """Markdown: each survey row beside ours, and the Spearman rank correlation of each column over the rows both
    have (memory: ours is peak RSS on a CPU, theirs peak GPU memory; both rank the methods)."""
    size = size_of(model)
    if size is None:
        return [f"(no survey numbers for `{model}`: Table 5 has t5-large, t5-3b and t5-11b)"]
    theirs = TABLE5[size]
    ours = {r["method"]: r for r in table if r["impl"] == "peftlab" and r["method"] in theirs}
    lines = [
        f"Survey numbers: {SOURCE}, the `{size}` rows.",
        "",
        "| method | trainable M (ours / survey) | peak memory (ours MB / survey GB) | "
        "train % of full (ours / survey) | infer % of full (ours / survey) |",
        "|---|---:|---:|---:|---:|",
    ]
    columns: dict[str, list[tuple[float, float]]] = {"trainable": [], "memory": [], "train": [], "infer": []}
    for label, row in ours.items():
        t = theirs[label]
        mine = (row["trainable_params"] / 1e6, row["peak_mb"], row["train_pct_of_full"], row["infer_pct_of_full"])
        for key, a, b in zip(columns, mine, t, strict=True):
            if a is not None:
                columns[key].append((a, b))
        name = f"{label} ({METHODS.get(label, 'Full tuning')})"
        cells = [f"{_fmt(a)} / {b:g}" for a, b in zip(mine, t, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Spearman rank correlation with the survey's column (rows both have):", ""]
    for key, pairs in columns.items():
        if len(pairs) > 2 and len({a for a, _ in pairs}) > 1:
            rho = stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
            lines.append(f"- {key}: ρ = {rho:.2f} over {len(pairs)} rows")
    return lines


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.2f}" if abs(x) < 1000 else f"{x:,.0f}"
