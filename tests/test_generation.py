"""Generative fine-tuning: tasks as prompt → response, response-only loss, scoring of generated text, training and
selecting by it, and `peftlab generate`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from peftlab import methods
from peftlab.backbone.tokenize import HashTokenizer
from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.train import TrainConfig, train
from peftlab.train.generation import Sampling
from peftlab.train.generative import final_number, normalise, score_texts
from peftlab.train.responses import ResponseEncoder
from peftlab.train.tasks import TaskDataError, get_task, load_user_responses, make_splits

DATA = "/work/shared/data"


def _data_dir() -> str:
    import os

    return os.environ.get("PEFTLAB_DATA_DIR", DATA)


# -- scoring ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("so the answer is 12.0.", "12"),
        ("first 3 then 4.5", "4.5"),
        ("no number here", ""),
        ("#### -7", "-7"),
    ],
)
def test_final_number(text: str, number: str) -> None:
    assert final_number(text) == number


def test_exact_and_number_scoring() -> None:
    assert normalise("  Yes.\nbecause ...") == "yes"
    assert score_texts("exact", ["Yes.", "no", ""], ["yes", "yes", ""]) == {"exact_match": pytest.approx(1 / 3)}
    # GSM8K: the final number decides, whatever the working; an empty generation never matches
    assert score_texts("number", ["3 + 4 = 7\n#### 7", "#### 8", ""], ["7", "7", ""]) == {
        "exact_match": pytest.approx(1 / 3)
    }


def test_rouge_uses_the_maintained_package() -> None:
    scores = score_texts("rouge", ["the cat sat on the mat"], ["the cat sat"])
    assert scores["rouge1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 3/6, R = 3/3
    assert set(scores) == {"rougeL", "rouge1", "rouge2"}


# -- tasks --------------------------------------------------------------------------------------------------------


def test_gsm8k_and_superglue_text_to_text() -> None:
    splits = make_splits("gsm8k", _data_dir(), k=5, dev_size=3)
    ex = splits.train[0]
    assert ex["prompt"].startswith("Question: ") and ex["prompt"].endswith("Answer:")
    assert "<<" not in ex["response"] and ex["reference"] == final_number(ex["response"]) != ""
    assert len(splits.test) == 1319  # GSM8K's test split is the score
    copa = make_splits("gen/copa", _data_dir(), dev_size=3)
    row = copa.train[0]
    assert row["prompt"].startswith("Given a premise, a question (cause/effect)")  # the survey's Appendix A
    assert row["response"] in row["prompt"]  # the plausible alternative's text
    cb = make_splits("gen/cb", _data_dir(), dev_size=3)
    assert {r["response"] for r in cb.train} == {"entailment", "contradiction", "neutral"}
    assert get_task("boolq").name == "superglue/boolq"  # the classification task keeps the bare name


# -- encoding -----------------------------------------------------------------------------------------------------


def _encoder(seq2seq: bool = False, max_length: int = 32, task: str = "gen/rte") -> ResponseEncoder:
    return ResponseEncoder(HashTokenizer(128), get_task(task), max_length, seq2seq)


def test_loss_only_on_the_response_with_eos() -> None:
    enc = _encoder()
    rows = [
        {"prompt": "a b c", "response": "yes", "reference": "yes"},
        {"prompt": "d", "response": "no no", "reference": "no no"},
    ]
    batch = enc(rows)
    prompt = enc.tok(["a b c"])["input_ids"][0]
    labels = batch["labels"][0].tolist()
    assert labels[: len(prompt)] == [-100] * len(prompt)  # the prompt teaches nothing
    assert labels[len(prompt) : len(prompt) + 2] == [*enc.tok(["yes"], add_special_tokens=False)["input_ids"][0], 2]
    assert batch["attention_mask"][0].tolist() == [1] * (len(prompt) + 2)  # right padding for training
    gen = enc.prompts(rows)
    assert gen["attention_mask"][1, 0] == 0 and gen["attention_mask"][1, -1] == 1  # left padding to generate
    t5 = _encoder(seq2seq=True)(rows)
    assert t5["labels"][1].tolist()[-1] == 2 and -100 not in t5["labels"][1].tolist()


def test_long_examples_are_cut_and_counted() -> None:
    enc = _encoder(max_length=10)
    long_prompt = " ".join(f"w{i}" for i in range(30))
    long_response = " ".join(f"r{i}" for i in range(30))
    rows = [
        {"prompt": long_prompt, "response": "yes", "reference": "yes"},
        {"prompt": "a", "response": long_response, "reference": long_response},
    ]
    batch = enc(rows)
    assert batch["input_ids"].shape[1] == 10
    assert batch["labels"][0].tolist()[-2:] == [*enc.tok(["yes"], add_special_tokens=False)["input_ids"][0], 2]
    assert enc.report_cuts() == {"prompt": 1, "response": 1, "seen": 2}


def test_chat_template_needed_for_messages() -> None:
    enc = _encoder()
    row = {"prompt": "hi", "response": "yo", "reference": "yo", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(PeftlabError, match="no chat template"):
        enc([row])


# -- user files ---------------------------------------------------------------------------------------------------


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_user_file_errors(tmp_path) -> None:
    ok = _write_jsonl(tmp_path / "ok.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(TaskDataError, match=r"missing column\(s\) \['prompt', 'response'\]"):
        load_user_responses(ok)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "a", "response": "  "}])
    with pytest.raises(TaskDataError, match="empty response"):
        load_user_responses(empty)
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TaskDataError, match="end with the assistant"):
        load_user_responses(chat, messages_column="messages")
    rows = load_user_responses(ok, "q", "a")
    assert rows == [{"prompt": "a", "response": "b", "reference": "b"}]


def _constant_task(tmp_path, n: int = 40) -> str:
    """Prompts of random words, every response "yes": a decoder learns it within a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "sea"]
    rows = []
    for _ in range(n):
        idx = torch.randint(0, len(words), (4,), generator=g).tolist()
        rows.append({"prompt": " ".join(words[i] for i in idx), "response": "yes"})
    return _write_jsonl(tmp_path / "constant.jsonl", rows)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
def test_training_learns_what_it_generates(shape: str, tmp_path) -> None:
    """Selected by the generated metric: the trained adapter writes the response; the record keeps samples."""
    config = TrainConfig(
        model=f"shape:{shape}", task="constant", train_file=_constant_task(tmp_path), prompt_column="prompt",
        response_column="response", dev_size=8, max_steps=40, eval_every=20, batch_size=8, lr=1e-2,
        select_by="metric", max_new_tokens=2, progress=False, output=str(tmp_path / "run"), warmup_ratio=0.0,
    )  # fmt: skip
    record = train(methods.get("lora", targets="all-linear"), config)
    assert record.best["metric"] == "exact_match"
    assert record.evaluations[-1]["exact_match"] == 1.0, record.samples
    assert record.test["exact_match"] == 1.0
    assert record.samples[0]["generated"] == "yes" and record.samples[0]["reference"] == "yes"
    assert record.evaluations[0]["loss"] > record.evaluations[-1]["loss"]  # dev loss, response tokens only
    saved = json.loads((tmp_path / "run" / "record.json").read_text())
    assert saved["samples"] and saved["cut"]["seen"] == 40


def test_select_by_loss_generates_once_at_the_end(tmp_path) -> None:
    config = TrainConfig(
        model="shape:tiny-llama", task="constant", train_file=_constant_task(tmp_path), prompt_column="prompt",
        response_column="response", dev_size=8, max_steps=6, eval_every=2, batch_size=8, max_new_tokens=2,
        progress=False,
    )  # fmt: skip
    record = train(methods.get("lora"), config)
    assert all("exact_match" not in e for e in record.evaluations)  # cheap evaluations: the dev loss only
    assert record.best["metric"] == "loss" and record.best["score"] == -min(e["loss"] for e in record.evaluations)
    assert "exact_match" in record.best["dev"] and "exact_match" in record.test
    quiet = train(methods.get("lora"), dataclasses.replace(config, final_dev_metrics=False))
    assert quiet.best["dev"] == {"loss": min(e["loss"] for e in quiet.evaluations)}  # no decoding of dev
    assert quiet.samples and "exact_match" in quiet.test  # a handful of samples, and the test split, still generate


def test_encoder_models_cannot_generate(tmp_path) -> None:
    with pytest.raises(PeftlabError, match="encoder, which cannot generate"):
        train(methods.get("lora"), TrainConfig(model="shape:tiny-bert", task="gen/rte", data_dir=_data_dir(), k=4))


# -- the command line ---------------------------------------------------------------------------------------------


def test_cli_train_then_generate(tmp_path, capsys) -> None:
    data = _constant_task(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--model", "shape:tiny-llama", "--task", "mine", "--train-file", data, "--response-column",
            "response", "--method", "lora", "--set", "targets=all-linear", "--lr", "1e-2", "--max-steps", "40",
            "--dev-size", "8", "--batch-size", "8", "--max-new-tokens", "2", "--output", str(out),
            "--no-progress", "--no-final-dev-metrics"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert list(json.loads((out / "record.json").read_text())["best"]["dev"]) == ["loss"]
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "sun moon cat dog"}, {"prompt": "sea"}])
    gen = ["generate", "--model", "shape:tiny-llama", "--adapter", str(out / "adapter"), "--max-new-tokens", "2"]
    assert main([*gen, "--input-file", prompts]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["generated"] for x in lines] == ["yes", "yes"]
    assert main([*gen, "--prompt", "red green", "--merge"]) == 0
    assert capsys.readouterr().out.strip() == "yes"  # merged LoRA writes what the unmerged one writes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "x", "--input-file", "f.jsonl"], "give one of --prompt TEXT or --input-file FILE"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--prompt", "x", "--sample", "--temperature", "0"], "sampling needs --temperature > 0"),
        (["--prompt", "x", "--merge"], "--merge needs an --adapter"),
        (["--prompt", "x", "--chat-template"], "no chat template"),
    ],
)
def test_generate_bad_input(args: list[str], message: str, capsys) -> None:
    assert main(["generate", "--model", "shape:tiny-llama", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_generate_never_overwrites(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    cmd = [sys.executable, "-m", "peftlab.cli", "generate", "--model", "shape:tiny-llama", "--prompt", "a", "--output"]
    done = subprocess.run([*cmd, str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "exists" in done.stderr and out.read_text() == "mine\n"


def test_generate_matches_model_generate() -> None:
    """peftlab.generate is transformers' generate on the tokenized prompt, nothing more."""
    import peftlab

    model = make_model("tiny-llama", "causal-lm")
    pm = peftlab.apply(model, methods.get("lora"))
    text = peftlab.generate(pm, "shape:tiny-llama", ["a b c"], Sampling(max_new_tokens=8), batch_size=1)[0]
    tok = HashTokenizer(model.config.vocab_size)
    ids = torch.tensor(tok(["a b c"])["input_ids"])
    out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      pad_token_id=0, eos_token_id=2)  # fmt: skip
    assert text == tok.decode(out[0, ids.shape[1] :].tolist()).strip()


# -- search and bench ---------------------------------------------------------------------------------------------


def test_search_on_a_generation_task(tmp_path, capsys) -> None:
    """Trials are chosen by dev loss; no credit below the base model's loss (the reference point's score)."""
    out = tmp_path / "search"
    argv = ["search", "--model", "shape:tiny-llama", "--task", "gsm8k", "--trials", "3", "--max-steps", "2", "--k", "8",
            "--dev-size", "4", "--batch-size", "4", "--max-length", "64", "--max-new-tokens", "2", "--sampler",
            "random", "--output", str(out), "--no-plots", "--no-progress", "--data-dir", _data_dir()]  # fmt: skip
    assert main(argv) == 0
    trials = json.loads((out / "results" / "trials.json").read_text())
    done = [t for t in trials if t["status"] == "completed"]
    assert done and all(t["score"] < 0 for t in done)  # minus the dev loss
    ref = json.loads((out / "results" / "pareto.json").read_text())["ref_point"][0]
    assert ref < 0 and all(t["score"] > ref - 0.05 for t in done)  # the untrained model's -loss, near every trial's


def test_bench_generative_batches() -> None:
    from peftlab.bench import padded_batch

    config = make_model("tiny-llama", "causal-lm").config
    batch = padded_batch(config, batch=3, seq=10, seed=0, response=4)
    assert batch["input_ids"].shape == (3, 14)
    answered = (batch["labels"] != -100).sum(1)
    assert answered.tolist() == [4, 4, 4]  # the loss is on each row's 4 response tokens only
    first = batch["labels"][0].tolist()
    assert first[:10] == [-100] * 10 and first[10:] == batch["input_ids"][0, 10:].tolist()
    t5 = padded_batch(make_model("tiny-t5", "seq2seq").config, batch=3, seq=10, seed=0, response=4)
    assert t5["labels"].shape == (3, 4) and t5["input_ids"].shape == (3, 10)


def test_gradient_checkpointing_on_a_decoder_changes_nothing(tmp_path) -> None:
    """Recomputing each block in the backward pass saves memory, not results (dropout off)."""
    data = _constant_task(tmp_path)

    def run(checkpointing: bool) -> list[float]:
        config = TrainConfig(
            model="shape:tiny-llama", task="c", train_file=data, response_column="response", dev_size=8, max_steps=4,
            eval_every=2, batch_size=8, dropout=0.0, gradient_checkpointing=checkpointing, progress=False, lr=1e-2,
        )  # fmt: skip
        return [e["loss"] for e in train(methods.get("lora", targets="all-linear"), config).evaluations]

    assert run(True) == pytest.approx(run(False), rel=1e-5)


def test_packing_lays_examples_end_to_end() -> None:
    enc = _encoder(max_length=12)
    rows = [{"prompt": p, "response": "yes", "reference": "yes"} for p in ("a b c d e", "f", "g h", "i j k")]
    batch, tokens = enc.pack(rows)
    lengths = sorted((len(e["input_ids"]) for e in enc._encoded(rows)), reverse=True)
    assert tokens == sum(lengths) and batch["input_ids"].shape[1] <= 12
    assert batch["input_ids"].shape[0] < len(rows)  # fewer rows than examples
    positions = batch["position_ids"][0].tolist()
    assert positions[: lengths[0]] == list(range(lengths[0])) and positions[lengths[0]] == 0  # restarts per example
    assert (batch["labels"] != -100).sum() == (enc(rows)["labels"][:, 1:] != -100).sum()  # the same response tokens
    with pytest.raises(PeftlabError, match="packing is for decoders"):
        _encoder(seq2seq=True).pack(rows)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gpt2"])
def test_packed_batches_train_as_padded_ones(shape: str, tmp_path) -> None:
    """transformers keeps packed examples apart (positions restart, no mask): the same losses, step by step."""
    data = _constant_task(tmp_path)

    def run(packing: bool) -> tuple[list[float], int]:
        config = TrainConfig(
            model=f"shape:{shape}", task="c", train_file=data, response_column="response", dev_size=8, max_steps=4,
            eval_every=2, batch_size=8, dropout=0.0, packing=packing, progress=False, lr=1e-2, max_length=64,
        )  # fmt: skip
        record = train(methods.get("lora", targets="all-linear"), config)
        return [e["loss"] for e in record.evaluations], record.train_tokens

    packed, padded = run(True), run(False)
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    assert packed[1] == padded[1]  # real tokens counted, not padding


@pytest.mark.parametrize(
    ("method", "task", "message"),
    [("prefix", "c", "under prefix"), ("unipelt", "c", "under prefix, gates"), ("lora", "sst2", "not one")],
)
def test_packing_refuses_what_it_cannot_keep_apart(method: str, task: str, message: str, tmp_path) -> None:
    files = {"train_file": _constant_task(tmp_path), "response_column": "response"} if task == "c" else {}
    config = TrainConfig(
        model="shape:tiny-llama", task=task, packing=True, max_steps=1, progress=False, data_dir=_data_dir(), k=8,
        **files,
    )  # fmt: skip
    with pytest.raises(PeftlabError, match=message):
        train(methods.get(method), config)


@pytest.mark.parametrize(
    ("rows", "flags", "message"),
    [
        ([{"question": "a", "response": "b"}] * 6, ["--response-column", "response"], "missing column(s) ['prompt']"),
        ([{"prompt": "a", "response": ""}] * 6, ["--response-column", "response"], "empty response"),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 6,
            ["--messages-column", "messages"],
            "no chat template",
        ),
        ([{"prompt": "a", "response": "b"}] * 6, ["--response-column", "response", "--select-by", "x"], None),
    ],
    ids=["missing-column", "empty-response", "no-chat-template", "bad-select-by"],
)
def test_generative_bad_input_is_one_line(rows, flags, message, tmp_path, capsys) -> None:
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    argv = ["train", "--model", "shape:tiny-llama", "--task", "t", "--train-file", data, "--method", "lora",
            "--max-steps", "1", "--output", str(tmp_path / "run"), "--no-progress", *flags]  # fmt: skip
    if message is None:  # argparse refuses a choice outside the list before anything runs
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "run").exists()


def test_generative_file_not_utf8(tmp_path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "caf\xe9", "response": "b"}\n' * 6)
    argv = ["train", "--model", "shape:tiny-llama", "--task", "t", "--train-file", str(data), "--response-column",
            "response", "--method", "lora", "--max-steps", "1", "--no-progress", "--output",
            str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "UTF-8" in err
