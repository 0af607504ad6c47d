"""``peftlab bench``: token counting, statistics, peft equivalents, fresh-process isolation, the command end
to end with --compare-peft, and one-line errors. One benchmark run (7 worker processes) serves several tests."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab import bench, methods
from peftlab.bench import profile, survey
from peftlab.bench.batch import measured_batches
from peftlab.cli import main
from peftlab.formats import interop

MB = 2**20
DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_count_tokens_counts_non_padding_only() -> None:
    config = peftlab.load_model("shape:tiny-bert", meta=True).config
    batch = bench.padded_batch(config, batch=6, seq=20, seed=3)
    mask, ids = batch["attention_mask"], batch["input_ids"]
    lengths = mask.sum(1)
    assert torch.equal(mask, (torch.arange(20) < lengths[:, None]).long())  # right-padded
    assert lengths.max() == 20 and (lengths < 20).any()  # full width, and some padding to leave out
    assert (ids[mask == 0] == config.pad_token_id).all() and (ids[mask == 1] != config.pad_token_id).all()
    assert bench.count_tokens(batch) == int(lengths.sum()) < mask.numel()
    assert bench.count_tokens({"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}) == 4


def test_summarize_gives_median_and_quartiles_of_known_numbers() -> None:
    assert bench.summarize([9, 1, 8, 2, 7, 3, 6, 4, 5]) == {
        "median": 5,
        "q25": 3,
        "q75": 7,
        "iqr": 4,
        "min": 1,
        "max": 9,
        "n": 9,
    }
    s = bench.summarize([10.0, 20.0, 30.0, 40.0])
    assert (s["q25"], s["median"], s["q75"], s["iqr"]) == (17.5, 25.0, 32.5, 15.0)
    assert bench.summarize([4.0]) == {"median": 4.0, "q25": 4.0, "q75": 4.0, "iqr": 0.0, "min": 4.0, "max": 4.0, "n": 1}


@pytest.mark.parametrize(
    "method", ["lora", "ia3", "prefix", "prompt", "ln", "vera", "fourierft", "loha", "lokr", "oft", "boft", "hra"]
)
def test_peft_equivalent_trains_the_same_parameters(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import get_peft_config, get_peft_model
    from peft.tuners.boft import layer as boft_layer

    # Without its CUDA extension peft's BOFT runs one butterfly factor whatever the config says; a torch stand-in
    # for the extension's block diagonal lets it build the preset's two.
    blocks = type(
        "TorchBlockDiag", (), {"forward": staticmethod(lambda b: [torch.stack([torch.block_diag(*f) for f in b])])}
    )
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", blocks())

    pm = peftlab.apply(peftlab.load_model("shape:tiny-bert", head="seq-cls", meta=True), methods.get(method))
    config, note = interop.peft_equivalent(pm)
    assert note is None and config["task_type"] == "SEQ_CLS"
    pp = get_peft_model(peftlab.load_model("shape:tiny-bert", head="seq-cls"), get_peft_config(dict(config)))
    assert sum(p.numel() for p in pp.parameters() if p.requires_grad) == pm.counts().trainable_params
    if method == "ia3":  # exact module names: the attention output is not an FFN output
        assert "bert.encoder.layer.0.attention.output.dense" not in config["target_modules"]
        assert config["feedforward_modules"] == [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]
    if method == "ln":
        assert len(config["target_modules"]) == 5  # the embedding norm and two per layer


@pytest.mark.parametrize("method", ["full", "head", "pfeiffer", "unipelt"])
def test_methods_peft_lacks_have_no_equivalent(method: str) -> None:
    pm = peftlab.apply(peftlab.load_model("shape:tiny-bert", head="seq-cls", meta=True), methods.get(method))
    config, note = interop.peft_equivalent(pm)
    assert config is None and "no equivalent" in note


def test_s4_is_sized_for_the_benchmarked_model() -> None:
    """s4 needs the model's depth and dims: bench plans and measures it like any preset."""
    config = bench.BenchConfig(model="shape:minilm", methods=["s4"], output="unused")
    config.check()
    _, plans = bench.plan(config)
    expected = (
        peftlab.apply(
            peftlab.load_model("shape:minilm", head="seq-cls", meta=True), methods.for_model("s4", "shape:minilm")
        )
        .counts()
        .to_dict()
    )
    assert plans["s4"].counts == expected and expected["trainable_params"] > 0
    train = next(j for j in plans["s4"].jobs if j.kind == "train")
    result = bench.measure(replace(train, batch=2, seq=16, repeats=1, warmup=0))
    assert result["step_s"] and all(t > 0 for t in result["step_s"])


@pytest.mark.real
@pytest.mark.skipif(not (DATA / "glue" / "RTE").is_dir(), reason=f"no GLUE data under {DATA}")
def test_score_is_the_test_metric_of_a_short_training_run() -> None:
    job = bench.Job(
        kind="score",
        impl="peftlab",
        method="lora",
        spec=methods.get("lora").to_dict(),
        model="shape:tiny-bert",
        head="seq-cls",
        batch=8,
        seq=64,
        repeats=1,
        warmup=0,
        threads=1,
        device="cpu",
        dtype="fp32",
        seed=0,
        task="rte",
        data_dir=str(DATA),
        score_steps=2,
    )
    result = bench.measure(job)
    assert (result["status"], result["steps"], result["metric"]) == ("completed", 2, "accuracy")
    assert 0 <= result["score"] <= 1


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple:
    """One run: the floor, head and lora, with peft's LoRA (full left out); a large batch so that training clearly needs
    more memory."""
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "bench",
        "--model",
        "shape:tiny-bert",
        "--methods",
        "head,lora",
        "--no-full",
        "--compare-peft",
        "--output",
        str(out),
        "--batch",
        "256",
        "--seq",
        "64",
        "--repeats",
        "2",
        "--warmup",
        "1",
    ]
    assert main(argv) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_cli_writes_markdown_csv_json_and_plot(run) -> None:
    out, report = run
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "bench.md").read_text()
    assert report["command"] in md and "| lora |" in md and "| lora (peft) |" in md and "| head |" in md
    assert "| floor |" in md and "## Cost model" in md and "--no-full" in report["command"]
    assert "torch: " in md and "## Legend" in md
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [(r["method"], r["impl"]) for r in rows] == [
        ("floor", "peftlab"),
        ("head", "peftlab"),
        ("lora", "peftlab"),
        ("lora", "peft"),
    ]
    by = {(r["method"], r["impl"]): r for r in report["rows"]}
    lab = by[("lora", "peftlab")]
    assert lab["trainable_params"] == report["methods"]["lora"]["counts"]["trainable_params"] == 2114
    assert lab["measured_trainable_params"] == 2114
    assert lab["n_train"] == lab["n_infer"] == 2
    assert lab["train_tok_s"] > 0 and lab["infer_tok_s"] > 0 and lab["merged_tok_s"] > 0
    assert lab["step_over_forward"] > 1 and lab["increase_mb"] > 0
    assert by[("head", "peftlab")]["merged_tok_s"] is None  # nothing to merge
    setup = report["setup"]
    assert setup["tokens"] == sum(setup["lengths"]) < setup["padded_tokens"] == 256 * 64
    train = next(r for r in report["runs"] if r["job"]["kind"] == "train" and r["job"]["method"] == "lora")
    assert lab["train_tok_s"] != pytest.approx(setup["padded_tokens"] / train["step_s"][0])  # padding not counted
    assert all(r["tokens"] == setup["tokens"] for r in report["runs"])


def test_compare_peft_reports_ratios(run) -> None:
    _, report = run
    ratio = report["ratios"]["lora"]
    assert ratio["trainable_peftlab"] == ratio["trainable_peft"]
    for col in ("train_tok_s", "infer_tok_s", "peak_mb", "increase_mb"):
        assert 0.2 < ratio[col] < 5
    lo, hi = ratio["train_tok_s_range"]
    assert lo <= ratio["train_tok_s"] <= hi
    assert report["methods"]["lora"]["peft_config"]["target_modules"][0].endswith("attention.self.query")
    assert list(report["ratios"]) == ["lora"]  # head has no peft equivalent


def test_every_measurement_is_its_own_process(run) -> None:
    _, report = run
    runs = report["runs"]
    assert len(runs) == 9  # floor, head: train, infer; lora: train, infer, merged; peft lora: train, infer
    pids = [r["pid"] for r in runs]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    # Peak memory is per process: an inference right after a training process does not inherit its peak (a
    # reused process would report at least the training peak). Where both peaks are the model-loading spike they
    # can be equal to the byte, so one pair must be strictly lower and none higher.
    pairs = [(b, a) for b, a in itertools.pairwise(runs) if b["job"]["kind"] == "train" and a["job"]["kind"] != "train"]
    for before, after in pairs:
        assert before["peak_bytes"] - before["loaded_bytes"] > 32 * MB
        assert after["peak_bytes"] <= before["peak_bytes"]
    assert any(after["peak_bytes"] < before["peak_bytes"] for before, after in pairs)


def test_the_floor_is_measured_first_and_every_row_is_set_against_it(run) -> None:
    """The floor trains nothing and computes no weight gradient, yet its backward runs; every row gets its step over
    the floor's, the cost model's prediction of it and measured over predicted (no timing asserted)."""
    _, report = run
    assert next(iter(report["methods"])) == "floor" and report["methods"]["floor"]["spec"] is None
    floor_train = next(r for r in report["runs"] if r["job"]["method"] == "floor" and r["job"]["kind"] == "train")
    assert floor_train["trainable_params"] == 0 and all(t > 0 for t in floor_train["fwd_bwd_s"])
    by = {(r["method"], r["impl"]): r for r in report["rows"]}
    floor = by[("floor", "peftlab")]
    assert floor["step_over_floor"] == floor["predicted_over_floor"] == floor["measured_over_predicted"] == 1.0
    for key, row in by.items():
        assert row["step_over_floor"] > 0 and row["fwd_bwd_over_floor"] > 0, key
        assert row["measured_over_predicted"] == pytest.approx(row["fwd_bwd_over_floor"] / row["predicted_over_floor"])
        assert row["optimisation_target"] == (row["measured_over_predicted"] > 1.10)
    assert by[("head", "peftlab")]["predicted_over_floor"] < 0.5  # no backward through the backbone
    assert by[("lora", "peft")]["predicted_over_floor"] == by[("lora", "peftlab")]["predicted_over_floor"] > 1


def test_methods_items_take_settings_and_keep_their_labels() -> None:
    entries = bench.parse_methods("lora, lora:r=16:targets=all-linear ,houlsby:size=64,prefix:layers=[0, 1]:length=4")
    assert [(e.label, e.method, e.settings) for e in entries] == [
        ("lora", "lora", {}),
        ("lora:r=16:targets=all-linear", "lora", {"r": 16, "targets": "all-linear"}),
        ("houlsby:size=64", "houlsby", {"size": 64}),
        ("prefix:layers=[0, 1]:length=4", "prefix", {"layers": [0, 1], "length": 4}),
    ]
    spec = entries[1].make("shape:tiny-bert")
    assert spec.to_dict() == methods.get("lora", r=16, targets="all-linear").to_dict()
    config = bench.BenchConfig(model="shape:tiny-bert", methods=["lora:r=4", "lora:r=2"], output="unused", seq=16)
    _, plans = bench.plan(config)
    assert list(plans) == ["floor", "full", "lora:r=4", "lora:r=2"]  # full added, the floor first
    assert plans["lora:r=4"].counts["trainable_params"] == 2 * plans["lora:r=2"].counts["trainable_params"] - 66
    assert {j.method for j in plans["lora:r=2"].jobs} == {"lora:r=2"}
    no_full = bench.BenchConfig(model="shape:tiny-bert", methods=["head"], output="unused", full=False)
    assert [e.label for e in no_full.entries()] == ["head"]
    assert "--no-full" in no_full.command()


def test_a_methods_file_gives_specs_or_presets_with_settings(tmp_path) -> None:
    path = tmp_path / "specs.json"
    custom = methods.get("lora", r=2).to_dict()
    path.write_text(
        json.dumps(
            [
                {"label": "my lora", "spec": custom},
                {"method": "houlsby", "settings": {"size": 8}},
                {"method": "prompt", "settings": {"length": 4}, "label": "short prompt"},
            ]
        )
    )
    config = bench.BenchConfig(model="shape:tiny-bert", methods=["ia3"], methods_file=str(path), output="x", seq=16)
    assert [e.label for e in config.entries()] == ["full", "ia3", "my lora", "houlsby:size=8", "short prompt"]
    _, plans = bench.plan(config)
    assert plans["my lora"].spec == bench.Entry("my lora", spec=custom).make("shape:tiny-bert").to_dict()
    assert plans["short prompt"].spec["model"]["input"]["length"] == 4
    assert f"--methods-file {path}" in config.command()


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            "lora:rank=4",
            "--methods item 'lora:rank=4': lora has no setting 'rank'; its settings are: r, alpha, targets",
        ),
        ("lora:r=0", "method 'lora:r=0': lora r must be an integer in [1, 4096], got 0"),
        ("lora:targets=xyz", "method 'lora:targets=xyz': unknown target(s) xyz"),
        ("lora:r", "--methods item 'lora:r' expects KEY=VALUE, got 'r'"),
        ("lora:r=4,houlsby,lora:r=4", "method 'lora:r=4' is listed twice"),
        ("full:r=4", "full has no setting 'r'; its settings are: (none)"),
        ("floor", "--methods item 'floor': unknown method 'floor'"),
        ("s4:size=3", "s4 has no setting 'size'; its settings are: budget, bitfit"),
    ],
)
def test_bad_methods_items_are_one_line_naming_the_item(items: str, message: str, tmp_path, capsys) -> None:
    argv = ["bench", "--model", "shape:tiny-bert", "--output", str(tmp_path / "out"), "--seq", "16", "--methods", items]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"method": "lora"}, "expected a JSON list of items, got dict"),
        ([{"method": "nope"}], "item 1: unknown method 'nope'"),
        ([{"method": "lora", "settings": {"rank": 2}}], "item 1: lora has no setting 'rank'"),
        ([{"method": "lora", "settings": [1]}], "item 1: settings must be a JSON object"),
        ([{"spec": {}}], "item 1: a spec item is"),
        ([{"label": "x", "spec": {"layers": {"*": {"q": {"kind": "nope"}}}}}], "item 1 ('x'):"),
        ([{"method": "lora"}, {"label": "lora", "spec": {}}], "method 'lora' is listed twice"),
        ([{"label": "floor", "spec": {}}], "'floor' is the frozen-backbone row"),
        ([{"method": "lora", "extra": 1}], "item 1: expected"),
    ],
)
def test_bad_methods_files_are_one_line_naming_the_item(content, message: str, tmp_path, capsys) -> None:
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(content))
    argv = ["bench", "--model", "shape:tiny-bert", "--output", str(tmp_path / "out"), "--methods-file", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "lora,nope"], "unknown method 'nope'"),
        (["--methods", "lora", "--repeats", "0"], "repeats must be >= 1, got 0"),
        (["--methods", "lora,lora"], "listed twice"),
        (["--methods", "lora", "--score-steps", "5"], "--score-steps and --task go together"),
        (["--methods", "prompt", "--seq", "64"], "plus the 20 prompt tokens exceeds the 64 positions"),
        (["--methods", "lora", "--threads", "0"], "threads must be >= 1"),
        (["--methods", "lora", "--accumulate", "0"], "accumulate must be >= 1"),
        (["--protocol", "survey"], "--protocol survey measures T5 text to text"),
        (["--methods", "full", "--quantize", "nf4"], "full fine-tuning cannot train a quantized base"),
        (["--methods", "lora", "--quantize", "int4"], "--quantize"),
    ],
)
def test_bad_input_is_one_line_and_status_2(extra: list[str], message: str, tmp_path, capsys) -> None:
    argv = ["bench", "--model", "shape:tiny-bert", "--output", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_peak_memory_of_a_fresh_process_is_its_own() -> None:
    """ru_maxrss survives exec: a worker started by a large process would report its parent's peak. peak_rss does
    not (VmHWM on Linux)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("the inherited high-water mark is a Linux matter")
    ballast = bytearray(600 * MB)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: resident
    code = "from peftlab.memory import peak_rss; print(peak_rss())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 600 * MB <= len(ballast)


def test_survey_protocol_runs_real_microbatches_with_accumulation(tmp_path) -> None:
    """The survey's setting on T5: 32 real RTE examples (Appendix A prompts) per step in Table 3's microbatches, the
    floor's training step included (T5's stacks hold their own embedding modules)."""
    data = os.environ.get("PEFTLAB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    config = bench.BenchConfig(
        model="shape:tiny-t5", methods=["lora-qv"], output=str(tmp_path / "out"), protocol="survey", full=False,
        repeats=1, warmup=0, data_dir=data,
    )  # fmt: skip
    report = bench.run(config, log=lambda _: None)
    assert (config.batch, config.accumulate, config.seq, config.task) == (32, 1, 512, "gen/rte")
    assert not report["failures"]
    assert len(report["setup"]["lengths"]) == 32 and max(report["setup"]["lengths"]) > 128  # no 128-token cut
    text = (tmp_path / "out" / "bench.md").read_text()
    assert "the survey's protocol: 32 training examples of `gen/rte`" in text and "Beside the survey's Table 5" in text


def test_accumulation_steps_over_every_microbatch() -> None:
    """A measured step is ``accumulate`` microbatches; the worker runs forward and backward over each."""
    config = bench.BenchConfig(
        model="shape:tiny-bert", methods=["lora"], output="unused", batch=2, seq=16, accumulate=3
    )  # fmt: skip
    model = peftlab.load_model("shape:tiny-bert")
    step = measured_batches(config, model)
    assert len(step) == 3 and all(b["input_ids"].shape == (2, 16) for b in step)
    assert "--accumulate 3" in config.command()


def test_survey_comparison_ranks_our_rows_against_table5() -> None:

    table5 = survey.TABLE5["t5-large"]
    rows = [
        {"method": m, "impl": "peftlab", "trainable_params": t * 1e6, "peak_mb": mem * 100, "train_pct_of_full": tr,
         "infer_pct_of_full": inf}
        for m, (t, mem, tr, inf) in table5.items()
    ]  # fmt: skip
    text = "\n".join(survey.comparison("shape:t5-large", rows))
    assert "ρ = 1.00 over 15 rows" in text and "| lora-all (LoRA (all)) | 8.65 / 8.65 |" in text


def test_quantized_base_rows_have_no_full_row_and_no_merged_inference(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    config = bench.BenchConfig(
        model="shape:tiny-llama", methods=["lora"], output=str(tmp_path / "out"), quantize="nf4", batch=2, seq=16,
        repeats=1, warmup=0,
    )  # fmt: skip
    report = bench.run(config, log=lambda _: None)
    kinds = {(r["job"]["method"], r["job"]["kind"]) for r in report["runs"]}
    assert kinds == {("floor", "train"), ("floor", "infer"), ("lora", "train"), ("lora", "infer")}
    assert not report["failures"]
    assert "block linears quantized nf4" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("aten::addmm", "matmul"),
        ("aten::bmm", "matmul"),
        ("aten::_softmax", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::native_layer_norm_backward", "norm"),
        ("aten::bernoulli_", "dropout"),
        ("aten::copy_", "copy"),
        ("aten::cat", "copy"),
        ("aten::mul", "elementwise"),
        ("aten::sigmoid", "elementwise"),
        ("AddmmBackward0", "framework"),
        ("autograd::engine::evaluate_function: MulBackward0", "framework"),
    ],
)
def test_profiler_events_fall_into_categories(name: str, expected: str) -> None:
    assert profile.category(name) == expected


def test_profile_adds_a_category_table_beside_the_cost_model(tmp_path) -> None:
    """Every training row gets its forward + backward's operator time by category; UniPELT's gates show as extra
    elementwise time over LoRA's (the counted FLOPs cannot see it)."""
    argv = ["bench", "--model", "shape:tiny-bert", "--methods", "lora,unipelt", "--no-full", "--profile"]
    argv += ["--output", str(tmp_path), "--batch", "16", "--seq", "32", "--repeats", "2", "--warmup", "1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "--profile" in report["command"]
    by = {r["method"]: r for r in report["rows"]}
    for method in ("floor", "lora", "unipelt"):
        assert all(by[method][f"profile_{c}_ms"] >= 0 for c in profile.CATEGORIES)
        assert by[method]["profile_matmul_ms"] > 0
    assert by["unipelt"]["profile_elementwise_ms"] > by["lora"]["profile_elementwise_ms"]
    md = (tmp_path / "bench.md").read_text()
    assert "## Where the forward + backward goes (profiler)" in md and "| unipelt |" in md
    assert "profile_matmul_ms" in (tmp_path / "bench.csv").read_text()


def test_a_peft_row_that_fails_is_listed_and_the_tables_are_written(tmp_path, capsys) -> None:
    """peft 0.21 cannot run prefix tuning on BERT under transformers 5: its measurements fail, the run exits with
    status 2 naming them, and bench.md still holds every other row, with the failures listed."""
    argv = ["bench", "--model", "shape:tiny-bert", "--methods", "prefix", "--no-full", "--compare-peft"]
    argv += ["--output", str(tmp_path), "--batch", "4", "--seq", "16", "--repeats", "1", "--warmup", "0"]
    code = main(argv)
    report = json.loads((tmp_path / "bench.json").read_text())
    peft_failed = [f for f in report["failures"] if "(peft)" in f]
    if not peft_failed:
        pytest.skip("this peft runs prefix tuning on BERT: nothing fails")
    assert code == 2 and "measurements failed" in capsys.readouterr().err
    md = (tmp_path / "bench.md").read_text()
    assert "| prefix |" in md and "## Failures" in md and "prefix train (peft)" in md
    assert "prefix" not in report["ratios"]


def test_resume_measures_only_what_an_earlier_run_left_unmeasured(tmp_path, monkeypatch) -> None:
    """A run writes each measurement under OUTPUT/jobs/; with --resume a second run takes those (here the worker
    would fail if asked again) and measures only the ones missing, as after a kill."""
    out = tmp_path / "out"
    config = bench.BenchConfig(
        model="shape:tiny-bert", methods=["lora"], output=str(out), batch=2, seq=16, repeats=1, warmup=0, full=False
    )
    first = bench.run(config, log=lambda _: None)
    files = sorted((out / "jobs").glob("*.json"))
    assert len(files) == len(first["runs"]) == 5  # floor: train, infer; lora: train, infer, merged infer
    files[0].unlink()  # as if the run had been killed before its last measurement
    measured: list[str] = []
    real = bench.harness.run_worker
    monkeypatch.setattr(bench.harness, "run_worker", lambda job: measured.append(job.label) or real(job))
    lines: list[str] = []
    second = bench.run(replace(config, resume=True), log=lines.append)
    assert len(measured) == 1 and second["resumed"] == 4
    assert sum("(measured by an earlier run)" in line for line in lines) == 4
    assert [r["job"] for r in second["runs"]] == [r["job"] for r in first["runs"]]
    kept = [r for r in first["runs"] if r["job"]["method"] + " " + r["job"]["kind"] != measured[0]]
    assert all(r in second["runs"] for r in kept)  # the earlier measurements, exactly
    assert "4 of 5 measurements taken by an earlier run" in (out / "bench.md").read_text()
    assert "--resume" in second["command"]
    bench.run(config, log=lambda _: None)  # without --resume: everything measured again
    assert len(measured) == 1 + len(first["runs"])


def test_cache_frozen_adds_a_cached_twin_of_each_row_that_can_have_one(tmp_path) -> None:
    """LoRA on the upper layer gets a ``+ frozen cache`` row (training only, measured, its forward predicted from
    layer 1); LoRA on every layer acts on layer 0 and gets none, which the report says."""
    spec = methods.get("lora").to_dict()
    spec["layers"] = {"1": spec["layers"]["*"]}
    (tmp_path / "upper.json").write_text(json.dumps([{"label": "upper lora", "spec": spec}]))
    config = bench.BenchConfig(
        model="shape:tiny-bert", methods=["lora"], methods_file=str(tmp_path / "upper.json"),
        output=str(tmp_path / "out"), full=False, batch=8, seq=16, repeats=1, warmup=0, cache_frozen=True,
    )  # fmt: skip
    report = bench.run(config, log=lambda _: None)
    assert not report["failures"]
    twin = "upper lora + frozen cache"
    assert list(report["methods"]) == ["floor", "lora", "upper lora", twin]
    assert {r["job"]["kind"] for r in report["runs"] if r["job"]["method"] == twin} == {"train"}
    by = {r["method"]: r for r in report["rows"]}
    assert by[twin]["train_tok_s"] > 0 and by[twin]["infer_tok_s"] is None
    assert by[twin]["predicted_gflop"] < by["upper lora"]["predicted_gflop"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert f"| {twin} |" in md and "No frozen-cache row (they act on the first layer or the input): lora." in md
    assert "--cache-frozen" in report["command"]


def test_cache_frozen_refuses_models_the_cache_does_not_support(tmp_path, capsys) -> None:
    argv = ["bench", "--model", "shape:tiny-llama", "--methods", "lora", "--cache-frozen", "--output", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cache-frozen supports encoder models" in err[0]
