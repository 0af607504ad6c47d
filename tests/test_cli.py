"""The command line: one line per method, the counting table, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peftlab import methods
from peftlab.cli import main


def test_methods_lists_every_preset_one_line_each(capsys) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [*methods.METHODS, *methods.MODEL_METHODS]


def test_show_prints_the_table(capsys) -> None:
    assert main(["show", "--model", "shape:bert-base", "--method", "pfeiffer"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "stored" in out and "changed" in out
    assert "layer 11" in out and "total" in out


def test_show_json_with_method_arguments(capsys) -> None:
    assert main(["show", "--model", "shape:tiny-bert", "--method", "lora", "--set", "r=4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["per_kind"]["lora"]["trainable"] == 2 * 2 * (32 * 4 + 4 * 32)


def test_show_reads_a_spec_file(tmp_path, capsys) -> None:
    path = tmp_path / "spec.json"
    methods.houlsby(size=8).save(path)
    assert main(["show", "--model", "shape:tiny-llama", "--spec", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "houlsby"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "--model", "shape:tiny-bert", "--method", "nope"], "unknown method 'nope'"),
        (["show", "--model", "shape:bert-huge", "--method", "lora"], "unknown shape 'shape:bert-huge'"),
        (["show", "--model", "shape:tiny-bert"], "give --method NAME"),
        (["show", "--model", "shape:tiny-bert", "--spec", "/nonexistent.json"], "does not exist"),
        (["show", "--model", "shape:tiny-t5", "--method", "bitfit"], "bitfit needs bias terms"),
        (
            [
                "train",
                "--model",
                "shape:tiny-bert",
                "--task",
                "rte",
                "--method",
                "lora",
                "--output",
                "/nonexistent/x",
                "--lr",
                "-1",
            ],
            "lr must be a number > 0",
        ),
        (
            ["eval", "--model", "shape:tiny-bert", "--task", "rte", "--adapter", "/nonexistent", "--batch-size", "0"],
            "--batch-size must be >= 1",
        ),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "peftlab.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_space_shows_the_autopeft_size(capsys) -> None:
    assert main(["space", "--model", "shape:bert-base", "--space", "autopeft", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 2**12 * 11**3  # the AutoPEFT paper's BERT-base count


def test_show_s4_is_sized_for_the_model(capsys) -> None:
    assert main(["show", "--model", "shape:t5-base", "--method", "s4", "--set", "bitfit=False", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0.45 < data["trainable_pct"] < 0.55


def test_train_then_eval_agree(tmp_path, capsys) -> None:
    import os
    from pathlib import Path

    data = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (data / "glue" / "RTE").is_dir():
        pytest.skip(f"no GLUE data under {data}")
    common = ["--model", "shape:tiny-bert", "--task", "rte", "--data-dir", str(data)]
    assert (
        main(
            [
                "train",
                *common,
                "--method",
                "lora",
                "--k",
                "32",
                "--dev-size",
                "16",
                "--max-steps",
                "3",
                "--output",
                str(tmp_path / "run"),
                "--no-progress",
                "--eval-every",
                "2",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    trained = json.loads(captured.out)
    # even without the progress bar, every evaluation is reported as it happens
    lines = [line for line in captured.err.splitlines() if "train loss" in line]
    assert [line.split()[2] for line in lines] == ["2/3:", "3/3:"] and "dev accuracy" in lines[0]
    assert trained["status"] == "completed"
    assert main(["eval", *common, "--adapter", str(tmp_path / "run" / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == trained["test"]["accuracy"]
    # an adapter of another task: its head does not fit, and the error says which task it was trained on
    other = ["--model", "shape:tiny-bert", "--task", "stsb", "--data-dir", str(data)]
    assert main(["eval", *other, "--adapter", str(tmp_path / "run" / "adapter")]) == 2
    assert "it was trained on glue/rte, not glue/stsb" in capsys.readouterr().err


def test_version_for_bug_reports(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("peftlab ")
    assert main(["version", "--json"]) == 0
    versions = json.loads(capsys.readouterr().out)
    assert set(versions) == {"python", "peftlab", "torch", "transformers", "peft", "optuna"}
    assert versions["torch"].startswith("2.") and versions["optuna"][0].isdigit()
