"""The search: studies over a space on real task slices, failures, budgets, kill-and-resume, shared workers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from postgres import postgres_url  # noqa: F401  (fixture: a real throw-away PostgreSQL server)

from peftlab.cli import main
from peftlab.errors import PeftlabError
from peftlab.search import results
from peftlab.search.params import distributions, suggest, to_params, to_vector
from peftlab.search.refine import Stage
from peftlab.search.study import (
    SearchConfig,
    counted,
    create_study,
    load_study,
    make_sampler,
    print_trial,
    run_search,
)

DATA = Path(os.environ.get("PEFTLAB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data under {DATA}")
TRAIN = {
    "data_dir": str(DATA),
    "k": 32,
    "dev_size": 16,
    "max_steps": 3,
    "batch_size": 8,
    "max_length": 24,
    "eval_batch_size": 64,
}
FLAGS = [
    "--model",
    "shape:tiny-bert",
    "--task",
    "sst2",
    "--data-dir",
    str(DATA),
    "--k",
    "32",
    "--dev-size",
    "16",
    "--batch-size",
    "8",
    "--max-length",
    "24",
    "--no-plots",
]


def _config(tmp_path: Path, **kw) -> SearchConfig:
    base = {
        "model": "shape:tiny-bert",
        "task": "sst2",
        "sampler": "random",
        "trials": 4,
        "output": str(tmp_path),
        "train": TRAIN,
    }
    return SearchConfig(**(base | kw))


def _finished(study: optuna.Study) -> dict[int, tuple]:
    return {
        t.number: (t.params, t.values, t.user_attrs.get("status"))
        for t in study.get_trials()
        if t.state.is_finished() and t.user_attrs.get("status")
    }


def test_search_trains_points_and_exports_the_front(tmp_path: Path) -> None:
    # score 0 as the reference: these 3-step runs of a random-init model rarely beat the default, the constant
    # prediction's score, and the curve is to grow from its first point
    study = run_search(_config(tmp_path, sampler="tpe", startup_trials=2, trials=5, ref_point=(0.0, 100.0)))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5
    for t in done:
        assert 0 <= t.values[0] <= 1 and t.values[1] == pytest.approx(t.user_attrs["stored_percent"])
        assert (Path(t.user_attrs["run"]) / "record.json").is_file() or "copied_from" in t.user_attrs
        assert t.user_attrs.get("test") is None  # trials never look at test
    curve = results.hypervolume_curve(study)
    assert len(curve) == 5 and curve == sorted(curve) and curve[-1] > 0
    front = results.pareto_trials(study)
    assert front and all(not any(o.values[0] >= f.values[0] and o.values[1] < f.values[1] for o in done) for f in front)
    # After the trials, the front (and only the front) is scored on test, from the adapters its trials saved.
    tested = {r["number"]: r.get("test_accuracy") for r in results.trial_rows(study)}
    assert {n for n, v in tested.items() if v is not None} == {t.number for t in front}
    assert all(set(r["test"]) == {"accuracy"} for r in results.summary(study)["pareto"])
    assert all(line.split()[3] != "-" for line in results.front_table(study).splitlines()[1:])  # the test column
    paths = results.export(study, tmp_path / "out")
    assert {p.name for p in paths} >= {"trials.csv", "pareto.json", "hypervolume.csv", "front.png", "hypervolume.png"}
    assert json.loads((tmp_path / "out" / "pareto.json").read_text())["hypervolume"] == pytest.approx(curve[-1])


def test_parameters_round_trip_through_the_space(tmp_path: Path) -> None:
    from peftlab.space import load_space

    space = load_space("s4", "shape:bert-base")
    vector = space.random_vector(3)
    assert to_vector(space, to_params(space, vector)) == vector


def test_failed_and_diverged_trials_are_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    # BERT has no gated FFN: points that place the module fail; the others (the head alone) train.
    space = {"type": "layers", "modules": [{"name": "broken", "kind": "ia3", "sites": ["ffn_gate"], "choices": [0, 1]}]}
    (tmp_path / "space.json").write_text(json.dumps(space))
    # (at 3 steps nothing learns: without the hopeless stop the head-only trials complete)
    train = TRAIN | {"stop_hopeless": False}
    study = run_search(_config(tmp_path, space=str(tmp_path / "space.json"), trials=6, seed=0, train=train))
    statuses = [t.user_attrs.get("status") for t in study.trials]
    assert len(statuses) == 6 and "completed" in statuses and "error" in statuses
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials if t.user_attrs["status"] == "error")
    diverged = run_search(_config(tmp_path / "d", trials=2, train=TRAIN | {"lr": 1e30}))
    assert {t.user_attrs["status"] for t in diverged.trials} == {"diverged"}
    assert all(t.state == optuna.trial.TrialState.FAIL for t in diverged.trials)


def test_hopeless_trials_are_finished_with_their_reason_and_the_search_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 32 examples / batch 8: the first evaluation at step 4 of 8 (half the budget: no earlier check); at lr 1e-9
    # nothing is learned.
    train = TRAIN | {"max_steps": 8, "eval_every": 4, "lr": 1e-9}
    study = run_search(_config(tmp_path, trials=3, train=train), on_trial=print_trial)
    assert counted(study) == (3, 0)
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["status"] == "hopeless"
        assert t.user_attrs["steps"] == 4 and t.values[0] == t.user_attrs["dev"]["score"]
        assert t.user_attrs["message"].startswith("stopped at step 4: dev accuracy")
        assert t.user_attrs["suggest_s"] >= 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(": hopeless, dev score" in line and "constant prediction" in line for line in lines)
    assert results.summary(study)["statuses"] == {"hopeless": 3}
    assert {r["status"] for r in results.trial_rows(study)} == {"hopeless"}
    # Turned off, the same trials train to their budget.
    full = run_search(_config(tmp_path / "off", trials=1, train=train | {"stop_hopeless": False}))
    assert full.trials[0].user_attrs["status"] == "completed" and full.trials[0].user_attrs["steps"] == 8


def test_over_budget_points_are_pruned_untrained(tmp_path: Path) -> None:
    study = run_search(_config(tmp_path, trials=4, budget=5.0))
    for t in study.trials:
        if t.user_attrs["stored_percent"] > 5.0:
            assert t.state == optuna.trial.TrialState.PRUNED and "run" not in t.user_attrs
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE
    assert counted(study) == (4, 0)


def test_joining_a_study_with_other_settings_is_refused(tmp_path: Path) -> None:
    run_search(_config(tmp_path, trials=1))
    with pytest.raises(PeftlabError, match=r"different search \(task: 'sst2' → 'rte': the study's → this"):
        run_search(_config(tmp_path, trials=1, task="rte"))
    # Settings left out are their defaults: a study made before a setting existed is still the same search.
    create_study(_config(tmp_path, trials=1, train=TRAIN | {"seed": 0, "consistency": None}))
    with pytest.raises(PeftlabError, match=r"different search \(train.seed: 0 → 1: ") as refused:
        create_study(_config(tmp_path, trials=1, train=TRAIN | {"seed": 1}))
    assert "batch_size" not in str(refused.value)  # only what differs, not the whole settings dict
    with pytest.raises(PeftlabError, match="no study 'nope'"):
        load_study(str(tmp_path / "study.db"), "nope")


#: a layer space for the top layer of tiny-bert alone (LoRA and a serial adapter; both off: the head alone)
UPPER_MODULES = [
    {"name": "lora", "kind": "lora", "sites": ["q", "v"], "size": "r", "choices": [0, 2, 4, 8, 16]},
    {"name": "serial", "kind": "adapter", "sites": ["after_ffn"], "size": "size", "choices": [0, 4, 8, 16]},
]


def _kill_during_a_trial(cmd: list[str], db: Path) -> tuple[dict[int, tuple], list[int]]:
    """Start ``cmd``, kill -9 it while it trains a trial after two finished ones; (finished, killed trial numbers).

    The trial seen training may end between the look and the kill; then the same command is started again
    (which resumes) and killed again later. On a loaded machine the look may miss every trial after the second, so
    the search ends by itself: then it starts over from nothing."""
    before: dict[int, tuple] = {}
    killed: list[int] = []
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
            try:
                study = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{db}")
                trials = study.get_trials()
            except Exception:  # the file or its tables may not exist yet
                continue
            training = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and "spec" in t.user_attrs]
            if len(_finished(study)) >= 2 and training:
                break
        if proc.poll() == 0:  # finished every trial unseen: nothing to kill, so start again in an empty folder
            shutil.rmtree(db.parent)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        study = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{db}")
        before = _finished(study)
        killed = [t.number for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
        if killed:
            break
    return before, killed


def _random_search_cli(trials: int, steps: int) -> list[str]:
    """A ``peftlab search`` process: random sampling, ``trials`` trials of ``steps`` steps on the tiny task."""
    return [
        sys.executable,
        "-m",
        "peftlab.cli",
        "search",
        *FLAGS,
        "--sampler",
        "random",
        "--trials",
        str(trials),
        "--max-steps",
        str(steps),
    ]


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cache-frozen"])
def test_killed_search_resumes_without_losing_finished_trials(tmp_path: Path, cache: bool) -> None:
    """With ``--cache-frozen`` too, over a space of modules in the upper layer (so every trial caches): the cache
    lives in the worker's memory, so a killed worker loses only it, and the resumed search computes again what it
    needs."""
    cmd = [
        *_random_search_cli(trials=5, steps=12),
        "--output",
        str(tmp_path / "search"),
        "--heartbeat",
        "1",
    ]
    if cache:
        space = tmp_path / "upper.json"
        space.write_text(json.dumps({"type": "layers", "layers": [1], "modules": UPPER_MODULES}))
        cmd += ["--cache-frozen", "--space", str(space)]
    tmp_path = tmp_path / "search"
    before, killed = _kill_during_a_trial(cmd, tmp_path / "study.db")
    assert len(before) >= 2 and len(before) < 5, "the search was not killed after two trials and before the end"
    assert killed, "no trial was running when the search was killed"
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=300).returncode == 0
    study = optuna.load_study(study_name="peftlab", storage=f"sqlite:///{tmp_path / 'study.db'}")
    after = _finished(study)
    assert len(after) == 5
    for number, result in before.items():
        assert after[number] == result  # nothing finished was lost or redone
    states = {t.number: t.state for t in study.trials}
    for number in killed:  # failed as stale, and its point queued again
        assert states[number] == optuna.trial.TrialState.FAIL
        assert any(t.system_attrs.get("failed_trial") == number for t in study.trials)
    trained = [
        t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "copied_from" not in t.user_attrs
    ]
    # each process loaded its backbone once and lent it to its later trials, which say where their time went
    assert {t.user_attrs["backbone"] for t in trained} == {"loaded", "reused"}
    assert all(t.user_attrs["timings"]["train_s"] > 0 and "other_s" in t.user_attrs["timings"] for t in trained)
    if cache:  # each trial says where its steps started (layer 1, or 2 for the head alone) and what it found
        assert all(t.user_attrs["timings"]["cache_s"] > 0 for t in trained)
        caches = [t.user_attrs["cache"] for t in trained]
        assert all(c["layer"] in (1, 2) and c["misses"] + c["hits"] > 0 for c in caches)
        assert load_study(str(tmp_path / "study.db"), "peftlab")[1]["train"]["cache_frozen"] is True  # workers agree
    else:
        assert all("cache" not in t.user_attrs for t in trained)


def test_running_trial_without_heartbeat_goes_stale(tmp_path: Path) -> None:
    """A worker killed between asking for a trial and its first heartbeat must not leave it running forever."""
    config = _config(tmp_path, trials=1, heartbeat=1)
    run_search(config)
    study, _ = load_study(str(tmp_path / "study.db"), "peftlab")
    orphan = study.ask()  # no heartbeat is ever recorded for it, as if its worker died at once
    run_search(dataclasses.replace(config, trials=2))
    study, _ = load_study(str(tmp_path / "study.db"), "peftlab")
    assert study.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert counted(study) == (2, 0)


def test_two_workers_on_postgresql_share_one_study(tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    cmd = [
        *_random_search_cli(trials=6, steps=3),
        "--storage",
        postgres_url,
        "--study",
        "shared",
    ]
    workers = [
        subprocess.Popen(
            [*cmd, "--output", str(tmp_path / f"w{k}"), "--sampler-seed", str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len(_finished(study)) == 6 == len(trials)  # none lost, none extra
    # no trial trained twice (a point drawn again copies the first result, run folder included)
    runs = [t.user_attrs["run"] for t in trials if "run" in t.user_attrs and "copied_from" not in t.user_attrs]
    assert len(runs) == len(set(runs))
    assert all(any(f"trial {t.number}:" in out for out in outputs) for t in trials)  # each ran in one worker
    assert sum(f"trial {t.number}:" in out for out in outputs for t in trials) == 6


def test_cli_search_pareto_and_retrain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert (
        main(["search", *FLAGS, "--sampler", "random", "--trials", "3", "--max-steps", "2", "--output", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "hypervolume" in text and "trial 2:" in text
    db = str(out / "study.db")
    assert main(["pareto", "show", "--storage", db, "--study", "peftlab", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["trials"] == 3 and shown["pareto"]
    assert {k: shown["definition"]["train"][k] for k in ("score_test", "stop_hopeless")} == {
        "score_test": False,
        "stop_hopeless": True,
    }
    assert all(r["test"] for r in shown["pareto"])  # scored after the trials
    best = shown["pareto"][0]["number"]
    assert (
        main(
            [
                "pareto",
                "spec",
                "--storage",
                db,
                "--study",
                "peftlab",
                "--trial",
                str(best),
                "--output",
                str(tmp_path / "spec.json"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--model",
                "shape:tiny-bert",
                "--task",
                "rte",
                "--data-dir",
                str(DATA),
                "--k",
                "16",
                "--dev-size",
                "8",
                "--max-steps",
                "1",
                "--spec",
                str(tmp_path / "spec.json"),
                "--no-progress",
                "--output",
                str(tmp_path / "transfer"),
            ]
        )
        == 0
    )  # a found spec transfers to another task
    capsys.readouterr()
    assert (
        main(
            [
                "pareto",
                "retrain",
                "--storage",
                db,
                "--study",
                "peftlab",
                "--seeds",
                "0",
                "1",
                "--max-steps",
                "3",
                "--output",
                str(tmp_path / "re"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "re" / "retrain.json").read_text())["rows"]
    assert rows and all(r["seeds"] == 2 and r["test_mean"] is not None for r in rows)
    assert main(["pareto", "spec", "--storage", db, "--study", "peftlab", "--trial", "99"]) == 2
    assert "no trial 99" in capsys.readouterr().err
    assert main(["search", *FLAGS, "--sampler", "cmaes", "--output", str(tmp_path / "x")]) == 2
    assert "unknown sampler 'cmaes'" in capsys.readouterr().err


QUICK = ["search", *FLAGS, "--sampler", "random", "--trials", "1", "--max-steps", "1"]


def _runs(study: optuna.Study) -> dict[str, bytes]:
    return {t.user_attrs["run"]: (Path(t.user_attrs["run"]) / "record.json").read_bytes() for t in study.trials}


def test_cli_search_can_score_every_trial_and_train_every_trial_to_its_budget(tmp_path: Path) -> None:
    assert main([*QUICK, "--score-test", "--no-stop-hopeless", "--output", str(tmp_path)]) == 0
    study, definition = load_study(str(tmp_path / "study.db"), "peftlab")
    assert definition["train"]["score_test"] is True and definition["train"]["stop_hopeless"] is False
    assert set(study.trials[0].user_attrs["test"]) == {"accuracy"}


def test_default_output_is_the_studys_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two searches without --output in one folder, the second with another --study: both train their trials,
    each in its own folder, and the first's runs are left as they were."""
    monkeypatch.chdir(tmp_path)
    assert main(QUICK) == 0
    first = load_study("search/study.db", "peftlab")[0]
    before = _runs(first)
    assert main([*QUICK, "--study", "other"]) == 0
    second = load_study("search-other/study.db", "other")[0]
    assert [t.state for t in second.trials] == [optuna.trial.TrialState.COMPLETE]
    assert _runs(load_study("search/study.db", "peftlab")[0]) == before
    assert not set(_runs(second)) & set(before)
    assert (tmp_path / "search-other" / "results").is_dir()


def test_a_folder_holding_another_studys_runs_is_refused_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--output", str(tmp_path / "s")]
    assert main([*QUICK, *out]) == 0
    before = _runs(load_study(str(tmp_path / "s" / "study.db"), "peftlab")[0])
    capsys.readouterr()
    other = tmp_path / "other.db"
    assert main([*QUICK, *out, "--storage", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the runs of study 'peftlab'" in err[0] and "--output" in err[0], err
    assert not other.exists()  # refused before the storage was touched
    assert main([*QUICK, *out, "--study", "another"]) == 2  # the same storage, another study: refused too
    assert "holds the runs of study 'peftlab'" in capsys.readouterr().err
    assert _runs(load_study(str(tmp_path / "s" / "study.db"), "peftlab")[0]) == before
    assert main([*QUICK, *out, "--trials", "2"]) == 0  # the folder's own study resumes in it


def test_a_search_whose_trials_all_failed_exits_with_the_first_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the hopeless check would stop the runs at step 1, before the blown-up weights give a non-finite loss
    cmd = [
        "search",
        *FLAGS,
        "--sampler",
        "random",
        "--trials",
        "2",
        "--max-steps",
        "2",
        "--lr",
        "1e30",
        "--no-stop-hopeless",
    ]
    assert main([*cmd, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "trial 0" in err[0] and "diverged" in err[0], err
    assert (tmp_path / "results").is_dir()  # the failed trials' table is still written


def test_s4_refinement_fixes_one_dimension_per_stage_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s4.json").write_text(json.dumps({"type": "s4", "groups": 2, "strategies": ["adapter", "bitfit"]}))
    cmd = [
        "refine",
        *FLAGS[:-1],
        "--space",
        str(tmp_path / "s4.json"),
        "--samples",
        "1",
        "--max-steps",
        "2",
        "--output",
        str(tmp_path / "r"),
    ]
    assert main(cmd) == 0
    text = capsys.readouterr().out
    result = json.loads((tmp_path / "r" / "refine.json").read_text())
    stages = [s["stage"] for s in result["stages"]]
    assert stages == ["grouping", "allocation", "tuned", "strategies_g1", "strategies_g2"]
    assert set(result["design"]) == set(stages) and result["spec"] and "design: " in text
    for s in result["stages"]:
        if not s["skipped"]:  # a real choice: every candidate was trained and the best mean kept
            assert all(len(c["scores"]) == 1 for c in s["candidates"])
            assert max(c["mean"] for c in s["candidates"]) == next(
                c["mean"] for c in s["candidates"] if c["value"] == s["chosen"]
            )
    assert "sigma unknown with 1 sample" in text  # one sample per candidate: no spread to judge the margin by
    trials = len(load_study(str(tmp_path / "r" / "study.db"), "refine")[0].trials)
    assert main(cmd) == 0  # resumed: every evaluation is already in the study
    assert len(load_study(str(tmp_path / "r" / "study.db"), "refine")[0].trials) == trials


def test_each_refinement_sample_trains_with_its_own_seed(tmp_path: Path) -> None:
    """Sample n of a candidate trains with seed + n, so a candidate whose space has shrunk to one point is measured
    over seeds (its spread is the seed's), not one run copied."""
    (tmp_path / "s4.json").write_text(json.dumps({"type": "s4", "groups": 2, "strategies": ["adapter"]}))
    cmd = ["refine", *FLAGS[:-1], "--space", str(tmp_path / "s4.json"), "--samples", "2", "--max-steps", "2"]
    assert main([*cmd, "--stages", "allocation", "--seed", "3", "--output", str(tmp_path / "r")]) == 0
    trials = load_study(str(tmp_path / "r" / "study.db"), "refine")[0].trials
    assert trials and all(t.user_attrs["train_seed"] == 3 + t.user_attrs["sample"] for t in trials)
    assert not any("copied_from" in t.user_attrs for t in trials)  # same point, other seed: trained, not copied
    seeds = {json.loads((Path(t.user_attrs["run"]) / "record.json").read_text())["config"]["seed"] for t in trials}
    assert seeds == {3, 4}


def test_a_refinement_stage_reports_its_margin_in_standard_errors() -> None:
    clear = Stage("grouping", ["a", "b", "c"], [[0.80, 0.82, 0.81], [0.70, 0.71, 0.69], [0.5, 0.5]], chosen="a")
    diff, sigma = clear.margin()
    assert diff == pytest.approx(0.81 - 0.70)  # against the runner-up, not the worst
    assert sigma == pytest.approx(0.11 / ((0.01**2 / 3) * 2) ** 0.5)
    noisy = Stage("tuned", ["a", "b"], [[0.80, 0.70, 0.90], [0.78, 0.68, 0.88]], chosen="a")
    assert 0 < noisy.margin()[1] < 2 and noisy.to_dict()["margin_sigma"] == noisy.margin()[1]
    assert Stage("x", ["a", "b"], [[0.8], [0.7]], chosen="a").margin() == pytest.approx((0.1, None))
    assert Stage("x", ["a"], [[0.8]], chosen="a", skipped="one value").margin() is None


def test_local_workers_share_an_sqlite_study(tmp_path: Path) -> None:
    study = run_search(_config(tmp_path, trials=4), workers=2)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert len(_finished(study)) == 4 and counted(study) == (4, 0)


@pytest.mark.parametrize("name", ["random", "tpe", "nsga2", "gp"])
def test_every_optuna_sampler_searches_the_real_space_encoding(name: str) -> None:
    from peftlab.space import load_space

    space = load_space("autopeft", "shape:bert-base")
    dists = distributions(space)

    def cost(v: list[int]) -> float:
        return sum(v[:12]) * (v[12] + v[13] + v[14])

    sampler = make_sampler(name, space, seed=0, startup=3, cost=cost)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    study.optimize(
        lambda t: (lambda v: (sum(v[8:12]) - 0.1 * v[14], cost(v)))(to_vector(space, suggest(t, dists))), n_trials=6
    )
    assert len(study.trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all(set(t.params) == set(dists) for t in study.trials)
