"""peftlab.search.dashboard: serves a real study in optuna-dashboard over HTTP, and says what the user got wrong."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import optuna
import pytest

from peftlab.errors import PeftlabError
from peftlab.search.dashboard import serve, storage_url

#: The postgres_url fixture (a throw-away PostgreSQL server) from tests/postgres.py.
pytest_plugins = ["postgres"]

#: Generous: the server's process imports peftlab (torch), optuna and optuna-dashboard first, which can take well over
#: 10 s on a busy machine.
STARTUP_TIMEOUT = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_study(storage: str, name: str = "lora-vs-params") -> str:
    """A small two-objective study (score up, parameters down) with a few finished trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    for rank in (2, 4, 8, 16):
        trial = study.ask()
        trial.suggest_categorical("rank", [2, 4, 8, 16])
        study.tell(trial, [0.7 + rank / 100, rank * 1000])
    return name


def get_json(url: str, process: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> dict:
    """GET ``url`` until the server answers, failing early (with its output) if the server process has died."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"the dashboard exited with {process.returncode}:\n{process.communicate()[0]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the dashboard did not answer {url} in {timeout} s:\n{process.communicate()[0]}")
            time.sleep(0.2)


def serve_in_subprocess(storage: str, port: int) -> subprocess.Popen:
    code = f"from peftlab.search.dashboard import serve; serve({storage!r}, port={port})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_served(storage: str, name: str) -> None:
    """Serve ``storage``, find study ``name`` in the dashboard's study list, then stop it with Ctrl-C (SIGINT)."""
    port = free_port()
    process = serve_in_subprocess(storage, port)
    try:
        listing = get_json(f"http://127.0.0.1:{port}/api/studies", process)
        studies = {s["study_name"]: s for s in listing["study_summaries"]}
        assert name in studies
        assert len(studies[name]["directions"]) == 2
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)  # a loaded machine is slow to unwind the server
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_serves_an_sqlite_file(tmp_path):
    path = tmp_path / "search.db"
    name = make_study(f"sqlite:///{path}")
    check_served(str(path), name)


def test_serves_a_postgresql_study(postgres_url):
    name = make_study(postgres_url, name="shared-search")
    check_served(postgres_url, name)


def test_storage_url(monkeypatch):
    assert storage_url("postgresql+psycopg2://u@127.0.0.1:5432/db") == "postgresql+psycopg2://u@127.0.0.1:5432/db"
    assert storage_url("sqlite:///:memory:") == "sqlite:///:memory:"
    # the documented plain form gets the driver that is installed (SQLAlchemy 2 alone would pick psycopg 3)
    assert storage_url("postgresql://u@127.0.0.1:5432/db") == "postgresql+psycopg://u@127.0.0.1:5432/db"
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(PeftlabError, match=r"storage postgresql://u:\*\*\*@h/db needs a PostgreSQL driver: pip"):
        storage_url("postgresql://u:secret@h/db")


def test_storage_url_of_a_path(tmp_path, monkeypatch):
    path = tmp_path / "study.db"
    make_study(f"sqlite:///{path}")
    assert storage_url(str(path)) == f"sqlite:///{path}"
    monkeypatch.chdir(tmp_path)
    assert storage_url("study.db") == f"sqlite:///{path.resolve()}"
    assert storage_url("sqlite:///study.db") == "sqlite:///study.db"
    assert storage_url("new.db", must_exist=False) == f"sqlite:///{(tmp_path / 'new.db').resolve()}"


@pytest.mark.parametrize("form", ["path", "url"])
def test_missing_storage_file_is_an_error_and_is_not_created(tmp_path, form):
    path = tmp_path / "typo.db"
    storage = str(path) if form == "path" else f"sqlite:///{path}"
    with pytest.raises(PeftlabError, match=r"does not exist: .*typo\.db"):
        serve(storage, port=free_port())
    assert not path.exists()


def test_not_an_sqlite_file(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("not a database\n")
    with pytest.raises(PeftlabError, match="not an SQLite database"):
        serve(str(path), port=free_port())


def test_sqlite_file_without_studies(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(PeftlabError, match="holds no Optuna studies"):
        serve(str(path), port=free_port())
    assert path.stat().st_size == 0


def test_port_in_use(tmp_path):
    path = tmp_path / "search.db"
    make_study(f"sqlite:///{path}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PeftlabError, match=f"port {port} is already in use"):
            serve(str(path), port=port)


def test_bad_port(tmp_path):
    path = tmp_path / "search.db"
    make_study(f"sqlite:///{path}")
    with pytest.raises(PeftlabError, match="port must be"):
        serve(str(path), port=70000)


def test_unreachable_postgresql_names_the_url_without_password():
    url = f"postgresql://user:secret@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(PeftlabError, match="cannot read storage") as error:
        serve(url, port=free_port())
    assert "secret" not in str(error.value)


def test_dashboard_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # makes `import optuna_dashboard` raise ImportError
    with pytest.raises(PeftlabError) as error:
        serve(str(tmp_path / "search.db"))
    assert str(error.value) == 'the dashboard needs optuna-dashboard: pip install "peftlab[dashboard]"'


#: A server whose one page takes 2 s, served the way ``peftlab dashboard`` serves optuna-dashboard.
SLOW_SERVER = r"""
import sys, time
from wsgiref.simple_server import WSGIServer, make_server
from peftlab.search.dashboard import QuietHandler, serve_until_interrupted

def app(environ, start_response):
    print("in request", flush=True)
    time.sleep(2)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]

server = make_server("127.0.0.1", int(sys.argv[1]), app, server_class=WSGIServer, handler_class=QuietHandler)
print("serving", flush=True)
serve_until_interrupted(server)
print("stopped", flush=True)
"""


def test_ctrl_c_during_a_request_stops_the_server():
    """wsgiref catches a KeyboardInterrupt raised inside a request and serves on; Ctrl-C must stop it anyway,
    after answering the request in hand."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVER, str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout.readline().strip() == "serving"
        answers: list[bytes] = []
        client = threading.Thread(
            target=lambda: answers.append(urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read())
        )
        client.start()
        assert process.stdout.readline().strip() == "in request"
        process.send_signal(signal.SIGINT)
        client.join(timeout=30)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert answers == [b"done"]
    assert process.returncode == 0 and output.strip() == "stopped", output
