"""Training: real task data, budgets, resuming, divergence, early stopping and data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import keyword_task
from safetensors.torch import load_file

from peftlab import methods
from peftlab.errors import PeftlabError
from peftlab.modules.bottleneck import ConsistencyLoss, consistency_loss
from peftlab.train import TrainConfig, batch_loss, train

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")


def _config(tmp_path: Path | None = None, **kw) -> TrainConfig:
    base = {
        "model": "shape:tiny-bert",
        "task": "sst2",
        "data_dir": str(DATA),
        "k": 64,
        "dev_size": 32,
        "batch_size": 8,
        "max_length": 32,
        "progress": False,
        "eval_batch_size": 64,
    }
    if tmp_path is not None:
        base["output"] = str(tmp_path)
    return TrainConfig(**(base | kw))


def test_loss_goes_down_on_real_data() -> None:
    losses: list[float] = []
    record = train(
        methods.lora(r=4), _config(max_steps=40, lr=5e-3, eval_every=40), on_step=lambda step, loss: losses.append(loss)
    )
    assert record.status == "completed" and record.steps == 40
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8
    assert set(record.test) == {"accuracy"}
    assert record.tokens_per_s > 0 and record.peak_memory_bytes > 0
    assert record.device == "cpu"  # what ran it, so records from several machines can be told apart
    assert record.versions["torch"] == torch.__version__ and set(record.versions) == {
        "python",
        "torch",
        "transformers",
        "peft",
        "optuna",
        "peftlab",
    }


def test_a_run_that_cannot_learn_stops_after_its_first_evaluation(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=40, eval_every=8, lr=1e-9, stop_hopeless=True, score_test=False)
    record = train(methods.lora(r=4), config)
    assert record.status == "hopeless" and record.steps == 8 and len(record.evaluations) == 1
    assert record.message.startswith("stopped at step 8: dev accuracy")
    assert "constant prediction's" in record.message and "label prior's" in record.message
    assert record.test is None  # score_test off: the test split is left alone
    assert (tmp_path / "adapter").is_dir()
    assert json.loads((tmp_path / "record.json").read_text())["status"] == "hopeless"


def test_a_run_that_learns_is_not_stopped(tmp_path: Path) -> None:
    config = TrainConfig(
        model="shape:tiny-bert",
        task="keyword",
        train_file=str(keyword_task(tmp_path)),
        dev_size=32,
        batch_size=8,
        max_length=16,
        max_steps=32,
        eval_every=16,
        lr=1e-2,
        warmup_ratio=0.0,
        dropout=0.0,
        progress=False,
        stop_hopeless=True,
    )
    record = train(methods.full(), config)
    assert record.status == "completed" and record.steps == 32 and record.message is None
    assert record.evaluations[0]["accuracy"] > 0.6 and record.test is not None


def test_budgets_in_steps_epochs_and_fractions() -> None:
    # 64 examples / batch 8 = 8 steps per epoch.
    assert train(methods.bitfit(), _config(epochs=1, eval_every=100)).total_steps == 8
    assert train(methods.bitfit(), _config(epochs=2, fraction=0.25, eval_every=100)).total_steps == 4
    assert train(methods.bitfit(), _config(max_steps=3)).total_steps == 3
    with pytest.raises(PeftlabError, match="give one budget"):
        train(methods.bitfit(), _config(max_steps=3, fraction=0.5))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr": -1.0}, "lr must be a number > 0"),
        ({"lr": float("nan")}, "lr must be a number > 0"),
        ({"eval_every": 0}, "eval_every must be >= 1"),
        ({"patience": 0}, "patience must be >= 1"),
        ({"warmup_ratio": 1.0}, "warmup_ratio must be in"),
        ({"weight_decay": -0.1}, "weight_decay must be"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(setting: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(PeftlabError, match=message):
        train(methods.lora(), _config(tmp_path / "run", max_steps=1, **setting))
    assert not (tmp_path / "run").exists()


def test_group_by_length_keeps_every_example_and_pads_less() -> None:
    from peftlab.train import batches

    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    plain, grouped = batches(1000, 16, 0, 0), batches(1000, 16, 0, 0, lengths)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == batches(1000, 16, 0, 0, lengths) and grouped != batches(1000, 16, 0, 1, lengths)

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    spec = methods.adamix()  # random expert routing: the resumed run must restore the RNG too
    cfg = {"max_steps": 9, "eval_every": 3, "lr": 1e-2, "group_by_length": True}
    full = train(spec, _config(tmp_path / "full", **cfg))

    def interrupt(step: int, loss: float) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(methods.adamix(), _config(tmp_path / "cut", **cfg), on_step=interrupt)
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").is_file()
    resumed = train(methods.adamix(), _config(tmp_path / "cut", **cfg))
    assert resumed.steps == full.steps == 9
    assert resumed.test == full.test
    assert [e["loss"] for e in resumed.evaluations] == pytest.approx([e["loss"] for e in full.evaluations])
    a = load_file(tmp_path / "full" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not (tmp_path / "cut" / "checkpoint").exists()


def test_a_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    train(methods.lora(), _config(tmp_path, max_steps=2))
    before = (tmp_path / "record.json").read_text()
    with pytest.raises(PeftlabError, match="already holds a finished run"):
        train(methods.lora(), _config(tmp_path, max_steps=2))
    assert (tmp_path / "record.json").read_text() == before


def test_divergence_is_recorded_not_raised(tmp_path: Path) -> None:
    record = train(methods.full(), _config(tmp_path, max_steps=20, lr=1e12, max_grad_norm=0.0))
    assert record.status == "diverged" and "non-finite" in record.message
    saved = json.loads((tmp_path / "record.json").read_text())
    assert saved["status"] == "diverged"


def test_early_stopping_restores_the_best_state() -> None:
    record = train(methods.lora(), _config(max_steps=40, eval_every=2, patience=2, lr=1e-5))
    assert record.status in ("early-stopped", "completed")
    best = max(e["accuracy"] for e in record.evaluations)
    assert record.best["score"] == best
    if record.status == "early-stopped":
        assert record.steps < 40


@pytest.mark.parametrize("method", ["lora", "prefix", "pfeiffer"])
@pytest.mark.parametrize("model", ["shape:tiny-bert", "shape:tiny-llama"])
def test_gradient_checkpointing_trains_the_same_adapter(model: str, method: str, tmp_path: Path) -> None:
    """Activations recomputed in the backward pass (the adapters' hooks included) give the same training."""
    from peftlab.backbone.zoo import load_model

    cfg = {"model": model, "max_steps": 3, "lr": 1e-2, "dropout": 0.0}
    runs = {}
    for name, checkpointing in (("plain", False), ("ckpt", True)):
        backbone = load_model(model, head="seq-cls")
        # A linear inside the first block: checkpointing runs it again in the backward pass.
        first = next(m for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n)
        calls = [0]
        first.register_forward_hook(lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
        train(
            methods.get(method), _config(tmp_path / name, gradient_checkpointing=checkpointing, **cfg), model=backbone
        )
        runs[name] = (calls[0], load_file(tmp_path / name / "adapter" / "adapter.safetensors"))
    (plain_calls, a), (ckpt_calls, b) = runs["plain"], runs["ckpt"]
    assert ckpt_calls > plain_calls
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("model", "task"), [("shape:tiny-t5", "rte"), ("shape:tiny-llama", "stsb")])
def test_text_to_text_and_decoder_classifiers(model: str, task: str) -> None:
    record = train(methods.lora(), _config(model=model, task=task, max_steps=4))
    assert record.status == "completed"
    assert set(record.test) == ({"accuracy"} if task == "rte" else {"pearson", "spearman"})


def test_two_process_data_parallel_matches_one_process(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes on gloo; dropout off, so both runs do the same arithmetic."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from peftlab import methods\n"
        "from peftlab.train import TrainConfig, train\n"
        f"train(methods.lora(r=4), TrainConfig(model='shape:tiny-bert', task='sst2', data_dir={str(DATA)!r}, k=64,\n"
        "      dev_size=32, batch_size=8, max_length=32, progress=False, max_steps=6, eval_every=3, lr=1e-2,\n"
        "      dropout=0.0, output=sys.argv[1]))\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=300)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            str(script),
            str(tmp_path / "two"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    one = json.loads((tmp_path / "one" / "record.json").read_text())
    two = json.loads((tmp_path / "two" / "record.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [e["loss"] for e in two["evaluations"]] == pytest.approx([e["loss"] for e in one["evaluations"]], rel=1e-4)
    a = load_file(tmp_path / "one" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_user_csv_and_jsonl_data(tmp_path: Path) -> None:
    rows = [("a great film", "pos"), ("terrible acting", "neg"), ("wonderful and moving", "pos"), ("dull", "neg")] * 8
    train_csv = tmp_path / "train.csv"
    train_csv.write_text("review,sentiment\n" + "".join(f"{t},{y}\n" for t, y in rows))
    test_jsonl = tmp_path / "test.jsonl"
    test_jsonl.write_text("".join(json.dumps({"review": t, "sentiment": y}) + "\n" for t, y in rows[:4]))
    record = train(
        methods.lora(),
        TrainConfig(
            model="shape:tiny-bert",
            task="reviews",
            train_file=str(train_csv),
            test_file=str(test_jsonl),
            text_column="review",
            label_column="sentiment",
            label_names=["neg", "pos"],
            max_steps=3,
            progress=False,
        ),
    )
    assert record.status == "completed"
    assert set(record.test) == {"accuracy", "f1"}
    with pytest.raises(PeftlabError, match="missing column"):
        train(
            methods.lora(),
            TrainConfig(
                model="shape:tiny-bert",
                task="x",
                train_file=str(train_csv),
                text_column="text",
                label_column="sentiment",
                max_steps=1,
            ),
        )


def test_consistency_loss_is_the_symmetrised_kl() -> None:
    from scipy.special import rel_entr, softmax

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    p, q = softmax(a.numpy(), -1), softmax(b.numpy(), -1)
    expected = (rel_entr(p, q).sum(-1) + rel_entr(q, p).sum(-1)).mean() / 2
    assert consistency_loss(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert consistency_loss(a, a).item() == pytest.approx(0, abs=1e-7)
    assert consistency_loss(a[:, :1], b[:, :1]).item() == pytest.approx(((a[:, 0] - b[:, 0]) ** 2).mean().item())
    tokens_a, tokens_b = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, -100, -100]])  # text-to-text: only labelled tokens
    kept = labels != -100
    assert consistency_loss(tokens_a, tokens_b, labels).item() == pytest.approx(
        consistency_loss(tokens_a[kept], tokens_b[kept]).item(), rel=1e-6
    )


def test_adamix_trains_with_two_routed_passes_and_the_consistency_term() -> None:
    from peftlab.backbone.zoo import load_model
    from peftlab.core.peft_model import apply

    assert train(methods.adamix(), _config(max_steps=2)).config["consistency"] == 1.0  # on by default for AdaMix
    assert train(methods.lora(), _config(max_steps=2)).config["consistency"] == 0.0
    assert train(methods.adamix(), _config(max_steps=2, consistency=0)).config["consistency"] == 0.0
    pm = apply(load_model("shape:tiny-bert", head="seq-cls", seed=0), methods.adamix())
    pm.train()
    batch = {
        "input_ids": torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(1)),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    torch.manual_seed(5)
    first, second = pm(**batch), pm(**batch)  # each pass draws its own experts (and dropout masks)
    assert not torch.allclose(first.logits, second.logits)
    expected = (first.loss + second.loss) / 2 + 0.5 * consistency_loss(first.logits, second.logits)
    torch.manual_seed(5)
    assert batch_loss(pm, batch, ConsistencyLoss(), 0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    torch.manual_seed(5)
    assert batch_loss(pm, batch, ConsistencyLoss(), 0.0).item() == pytest.approx(first.loss.item(), rel=1e-6)


def test_a_negative_consistency_weight_is_refused() -> None:
    with pytest.raises(PeftlabError, match="consistency must be a number >= 0"):
        train(methods.adamix(), _config(max_steps=2, consistency=-1.0))


def test_a_one_evaluation_run_is_checked_at_half_its_budget(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=16, eval_every=16, lr=1e-9, stop_hopeless=True, score_test=False)
    record = train(methods.lora(r=4), config)
    assert record.status == "hopeless" and record.steps == 8 and len(record.evaluations) == 1
    assert record.message.startswith("stopped at step 8: dev accuracy")
    # Without the stop, the same run evaluates once, at its end.
    full = train(methods.lora(r=4), _config(tmp_path / "off", max_steps=16, eval_every=16, lr=1e-9, score_test=False))
    assert full.status == "completed" and full.steps == 16 and [e["step"] for e in full.evaluations] == [16]
