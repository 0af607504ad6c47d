"""The postgres_url fixture gives a real PostgreSQL server that several processes can share one Optuna study in."""

from __future__ import annotations

import subprocess
import sys

import optuna
import sqlalchemy

#: The postgres_url fixture (a throw-away PostgreSQL server) from tests/postgres.py.
pytest_plugins = ["postgres"]

#: One search worker: load the shared study, wait until every worker is ready (so they really run at the same time),
#: then run 5 trials that take a little while each.
WORKER = r"""
import os, sys, time
import optuna
url, name, worker, ready, n_workers = sys.argv[1:6]
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url))
open(os.path.join(ready, worker), "w").close()
deadline = time.monotonic() + 60
while len(os.listdir(ready)) < int(n_workers) and time.monotonic() < deadline:
    time.sleep(0.01)
def objective(trial):
    trial.set_user_attr("worker", worker)
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(0.1)
    return x * x
study.optimize(objective, n_trials=5)
"""


def test_server_is_real_postgresql(postgres_url):
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            assert "PostgreSQL" in connection.execute(sqlalchemy.text("SELECT version()")).scalar()
    finally:
        engine.dispose()


def test_two_processes_share_one_study(postgres_url, tmp_path):
    storage = optuna.storages.RDBStorage(postgres_url)
    name = "shared-by-two-processes"
    optuna.create_study(study_name=name, storage=storage, direction="minimize")
    ready = tmp_path / "ready"
    ready.mkdir()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgres_url, name, f"w{i}", str(ready), "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, output

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 10
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(10))
    assert len({t._trial_id for t in trials}) == 10
    by_worker = {w: [t for t in trials if t.user_attrs["worker"] == w] for w in ("w0", "w1")}
    assert [len(ts) for ts in by_worker.values()] == [5, 5]
    # The two workers ran at the same time: their spans of trials overlap.
    spans = [(min(t.datetime_start for t in ts), max(t.datetime_complete for t in ts)) for ts in by_worker.values()]
    assert max(start for start, _ in spans) < min(end for _, end in spans)


#: Rounds of ``n`` workers forked at once, each opening peftlab's storage on the same fresh database; prints one
#: line of outcomes per round. It runs in a fresh interpreter: forking the test process itself could deadlock once
#: other tests have started threads (JAX's, for one).
RACE = r"""
import multiprocessing, sys
import sqlalchemy
from peftlab.errors import PeftlabError
from peftlab.search.storage import open_storage

def opener(url, barrier, results):
    barrier.wait()
    try:
        open_storage(url, heartbeat=5).engine.dispose()
        results.put("ok")
    except PeftlabError as e:
        results.put(str(e))

server, rounds, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = multiprocessing.get_context("fork")
engine = sqlalchemy.create_engine(server + "/postgres", isolation_level="AUTOCOMMIT")
for k in range(rounds):
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE race_{k}"))
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=opener, args=(f"{server}/race_{k}", barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    print(sorted(results.get(timeout=120) for _ in procs), flush=True)
    for p in procs:
        p.join(timeout=60)
engine.dispose()
"""


def test_workers_creating_the_tables_at_once_all_start(postgres_url):
    """Concurrent table creation races in PostgreSQL ("relation already exists", unique violations in its
    catalogue); every worker must still open the storage. Eight workers start together at a barrier on each of
    twelve fresh databases, since one round seldom hits the race (before the fix it showed within 5 to 8 rounds)."""
    server = postgres_url.rsplit("/", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", RACE, server, "12", "8"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [str(["ok"] * 8)] * 12
    storage = optuna.storages.RDBStorage(f"{server}/race_0")
    assert optuna.get_all_study_summaries(storage) == []  # the tables exist, and hold nothing
    storage.engine.dispose()
