"""Task registry, loaders and low-resource splits, checked against the real files in shared/data."""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.train import tasks
from peftlab.train.tasks import TaskDataError, get_task, load_task, load_user_data, make_splits

DATA_DIR = Path(os.environ.get("PEFTLAB_DATA_DIR") or Path(__file__).parents[2] / "shared" / "data")


@pytest.fixture
def data_dir() -> Path:
    if not (DATA_DIR / "glue").is_dir() or not (DATA_DIR / "superglue").is_dir():
        pytest.skip(f"real task data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure no test reaches for the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _key(ex: tasks.Example) -> tuple:
    return ex["text"], ex["text_pair"], ex["label"]


# --- registry -----------------------------------------------------------------------------------


def test_names_and_aliases() -> None:
    assert get_task("rte").name == "glue/rte"
    assert get_task("RTE").name == "glue/rte"
    assert get_task("superglue/rte").name == "superglue/rte"
    assert get_task("CoLA").name == "glue/cola"
    assert get_task("boolq") is tasks.TASKS["superglue/boolq"]
    for name, info in tasks.TASKS.items():
        assert get_task(name) is info
        assert info.main_metric in info.metrics
        if not info.generative:
            assert info.num_labels == (1 if info.is_regression else len(info.label_names))
    assert get_task("stsb").is_regression
    assert get_task("cb").num_labels == 3


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'glue/foo'") as err:
        get_task("glue/foo")
    assert "glue/cola" in str(err.value) and "superglue/wsc" in str(err.value)
    with pytest.raises(ValueError, match="unknown split"):
        load_task("rte", "holdout", "/nonexistent")


# --- real data ----------------------------------------------------------------------------------

COUNTS = [  # from shared/data/README.md
    ("cola", "train", 8551),
    ("cola", "dev", 1043),
    ("cola", "test", 1063),
    ("sst2", "train", 67349),
    ("sst2", "dev", 872),
    ("mrpc", "train", 3667),
    ("mrpc", "dev", 408),
    ("rte", "train", 2490),
    ("rte", "dev", 277),
    ("rte", "test", 3000),
    ("stsb", "train", 5749),
    ("stsb", "dev", 1500),
    ("wnli", "train", 635),
    ("wnli", "dev", 71),
    ("cb", "train", 250),
    ("cb", "dev", 56),
    ("copa", "train", 400),
    ("copa", "validation", 100),
    ("superglue/rte", "train", 2490),
    ("boolq", "dev", 3270),
    ("boolq", "train", 32),  # FewGLUE train32 fallback
    ("wic", "dev", 638),
    ("wsc", "dev", 104),
]


@pytest.mark.real
@pytest.mark.parametrize(("task", "split", "n"), COUNTS, ids=[f"{t}-{s}" for t, s, _ in COUNTS])
def test_row_counts(data_dir: Path, no_hub: None, task: str, split: str, n: int) -> None:
    assert len(load_task(task, split, data_dir)) == n


NOT_OFFLINE = {"glue/qqp", "glue/mnli", "glue/qnli", "gen/cnn_dailymail", "gen/xsum"}  # README: hub only
LABELLED = [name for name, info in tasks.TASKS.items() if name not in NOT_OFFLINE and not info.generative]
GENERATIVE = [name for name, info in tasks.TASKS.items() if name not in NOT_OFFLINE and info.generative]


@pytest.mark.real
@pytest.mark.parametrize("task", GENERATIVE)
def test_generative_examples_are_well_formed(data_dir: Path, no_hub: None, task: str) -> None:
    for split in ("train", "dev"):
        for ex in load_task(task, split, data_dir):
            assert set(ex) == {"prompt", "response", "reference"}
            assert all(isinstance(ex[k], str) and ex[k].strip() for k in ex), ex


@pytest.mark.real
@pytest.mark.parametrize("task", LABELLED)
def test_examples_are_well_formed(data_dir: Path, no_hub: None, task: str) -> None:
    info = get_task(task)
    for split in ("train", "dev"):
        for ex in load_task(task, split, data_dir):
            assert set(ex) == {"text", "text_pair", "label"}
            assert isinstance(ex["text"], str) and ex["text"].strip()
            assert (ex["text_pair"] is None) == (len(info.text_fields) == 1)
            if info.is_regression:
                assert isinstance(ex["label"], float) and 0.0 <= ex["label"] <= 5.0
            else:
                assert isinstance(ex["label"], int) and 0 <= ex["label"] < info.num_labels


@pytest.mark.real
def test_label_mapping(data_dir: Path, no_hub: None) -> None:
    # Counts of the string labels in the files, mapped through each task's label_names.
    rte = Counter(ex["label"] for ex in load_task("rte", "train", data_dir))
    assert rte == {0: 1249, 1: 1241}  # entailment, not_entailment
    assert Counter(ex["label"] for ex in load_task("superglue/rte", "train", data_dir)) == rte
    cb = Counter(ex["label"] for ex in load_task("cb", "dev", data_dir))
    assert cb == {0: 23, 1: 28, 2: 5}  # entailment, contradiction, neutral
    assert Counter(ex["label"] for ex in load_task("boolq", "dev", data_dir)) == {0: 1237, 1: 2033}
    assert load_task("stsb", "train", data_dir)[1]["label"] == 3.8
    assert {ex["label"] for ex in load_task("rte", "test", data_dir)} == {None}


@pytest.mark.real
def test_cast_tasks_format(data_dir: Path, no_hub: None) -> None:
    copa = load_task("copa", "train", data_dir)[0]
    assert copa == {
        "text": "My body cast a shadow over the grass. What was the cause?",
        "text_pair": "The sun was rising. / The grass was cut.",
        "label": 0,
    }
    wic = load_task("wic", "dev", data_dir)[0]
    assert wic["text"] == "class: An emerging professional class."
    wsc = load_task("wsc", "train", data_dir)
    assert sum("*" in ex["text"] for ex in wsc) == len(wsc)
    assert wsc[0]["text_pair"] == "it refers to Tina."


@pytest.mark.real
def test_data_dir_from_environment(data_dir: Path, no_hub: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    assert len(load_task("wnli", "dev")) == 71


# --- low-resource splits -------------------------------------------------------------------------


@pytest.mark.real
def test_splits_follow_unipelt(data_dir: Path, no_hub: None) -> None:
    pool = load_task("rte", "train", data_dir)
    s = make_splits("rte", data_dir, k=100, data_seed=1)
    assert (len(s.train), len(s.dev)) == (100, 1000)
    assert s.test == load_task("rte", "dev", data_dir)
    # train and dev are disjoint draws from the official train set (compared as multisets, as a few
    # texts repeat in the data).
    used = Counter(map(_key, s.train)) + Counter(map(_key, s.dev))
    assert not used - Counter(map(_key, pool))
    assert not {id(ex) for ex in s.train} & {id(ex) for ex in s.dev}

    full = make_splits("rte", data_dir, data_seed=1)
    assert (len(full.train), len(full.dev)) == (len(pool) - 1000, 1000)
    assert full.dev == s.dev and full.train[:100] == s.train  # dev fixed per seed, smaller k nested


@pytest.mark.real
def test_splits_are_deterministic_per_seed(data_dir: Path, no_hub: None) -> None:
    a = make_splits("sst2", data_dir, k=64, data_seed=3)
    b = make_splits("sst2", data_dir, k=64, data_seed=3)
    c = make_splits("sst2", data_dir, k=64, data_seed=4)
    assert a == b
    assert a.train != c.train and a.dev != c.dev


@pytest.mark.real
def test_small_and_fewglue_tasks(data_dir: Path, no_hub: None) -> None:
    cb = make_splits("cb", data_dir)
    assert (len(cb.train), len(cb.dev), len(cb.test)) == (125, 125, 56)
    boolq = make_splits("boolq", data_dir, k=16)
    assert (len(boolq.train), len(boolq.dev), len(boolq.test)) == (16, 16, 3270)
    assert len(make_splits("boolq", data_dir, k=32, dev_size=0).train) == 32
    with pytest.raises(TaskDataError, match=r"train32\.jsonl has 32 examples"):
        make_splits("boolq", data_dir, k=32)
    with pytest.raises(TaskDataError, match="lower k or dev_size"):
        make_splits("rte", data_dir, k=2000)
    with pytest.raises(PeftlabError, match="k must be"):
        make_splits("rte", data_dir, k=0)


# --- missing data --------------------------------------------------------------------------------


def test_missing_data_names_both_sources(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(TaskDataError) as err:
        load_task("rte", "train", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "glue" / "RTE" / "train.tsv") in msg
    assert "nyu-mll/glue" in msg and "HF_DATASETS_OFFLINE" in msg
    assert isinstance(err.value, ValueError)

    with pytest.raises(TaskDataError) as err:
        load_task("wsc", "train", tmp_path)
    msg = str(err.value)
    assert "train.jsonl" in msg and "train32.jsonl" in msg and "aps/super_glue" in msg and "wsc.fixed" in msg


def test_missing_data_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "PEFTLAB_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TaskDataError, match=r"PEFTLAB_DATA_DIR.*nyu-mll/glue.*not installed"):
        load_task("cola", "dev")


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset) -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(hub_id: str, config: str, split: str) -> list[dict]:
        calls.append((hub_id, config, split))
        return [{"premise": "p", "hypothesis": "h", "label": 2 if split != "test_matched" else -1, "idx": 0}]

    _fake_datasets(monkeypatch, load_dataset)
    assert load_task("mnli", "dev", tmp_path) == [{"text": "p", "text_pair": "h", "label": 2}]
    assert load_task("mnli", "test", tmp_path)[0]["label"] is None
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched"), ("nyu-mll/glue", "mnli", "test_matched")]


def test_hub_failure_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: object, **kwargs: object) -> list[dict]:
        raise ConnectionError("no route to host")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(TaskDataError, match=r"BoolQ.*aps/super_glue.*ConnectionError: no route to host"):
        load_task("boolq", "dev", tmp_path)


def test_bad_local_row_names_file_and_line(tmp_path: Path, no_hub: None) -> None:
    folder = tmp_path / "superglue" / "CB"
    folder.mkdir(parents=True)
    rows = [
        {"premise": "a", "hypothesis": "b", "label": "neutral"},
        {"premise": "a", "hypothesis": "b", "label": "maybe"},
    ]
    (folder / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(TaskDataError, match=r"val\.jsonl:2: .*maybe"):
        load_task("cb", "dev", tmp_path)


# --- user data -----------------------------------------------------------------------------------


def test_user_csv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('question,answer,y\n"Is it, really?",yes,1\nwhy,because,0\n')
    out = load_user_data(path, "question", "y", text_pair_column="answer")
    assert out == [
        {"text": "Is it, really?", "text_pair": "yes", "label": 1},
        {"text": "why", "text_pair": "because", "label": 0},
    ]
    named = load_user_data(path, "answer", "question", label_names=["why", "Is it, really?"])
    assert [ex["label"] for ex in named] == [1, 0]


def test_user_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"s": "good", "score": 1}\n\n{"s": "bad", "score": 0.5}\n')
    out = load_user_data(path, "s", "score")
    assert out == [
        {"text": "good", "text_pair": None, "label": 1.0},
        {"text": "bad", "text_pair": None, "label": 0.5},
    ]
    assert all(isinstance(ex["label"], float) for ex in out)  # one non-integer label makes it regression


def test_user_data_errors(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("text,label\nhello,pos\n")
    with pytest.raises(
        TaskDataError, match=r"missing column\(s\) \['sentence'\]; columns present: \['label', 'text'\]"
    ):
        load_user_data(csv_path, "sentence", "label")
    with pytest.raises(TaskDataError, match="not a number; pass label_names"):
        load_user_data(csv_path, "text", "label")
    with pytest.raises(TaskDataError, match=r"unsupported file type '\.parquet'"):
        load_user_data(tmp_path / "data.parquet", "text", "label")
    with pytest.raises(TaskDataError, match="not found"):
        load_user_data(tmp_path / "absent.jsonl", "text", "label")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n[1, 2]\n')
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: expected a JSON object"):
        load_user_data(bad, "text", "label")
