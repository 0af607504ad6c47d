"""A real, throw-away PostgreSQL server for tests: the ``postgres_url`` fixture.

Use it from a test file with ``from postgres import postgres_url`` (pytest puts tests/ on sys.path, as it has no
__init__.py). The server needs the PostgreSQL server binaries (initdb, pg_ctl): the Debian package ``postgresql``
(``apt-get install postgresql``; CI's .ci/run installs it). Without them the tests using the fixture are skipped; with
them, a server that fails to start fails the test with its log.

The server runs from a fresh temporary directory (data, unix socket, log) on a free port of 127.0.0.1 with trust
authentication and durability off (fsync=off: it is thrown away), and is stopped and deleted at the end of the session.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user (created by the Debian
package) or else ``nobody``.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # the driver SQLAlchemy 2 uses for postgresql:// URLs (peftlab[postgres])
    import psycopg
except ImportError:
    psycopg = None

USER = "peftlab"
DATABASE = "peftlab_test"
PREFIX = "peftlab-pg-"
OWNER = "owner.pid"
SKIP_REASON = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
    "install the Debian package `postgresql` (apt-get install postgresql)"
)


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: from PATH, else the newest /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0, reverse=True)
    candidates += [Path(d) for d in versions]
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (this user) unless we are root, whom PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; ``start()`` then ``url``, ``stop()`` removes everything."""

    def __init__(self, bin_dir: Path, root: Path | None = None):
        """A new cluster directory, or (``root``) one left behind, to stop and remove."""
        self.bin_dir = bin_dir
        self.user = _server_user()
        self.root = root or Path(tempfile.mkdtemp(prefix=PREFIX))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port: int | None = None
        if root is not None:
            return
        self.sockets.mkdir()
        self.root.joinpath(OWNER).write_text(str(os.getpid()))
        if self.user is not None:
            for path in (self.root, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.root.chmod(0o700)

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"  # the plain form the README documents

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a server program as the server's user, in the temporary directory, with a clean locale."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "HOME": str(self.root)}
        ids = {}
        if self.user is not None:
            ids = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        return subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **ids,
        )

    def _fail(self, what: str, result: subprocess.CompletedProcess | None = None) -> None:
        output = (result.stdout + result.stderr) if result is not None else ""
        log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
        raise RuntimeError(f"PostgreSQL {what} failed:\n{output}\n--- server log ---\n{log}")

    def start(self, attempts: int = 3) -> None:
        result = self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"
        )
        if result.returncode != 0:
            self._fail("initdb", result)
        for attempt in range(attempts):  # the free port can be taken by someone else before the server binds it
            self.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40"
            )
            result = self._run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"
            )
            if result.returncode == 0:
                break
            if attempt == attempts - 1:
                self._fail("start", result)
        self._create_database()

    def _create_database(self) -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self) -> None:
        """Stop the server (immediately: nothing is kept) and delete its directory; safe to call twice."""
        if self.data.joinpath("postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def _reap_orphans(bin_dir: Path) -> None:
    """Stop and remove servers whose test process died without cleaning up (killed by a timeout, say)."""
    for owner in Path(tempfile.gettempdir()).glob(f"{PREFIX}*/{OWNER}"):
        try:
            os.kill(int(owner.read_text()), 0)
            continue  # its test process is still running
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        PostgresServer(bin_dir, root=owner.parent).stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A started server, stopped and deleted on exit (and at interpreter exit, should the exit be skipped)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip(SKIP_REASON)
    if psycopg is None:
        pytest.skip('PostgreSQL tests need psycopg: pip install "peftlab[postgres]"')
    _reap_orphans(bin_dir)
    server = PostgresServer(bin_dir)
    atexit.register(server.stop)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        atexit.unregister(server.stop)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL (``postgresql://peftlab@127.0.0.1:PORT/peftlab_test``) of an empty database on a
    throw-away PostgreSQL server shared by the whole test session (give each test its own study name)."""
    with postgres_server() as server:
        yield server.url
