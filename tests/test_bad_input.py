"""Hostile input: every user mistake is one ``error:`` line with exit status 2, and nothing the user had changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from peftlab import methods
from peftlab.backbone.zoo import load_model
from peftlab.cli import main
from peftlab.core.peft_model import apply
from peftlab.errors import PeftlabError
from peftlab.formats.loading import load
from peftlab.train import TrainConfig, train

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
TINY = ["--model", "shape:tiny-bert"]


def one_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in this process (an exception other than a one-line error fails the test) and return its one
    error line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SPECS = {
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
    "deep": b"[" * 5000 + b"]" * 5000,
    "kind-object": json.dumps({"layers": {"*": {"q": {"kind": {"a": 1}}}}}).encode(),
    "kind-list": json.dumps({"layers": {"*": {"q": {"kind": ["lora"]}}}}).encode(),
    "model-list": json.dumps({"peftlab_spec": 1, "model": [1, 2]}).encode(),
    "model-string": json.dumps({"peftlab_spec": 1, "model": "x"}).encode(),
    "layers-list": json.dumps({"layers": [1]}).encode(),
    "huge-number": json.dumps({"layers": {"*": {"q": {"kind": "lora", "r": 10**400}}}}).encode(),
    "latin-1": '{"method": "caf\xe9"}'.encode("latin-1"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_broken_spec_file_is_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.json"
    path.write_bytes(SPECS[name])
    line = one_error(["show", *TINY, "--spec", str(path)], capsys)
    assert "spec" in line
    assert path.read_bytes() == SPECS[name]


def test_train_and_search_read_spec_and_space_files_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "file.json"
    path.write_bytes(SPECS["binary"])
    common = [*TINY, "--task", "sst2", "--data-dir", str(DATA), "--output", str(tmp_path / "out")]
    assert "not UTF-8" in one_error(["train", *common, "--spec", str(path)], capsys)
    assert "not UTF-8" in one_error(["search", *common, "--space", str(path)], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["binary", "deep", "latin-1"])
def test_a_broken_space_file_is_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "space.json"
    path.write_bytes(SPECS[name])
    line = one_error(["space", *TINY, "--space", str(path)], capsys)
    assert "space file" in line


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    apply(load_model("shape:tiny-bert"), methods.lora(r=2)).save(folder)
    return folder


def _broken_copy(saved: Path, tmp_path: Path, breakage: str) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(parents=True)
    for p in saved.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    weights, meta = folder / "adapter.safetensors", folder / "peftlab_adapter.json"
    data = weights.read_bytes()
    if breakage == "empty-weights":
        weights.write_bytes(b"")
    elif breakage == "truncated-weights":
        weights.write_bytes(data[: len(data) // 2])
    elif breakage == "header-weights":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    elif breakage == "binary-meta":
        meta.write_bytes(b"\x00\xff\xfe\x80" * 10)
    elif breakage == "pickle-only":
        weights.unlink()
        (folder / "adapter.bin").write_bytes(b"\x80\x04K\x01.")
    elif breakage == "bin-only":  # a folder with nothing but pickled weights
        weights.unlink()
        meta.unlink()
        (folder / "adapter.bin").write_bytes(b"\x80\x04K\x01.")
    elif breakage == "flipped-bytes":  # the header intact, a value's bytes changed: only a checksum sees it
        weights.write_bytes(data[:-4] + bytes(b ^ 0x55 for b in data[-4:]))
    elif breakage == "non-finite":
        weights.write_bytes(data[:-4] + b"\x00\x00\xc0\x7f")  # the last float32 becomes NaN
    return folder


BREAKAGES = {
    "empty-weights": "adapter.safetensors",
    "truncated-weights": "adapter.safetensors",
    "header-weights": "adapter.safetensors",
    "binary-meta": "peftlab_adapter.json",
    "pickle-only": "never unpickles",
    "bin-only": "never unpickles",
    "flipped-bytes": "checksum",
    "non-finite": "checksum",
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_adapter_folder_is_refused_with_its_file_named(
    breakage: str, saved_adapter: Path, tmp_path: Path
) -> None:
    folder = _broken_copy(saved_adapter, tmp_path, breakage)
    before = snapshot(folder)
    with pytest.raises(PeftlabError, match=BREAKAGES[breakage]):
        load(load_model("shape:tiny-bert"), folder)
    assert snapshot(folder) == before


def test_checks_can_be_skipped_and_non_finite_values_allowed(saved_adapter: Path, tmp_path: Path) -> None:
    flipped = _broken_copy(saved_adapter, tmp_path / "a", "flipped-bytes")
    load(load_model("shape:tiny-bert"), flipped, check=False)
    nan = _broken_copy(saved_adapter, tmp_path / "b", "non-finite")
    with pytest.raises(PeftlabError, match="not finite"):
        load(load_model("shape:tiny-bert"), nan, check=False)
    load(load_model("shape:tiny-bert"), nan, check=False, allow_non_finite=True)


def test_a_broken_adapter_is_one_line_in_eval(
    saved_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _broken_copy(saved_adapter, tmp_path, "truncated-weights")
    line = one_error(["eval", *TINY, "--task", "rte", "--data-dir", str(DATA), "--adapter", str(folder)], capsys)
    assert "adapter.safetensors" in line


DATA_FILES = {
    "latin-1.csv": ("text,label\ncaf\xe9 au lait,1\n".encode("latin-1"), "not UTF-8"),
    "binary.csv": (b"\x00\xff\x10\x80" * 64, "not UTF-8"),
    "negative.csv": (b"text,label\n" + b"".join(b"a b c,%d\n" % (i % 2) for i in range(20)) + b"x,-1\n", "-1"),
    "nan.csv": (b"text,label\n" + b"".join(b"a b c,%d.5\n" % (i % 2) for i in range(20)) + b"x,nan\n", "finite"),
    "huge.csv": (b"text,label\n" + b"".join(b"a b c,%d\n" % (i % 2) for i in range(20)) + b"x,99999999999\n", "class"),
    "one-row.csv": (b"text,label\nhello,1\n", "dev split"),
    "deep.jsonl": (b'{"text": "a", "label": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", "nested too deeply"),
}


@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_a_broken_data_file_is_one_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, message = DATA_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    out = tmp_path / "run"
    argv = ["train", *TINY, "--task", "mine", "--train-file", str(path), "--method", "lora", "--max-steps", "1"]
    line = one_error([*argv, "--output", str(out), "--no-progress"], capsys)
    assert message in line and name in line
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"w{i} x,{i % 2}\n" for i in range(20)))
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    argv = ["train", *TINY, "--task", "mine", "--train-file", str(path), "--method", "lora", "--max-steps", "1"]
    line = one_error([*argv, "--output", str(out), "--no-progress"], capsys)
    assert "is a file" in line and out.read_text() == "mine"


def test_eval_max_length_zero_is_one_line(saved_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", *TINY, "--task", "rte", "--data-dir", str(DATA), "--adapter", str(saved_adapter)]
    assert "max-length" in one_error([*argv, "--max-length", "0"], capsys)


def test_a_model_folder_with_pickled_weights_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = load_model("shape:tiny-bert")
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    weights = tmp_path / "model" / "model.safetensors"
    torch.save(model.state_dict(), tmp_path / "model" / "pytorch_model.bin")
    weights.unlink()
    argv = ["eval", "--model", str(tmp_path / "model"), "--task", "rte", "--data-dir", str(DATA)]
    line = one_error([*argv, "--adapter", str(tmp_path)], capsys)
    assert "never unpickles" in line


def _stop_at(step: int):
    def on_step(done: int, loss: float) -> None:
        if done == step:
            raise KeyboardInterrupt

    return on_step


def test_a_checkpoint_of_another_method_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"w{i} x,{i % 2}\n" for i in range(40)))
    out = tmp_path / "run"
    config = TrainConfig(
        model="shape:tiny-bert",
        task="mine",
        train_file=str(path),
        output=str(out),
        progress=False,
        max_steps=4,
        eval_every=2,
    )
    with pytest.raises(KeyboardInterrupt):  # stopped after its first checkpoint (step 2)
        train(methods.lora(), config, on_step=_stop_at(3))
    before = snapshot(out)
    argv = ["train", *TINY, "--task", "mine", "--train-file", str(path), "--output", str(out), "--no-progress"]
    line = one_error([*argv, "--max-steps", "4", "--eval-every", "2", "--method", "houlsby"], capsys)
    assert "another run" in line and "method: 'lora' → 'houlsby'" in line
    assert snapshot(out) == before


def _interrupt_when(cmd: list[str], ready) -> subprocess.CompletedProcess:
    """Start ``cmd``, send it SIGINT (Ctrl-C) once ``ready()`` is true; its exit code and output."""
    # a shell's background jobs start with SIGINT ignored, and Python then installs no Ctrl-C handler: restore it
    default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_during_train_is_one_line_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\n" + "".join(f"w{i} x,{i % 2}\n" for i in range(40)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "peftlab.cli", "train", *TINY, "--task", "mine", "--train-file", str(path)]
    cmd += ["--method", "lora", "--max-steps", "100000", "--eval-every", "2", "--output", str(out), "--no-progress"]
    done = _interrupt_when(cmd, lambda: (out / "checkpoint" / "state.pt").is_file())
    assert done.returncode == 130 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: interrupted; the checkpoint")
    assert (out / "checkpoint" / "state.pt").is_file()


def test_ctrl_c_during_search_is_one_line_and_the_same_command_resumes(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    cmd = [sys.executable, "-m", "peftlab.cli", "search", *TINY, "--task", "sst2", "--data-dir", str(DATA)]
    cmd += ["--k", "32", "--dev-size", "16", "--batch-size", "8", "--max-length", "24", "--no-plots"]
    cmd += ["--sampler", "random", "--trials", "3", "--max-steps", "6", "--output", str(tmp_path), "--workers", "2"]

    def one_finished() -> bool:
        try:
            trials = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{db}").get_trials()
        except Exception:  # the file or its tables may not exist yet
            return False
        return any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    done = _interrupt_when(cmd, one_finished)
    assert done.returncode == 130 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith("error: interrupted; finished trials are kept")
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode == 0
    study = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{db}")
    # two workers may each start the last trial at once: a search holds at least --trials finished trials
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 3
