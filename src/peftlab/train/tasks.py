"""GLUE / SuperGLUE task registry and data loading for sequence-classification fine-tuning.

Task names
    Canonical names are ``<benchmark>/<task>``: ``glue/cola``, ``glue/sst2``, ``glue/mrpc``, ``glue/qqp``,
    ``glue/stsb``, ``glue/mnli``, ``glue/qnli``, ``glue/rte``, ``glue/wnli``, ``superglue/boolq``,
    ``superglue/cb``, ``superglue/copa``, ``superglue/rte``, ``superglue/wic``, ``superglue/wsc``.
    The bare task name is an alias; ``rte`` exists in both benchmarks and resolves to ``glue/rte``
    (the two share their data; only the file layout differs). Names are case-insensitive.

Examples
    Every loader returns plain dicts ``{"text": str, "text_pair": str | None, "label": int | float | None}``:
    class id for classification, float for STS-B, ``None`` for the unlabelled official test split.
    Tasks that are not sentence(-pair) classification are cast into that form:

    * COPA: text ``"<premise> What was the <cause|effect>?"``, text_pair ``"<choice1> / <choice2>"``,
      label 0 when choice1 is the answer and 1 when choice2 is.
    * WiC: text ``"<word>: <sentence1>"``, text_pair ``"<sentence2>"``, label 1 when the word has the
      same sense in both.
    * WSC: text is the passage with the pronoun marked as ``*it*`` (by its word index), text_pair
      ``"<pronoun> refers to <candidate>."``, label 1 when it does.
    * BoolQ: text is the question, text_pair the passage.

Where data comes from
    ``load_task`` reads the local copy under ``data_dir`` (or ``$PEFTLAB_DATA_DIR``), laid out as
    ``glue/<Folder>/{train,dev,test}.tsv`` (the ``download_glue_data.py`` layout) and
    ``superglue/<Folder>/{train,val,test}.jsonl``. If the file is missing it falls back to the Hugging
    Face hub (``nyu-mll/glue``, ``aps/super_glue``) through the ``datasets`` package, unless that is not
    installed or ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` is set. When both fail it raises one
    ``TaskDataError`` naming the local paths tried and the hub dataset.

    SuperGLUE training files: ``train.jsonl`` is preferred, and where only FewGLUE's 32-example
    ``train32.jsonl`` exists (BoolQ, WiC and WSC in the offline copy) that file *is* the train split.
    A warning is logged when this happens, since it changes the training set by orders of magnitude.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import numpy as np

from peftlab import optional
from peftlab.errors import PeftlabError
from peftlab.reading import parse_json, read_text
from peftlab.train import generative
from peftlab.train.generative import Generation, GenExample

__all__ = [
    "DATA_DIR_ENV",
    "SPLITS",
    "TASKS",
    "Example",
    "GenExample",
    "Row",
    "Splits",
    "TaskDataError",
    "TaskInfo",
    "get_task",
    "load_task",
    "load_user_data",
    "load_user_responses",
    "make_splits",
    "read_prompts",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "PEFTLAB_DATA_DIR"
SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"validation": "dev", "val": "dev"}
_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


class TaskDataError(PeftlabError):
    """Task or user data cannot be found or read; the message says where it looked and why it failed."""


class Example(TypedDict):
    """One classification example, in the form a tokenizer's ``(text, text_pair)`` call takes."""

    text: str
    text_pair: str | None
    label: int | float | None


#: an example of either kind: classification / regression, or prompt → response (generative tasks)
Row = Example | GenExample

Formatter = Callable[[dict[str, Any]], tuple[str, str | None]]


@dataclass(frozen=True)
class TaskInfo:
    """Everything a trainer needs to know about a task, independent of where its data is stored.

    Field names (``text_fields``, ``label``) are those of the hub dataset; ``local_columns`` renames the
    columns of the local files to them, so one formatter serves both sources.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    main_metric: str
    local_dir: str  # relative to the data root
    local_files: dict[str, tuple[str, ...]]  # split -> candidate file names, first existing wins
    hub_id: str
    hub_config: str
    hub_splits: dict[str, str]
    local_columns: dict[str, str] = field(default_factory=dict)
    headerless_columns: tuple[str, ...] = ()  # column names for TSVs without a header row (CoLA)
    formatter: Formatter | None = field(default=None, repr=False, compare=False)
    #: a generative task's prompt → response formatters and scoring (None: classification or regression)
    generation: Generation | None = field(default=None, repr=False, compare=False)

    @property
    def generative(self) -> bool:
        return self.generation is not None

    @property
    def is_regression(self) -> bool:
        return self.label_names is None and self.generation is None

    @property
    def num_labels(self) -> int:
        """Output size of the classification head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    def format(self, row: dict[str, Any]) -> tuple[str, str | None]:
        """Build ``(text, text_pair)`` from a row with hub field names."""
        if self.formatter is not None:
            return self.formatter(row)
        pair = row[self.text_fields[1]] if len(self.text_fields) > 1 else None
        return row[self.text_fields[0]], pair


def _copa(row: dict[str, Any]) -> tuple[str, str]:
    return f"{row['premise']} What was the {row['question']}?", f"{row['choice1']} / {row['choice2']}"


def _wic(row: dict[str, Any]) -> tuple[str, str]:
    return f"{row['word']}: {row['sentence1']}", row["sentence2"]


def _wsc(row: dict[str, Any]) -> tuple[str, str]:
    spans = row.get("target", row)  # local FewGLUE files nest the spans under "target"; the hub does not
    words = row["text"].split(" ")
    i, pronoun = spans["span2_index"], spans["span2_text"]
    # One validation row has a wrong index; leave it unmarked rather than mark the wrong word.
    if i < len(words) and words[i].lower().startswith(pronoun.lower()):
        words[i] = f"*{words[i]}*"
    return " ".join(words), f"{pronoun} refers to {spans['span1_text']}."


_NLI2 = ("entailment", "not_entailment")
_BOOL = ("False", "True")


def _glue(
    task: str,
    folder: str,
    text_fields: tuple[str, ...],
    label_names: tuple[str, ...] | None,
    metrics: tuple[str, ...] = ("accuracy",),
    main_metric: str = "accuracy",
    suffix: str = "",
    **extra: Any,
) -> TaskInfo:
    """``suffix`` names MNLI's matched dev/test files and hub splits (``dev_matched``, ...)."""
    return TaskInfo(
        name=f"glue/{task}",
        text_fields=text_fields,
        label_names=label_names,
        metrics=metrics,
        main_metric=main_metric,
        local_dir=f"glue/{folder}",
        local_files={"train": ("train.tsv",), "dev": (f"dev{suffix}.tsv",), "test": (f"test{suffix}.tsv",)},
        hub_id="nyu-mll/glue",
        hub_config=task,
        hub_splits={"train": "train", "dev": f"validation{suffix}", "test": f"test{suffix}"},
        **extra,
    )


def _superglue(
    task: str,
    folder: str,
    text_fields: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...] = ("accuracy",),
    main_metric: str = "accuracy",
    hub_config: str | None = None,
    formatter: Formatter | None = None,
) -> TaskInfo:
    return TaskInfo(
        name=f"superglue/{task}",
        text_fields=text_fields,
        label_names=label_names,
        metrics=metrics,
        main_metric=main_metric,
        local_dir=f"superglue/{folder}",
        local_files={
            "train": ("train.jsonl", "train32.jsonl"),
            "dev": ("val.jsonl",),
            "test": ("test.jsonl",),
        },
        hub_id="aps/super_glue",
        hub_config=hub_config or task,
        hub_splits={"train": "train", "dev": "validation", "test": "test"},
        formatter=formatter,
    )


_REGISTRY = (
    _glue(
        "cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",), "mcc",
        headerless_columns=("source", "label", "original_label", "sentence"),
    ),
    _glue("sst2", "SST-2", ("sentence",), ("negative", "positive")),
    _glue(
        "mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
        ("f1", "accuracy"), "f1",
        local_columns={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
    ),
    _glue(
        "qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1",
        local_columns={"is_duplicate": "label"},
    ),
    _glue(
        "stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearman"), "spearman",
        local_columns={"score": "label"},
    ),
    _glue(
        "mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
        suffix="_matched",
        local_columns={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
    ),
    _glue("qnli", "QNLI", ("question", "sentence"), _NLI2),
    _glue("rte", "RTE", ("sentence1", "sentence2"), _NLI2),
    _glue("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    _superglue("boolq", "BoolQ", ("question", "passage"), _BOOL),
    _superglue(
        "cb", "CB", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
        ("accuracy", "macro_f1"), "macro_f1",
    ),
    _superglue(
        "copa", "COPA", ("premise", "question", "choice1", "choice2"), ("choice1", "choice2"), formatter=_copa
    ),
    _superglue("rte", "RTE", ("premise", "hypothesis"), _NLI2),
    _superglue("wic", "WiC", ("word", "sentence1", "sentence2"), _BOOL, formatter=_wic),
    _superglue(
        "wsc", "WSC", ("text", "span1_text", "span2_text"), _BOOL, hub_config="wsc.fixed", formatter=_wsc
    ),
)  # fmt: skip


def _generative(
    task: str,
    local_dir: str,
    generation: Generation,
    hub: tuple[str, str, dict[str, str]],
    local_files: dict[str, tuple[str, ...]] | None = None,
) -> TaskInfo:
    """A generative task (``gen/<task>``): prompt → response, scored by what the model generates. ``hub``: the hub
    dataset, its config and its split names."""
    hub_id, hub_config, hub_splits = hub
    return TaskInfo(
        name=f"gen/{task}",
        text_fields=(),
        label_names=None,
        metrics=generation.metrics,
        main_metric=generation.metrics[0],
        local_dir=local_dir,
        local_files=local_files or {"train": ("train.jsonl",), "dev": ("val.jsonl",), "test": ("test.jsonl",)},
        hub_id=hub_id,
        hub_config=hub_config,
        hub_splits=hub_splits,
        generation=generation,
    )


_SG_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
_SUPERGLUE_FILES = {"train": ("train.jsonl", "train32.jsonl"), "dev": ("val.jsonl",), "test": ("test.jsonl",)}
_GENERATIVE = (
    # GSM8K has no dev split: its test split is what make_splits scores (it holds dev out of train)
    _generative(
        "gsm8k", "gsm8k", generative.gsm8k(),
        ("openai/gsm8k", "main", {"train": "train", "dev": "test", "test": "test"}),
        {"train": ("train.jsonl",), "dev": ("test.jsonl",), "test": ("test.jsonl",)},
    ),
    _generative(
        "boolq", "superglue/BoolQ", generative.superglue("boolq", ("no", "yes")),
        ("aps/super_glue", "boolq", _SG_SPLITS), _SUPERGLUE_FILES,
    ),
    _generative(
        "cb", "superglue/CB", generative.superglue("cb", ("entailment", "contradiction", "neutral")),
        ("aps/super_glue", "cb", _SG_SPLITS), _SUPERGLUE_FILES,
    ),
    _generative(
        "copa", "superglue/COPA", generative.superglue("copa", ()), ("aps/super_glue", "copa", _SG_SPLITS),
        _SUPERGLUE_FILES,
    ),
    _generative(
        "rte", "superglue/RTE", generative.superglue("rte", _NLI2), ("aps/super_glue", "rte", _SG_SPLITS),
        _SUPERGLUE_FILES,
    ),
    _generative(
        "cnn_dailymail", "cnn_dailymail", generative.summarization("article", "highlights"),
        ("abisee/cnn_dailymail", "3.0.0", {"train": "train", "dev": "validation", "test": "test"}),
    ),
    _generative(
        "xsum", "xsum", generative.summarization("document", "summary"),
        ("EdinburghNLP/xsum", "default", {"train": "train", "dev": "validation", "test": "test"}),
    ),
)  # fmt: skip

TASKS: dict[str, TaskInfo] = {info.name: info for info in (*_REGISTRY, *_GENERATIVE)}
"""Canonical task name -> TaskInfo."""

# Bare names map to their task; built in reverse so that GLUE, listed first, wins "rte" (and the classification
# tasks win their names over their gen/ text-to-text forms, which keep only their full names).
_LOOKUP: dict[str, str] = {n.split("/", 1)[1]: n for n in reversed(TASKS)} | {n: n for n in TASKS}


def get_task(name: str) -> TaskInfo:
    """Resolve a canonical name or bare alias (case-insensitive) to its TaskInfo."""
    key = name.strip().lower()
    if key not in _LOOKUP:
        aliases = sorted(k for k in _LOOKUP if "/" not in k)
        raise PeftlabError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (aliases: {', '.join(aliases)})")
    return TASKS[_LOOKUP[key]]


def _resolve_split(split: str) -> str:
    key = _SPLIT_ALIASES.get(split, split)
    if key not in SPLITS:
        raise PeftlabError(f"unknown split {split!r}; expected one of {SPLITS}")
    return key


def _to_label(info: TaskInfo, raw: Any) -> int | float | None:
    """Map a stored label (name, digit string, bool or int) to a class id, or to a float for regression."""
    if raw is None or raw == "":
        return None
    if info.label_names is None:
        return float(raw)
    if isinstance(raw, bool | int):
        value = int(raw)
    elif raw in info.label_names:
        value = info.label_names.index(raw)
    elif isinstance(raw, str) and raw.lstrip("-").isdigit():
        value = int(raw)
    else:
        raise ValueError(f"label {raw!r} is not one of {info.label_names}")
    if not 0 <= value < len(info.label_names):
        raise ValueError(f"label id {value} out of range for {info.label_names}")
    return value


def _to_example(info: TaskInfo, row: dict[str, Any]) -> Row:
    if info.generation is not None:
        return info.generation.example(row)
    text, pair = info.format(row)
    return {"text": text, "text_pair": pair, "label": _to_label(info, row.get("label"))}


def _read_tsv(path: Path, info: TaskInfo) -> Iterator[tuple[int, dict[str, Any]]]:
    """GLUE TSVs are not valid CSV (stray quotes), so split on tabs only, as the GLUE scripts do."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        if first is None:
            return
        if any(info.local_columns.get(c, c) == info.text_fields[0] for c in first):
            header = first
        else:
            header = list(info.headerless_columns)
            yield 1, dict(zip(header, first, strict=False))
        for i, fields in enumerate(reader, start=2):
            yield i, dict(zip(header, fields, strict=False))


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, line in enumerate(read_text(path, "data file", TaskDataError).splitlines(), start=1):
        if not line.strip():
            continue
        row = parse_json(line, f"data file {path}:{i}", TaskDataError)
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _read_local(info: TaskInfo, path: Path) -> list[Row]:
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_tsv(path, info)
    examples = []
    for line, row in rows:
        renamed = {info.local_columns.get(k, k): v for k, v in row.items()}
        try:
            examples.append(_to_example(info, renamed))
        except (KeyError, TypeError, ValueError) as exc:
            raise TaskDataError(f"{path}:{line}: not a valid {info.name} row ({exc!r})") from exc
    return examples


def _data_root(data_dir: str | os.PathLike[str] | None) -> Path | None:
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(root).expanduser() if root else None


def _hub_offline() -> str | None:
    for var in _OFFLINE_ENV:
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return f"offline mode is set ({var}={os.environ[var]})"
    return None


def _load(info: TaskInfo, split: str, data_dir: str | os.PathLike[str] | None) -> tuple[list[Row], str]:
    """Load one split, local copy first, then the hub; returns the examples and where they came from."""
    root = _data_root(data_dir)
    if root is None:
        local = f"no local data directory (pass data_dir or set {DATA_DIR_ENV})"
    else:
        candidates = [root / info.local_dir / name for name in info.local_files[split]]
        found = next((p for p in candidates if p.is_file()), None)
        if found is not None:
            if found != candidates[0]:
                logger.warning("%s: %s not found, using %s as the %s split", info.name, candidates[0], found, split)
            return _read_local(info, found), str(found)
        local = "local file(s) not found: " + ", ".join(str(p) for p in candidates)

    hub = f"{info.hub_id} (config {info.hub_config!r}, split {info.hub_splits[split]!r})"
    reason = _hub_offline()
    if reason is None:
        if not optional.available("datasets"):
            reason = "the `datasets` package is not installed"
        else:
            try:
                datasets = optional.require("datasets", "loading from the hub")
                rows = datasets.load_dataset(info.hub_id, info.hub_config, split=info.hub_splits[split])
                # The hub marks the unlabelled test rows with label -1.
                unlabelled = {"label": None} if split == "test" else {}
                return [_to_example(info, {**row, **unlabelled}) for row in rows], f"hub {hub}"
            except Exception as exc:  # any hub/network/format failure ends in the one error below
                reason = f"{type(exc).__name__}: {exc}"
    raise TaskDataError(f"cannot load {info.name} split {split!r}: {local}; Hugging Face hub {hub}: {reason}")


def load_task(name: str, split: str, data_dir: str | os.PathLike[str] | None = None) -> list[Row]:
    """Load an official split (``train``, ``dev`` or ``test``; ``validation`` is an alias of ``dev``).

    The official test split is unlabelled (``label`` is ``None``); use ``make_splits`` for evaluation.
    """
    return _load(get_task(name), _resolve_split(split), data_dir)[0]


class Splits(NamedTuple):
    """Train / model-selection / evaluation sets of one run."""

    train: list[Row]
    dev: list[Row]
    test: list[Row]


def make_splits(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    k: int | None = None,
    data_seed: int = 0,
    dev_size: int | None = None,
) -> Splits:
    """Low-resource splits as in UniPELT (Mao et al., 2022), since GLUE test labels are not public.

    * test  = the official dev set (labelled).
    * dev   = ``dev_size`` examples held out from the official train set for model selection. The
      default is UniPELT's 1,000, capped at half the train set so small tasks (CB, COPA, WNLI, the
      32-example FewGLUE fallback) keep examples to train on.
    * train = ``k`` examples of the rest of the official train set (all of it when ``k`` is None),
      sampled uniformly (not per class).

    One permutation of the train set, drawn from ``data_seed``, gives dev first and then train, so the
    split is deterministic per seed, dev is the same for every ``k``, and smaller ``k`` are prefixes of
    larger ones. Raises ``TaskDataError`` if the train set cannot supply ``dev_size + k`` examples.
    """
    info = get_task(task)
    if k is not None and k <= 0:
        raise PeftlabError(f"k must be a positive number of examples or None, got {k}")
    if dev_size is not None and dev_size < 0:
        raise PeftlabError(f"dev_size must be >= 0, got {dev_size}")
    pool, source = _load(info, "train", data_dir)
    test = _load(info, "dev", data_dir)[0]
    if any(ex.get("label", 0) is None for ex in pool):
        raise TaskDataError(f"{info.name}: the train set at {source} has unlabelled examples")
    n_dev = min(1000, len(pool) // 2) if dev_size is None else dev_size
    available = len(pool) - n_dev
    n_train = available if k is None else k
    if not 0 < n_train <= available:
        raise TaskDataError(
            f"{info.name}: the train set at {source} has {len(pool)} examples, too few for {n_dev} dev + "
            f"{k or 'at least 1'} train examples; lower k or dev_size"
        )
    order = np.random.default_rng(data_seed).permutation(len(pool))
    dev = [pool[i] for i in order[:n_dev]]
    train = [pool[i] for i in order[n_dev : n_dev + n_train]]
    return Splits(train=train, dev=dev, test=test)


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    text = read_text(path, "data file", TaskDataError).removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        yield from enumerate(reader, start=2)
    except csv.Error as e:
        raise TaskDataError(f"data file {path}:{reader.line_num}: not valid CSV ({e})") from None


#: the largest integer label read as a class id (a task with more classes names them with label_names)
MAX_CLASS_ID = 9_999


def _user_label(raw: Any, label_names: Sequence[str] | None) -> int | float:
    """Named labels via ``label_names``; otherwise integers are class ids and other numbers are floats."""
    if label_names is not None:
        if str(raw) not in label_names:
            raise ValueError(f"label {raw!r} is not one of label_names {list(label_names)}")
        return list(label_names).index(str(raw))
    if isinstance(raw, bool | int | float):
        value = int(raw) if isinstance(raw, bool) else raw
    else:
        text = str(raw).strip() if raw is not None else ""
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                pass
        else:
            raise ValueError(f"label {raw!r} is not a number; pass label_names to map label strings to ids")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"label {raw!r} is not a finite number")
    if isinstance(value, int) and not 0 <= value <= MAX_CLASS_ID:
        raise ValueError(
            f"label {raw!r} is not a class id: integer labels are class ids 0..{MAX_CLASS_ID} "
            "(write regression targets with a decimal point, e.g. 1.0)"
        )
    return value


def _user_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a user's ``.csv``, ``.tsv`` or ``.jsonl`` file with their line numbers; each must have
    ``columns``."""
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".tsv", ".jsonl"}:
        raise TaskDataError(f"unsupported file type {suffix or '(none)'!r} for {path}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise TaskDataError(f"user data file not found: {path}")
    rows = _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path, "\t" if suffix == ".tsv" else ",")
    for line, row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise TaskDataError(f"{path}:{line}: missing column(s) {missing}; columns present: {sorted(map(str, row))}")
        yield line, row


def load_user_data(
    path: str | os.PathLike[str],
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> list[Example]:
    """Load a user's own ``.csv``, ``.tsv`` or ``.jsonl`` file (one object per line) as examples.

    Labels must be numbers, or names listed in ``label_names`` (mapped to their index). Integer labels
    are class ids; if any label is a float (``0.5``, ``1.0``), all become floats (a regression task).
    """
    path = Path(path)
    columns = [c for c in (text_column, text_pair_column, label_column) if c is not None]
    examples: list[Example] = []
    for line, row in _user_rows(path, columns):
        texts = [row[text_column], row[text_pair_column] if text_pair_column else ""]
        if not all(isinstance(t, str) for t in texts):
            raise TaskDataError(f"{path}:{line}: text columns must hold strings, got {texts!r}")
        try:
            label = _user_label(row[label_column], label_names)
        except ValueError as exc:
            raise TaskDataError(f"{path}:{line}: {exc}") from exc
        pair = row[text_pair_column] if text_pair_column else None
        examples.append({"text": row[text_column], "text_pair": pair, "label": label})
    if not examples:
        raise TaskDataError(f"{path} contains no examples")
    if any(isinstance(ex["label"], float) for ex in examples):
        for ex in examples:
            ex["label"] = float(ex["label"])
    return examples


def _chat(value: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """A ``messages`` value: a list of ``{"role", "content"}`` turns ending with the assistant's, which is the
    response; returns the turns before it and the response."""
    if not isinstance(value, list) or not value:
        raise TaskDataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for turn in value:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise TaskDataError(f"{where}: each message needs string 'role' and 'content', got {turn!r}")
    if value[-1]["role"] != "assistant" or len(value) < 2:
        raise TaskDataError(f"{where}: messages must end with the assistant's turn (the response) after a prompt")
    return value[:-1], value[-1]["content"]


def load_user_responses(
    path: str | os.PathLike[str],
    prompt_column: str = "prompt",
    response_column: str = "response",
    messages_column: str | None = None,
) -> list[GenExample]:
    """Load a user's prompt → response file (``.csv``, ``.tsv`` or ``.jsonl``): two text columns, or (JSONL) one
    ``messages_column`` of chat turns whose last, the assistant's, is the response. An empty response is refused:
    there would be nothing to learn from it."""
    path = Path(path)
    columns = [messages_column] if messages_column else [prompt_column, response_column]
    examples: list[GenExample] = []
    for line, row in _user_rows(path, columns):
        where = f"{path}:{line}"
        if messages_column:
            turns, response = _chat(row[messages_column], where)
            example: GenExample = {"prompt": turns[-1]["content"], "response": response, "reference": response}
            example["messages"] = turns
        else:
            prompt, response = row[prompt_column], row[response_column]
            if not (isinstance(prompt, str) and isinstance(response, str)):
                raise TaskDataError(
                    f"{where}: prompt and response columns must hold strings, got {prompt!r}, {response!r}"
                )
            example = {"prompt": prompt, "response": response, "reference": response}
        if not example["response"].strip():
            raise TaskDataError(f"{where}: empty response; every example needs a response to learn")
        examples.append(example)
    if not examples:
        raise TaskDataError(f"{path} contains no examples")
    return examples


def read_prompts(
    path: str | os.PathLike[str], prompt_column: str = "prompt", messages_column: str | None = None
) -> list[GenExample]:
    """Prompts to generate from, one per row of a ``.csv``, ``.tsv`` or ``.jsonl`` file: a text column, or (JSONL) a
    column of chat turns to continue (rendered with the model's chat template)."""
    path = Path(path)
    rows: list[GenExample] = []
    for line, row in _user_rows(path, [messages_column or prompt_column]):
        if messages_column:
            turns = row[messages_column]
            if not isinstance(turns, list) or not turns:
                raise TaskDataError(f"{path}:{line}: messages must be a non-empty list of {{role, content}} objects")
            _chat([*turns, {"role": "assistant", "content": ""}], f"{path}:{line}")
            rows.append({"prompt": turns[-1]["content"], "response": "", "reference": "", "messages": turns})
        else:
            if not isinstance(row[prompt_column], str):
                raise TaskDataError(f"{path}:{line}: the prompt column must hold strings, got {row[prompt_column]!r}")
            rows.append({"prompt": row[prompt_column], "response": "", "reference": ""})
    if not rows:
        raise TaskDataError(f"{path} contains no prompts")
    return rows
