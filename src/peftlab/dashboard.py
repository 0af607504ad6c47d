"""Serve an Optuna study storage in optuna-dashboard, turning what users get wrong into one-line errors.

A search writes its trials to an Optuna storage (an SQLite file or a PostgreSQL database shared by several worker
processes); ``peftlab dashboard`` shows it live in the browser. optuna-dashboard is an optional dependency
(``pip install "peftlab[dashboard]"``), so it is imported only when the dashboard is started.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from peftlab.errors import PeftlabError

#: The first 16 bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\x00"


def storage_url(value: str, must_exist: bool = True) -> str:
    """The SQLAlchemy URL of a storage given as a URL or as a path to an SQLite file.

    A path (anything without ``://``) becomes ``sqlite:///<absolute path>``. A missing SQLite file is an error when
    ``must_exist`` (the default, for commands that only read): SQLAlchemy would otherwise silently create an empty
    database and the user would look at nothing instead of learning about the typo. Commands that write a new study
    pass ``must_exist=False``. Other URLs (``postgresql+psycopg2://...``) are returned unchanged.
    """
    value = str(value).strip()
    if not value:
        raise PeftlabError("empty storage: give an SQLite file (study.db) or a URL (postgresql+psycopg2://...)")
    if "://" not in value:
        path = Path(value).expanduser().resolve()
        if must_exist:
            _check_sqlite_file(path, value)
        return f"sqlite:///{path}"
    if value.startswith("sqlite:") and must_exist:
        database = _sqlite_database(value)
        if database is not None:
            _check_sqlite_file(Path(database).expanduser(), value)
    return value


def serve(storage: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve ``storage`` (SQLite file, ``sqlite:///`` or PostgreSQL URL) in optuna-dashboard until interrupted.

    Everything that can fail because of the user's input (dashboard not installed, missing database, unreachable
    server, busy port) is checked before the server starts and raised as a :class:`PeftlabError`; Ctrl-C returns
    normally, so the CLI exits without a traceback.
    """
    try:
        _serve(storage, host, port)
    except KeyboardInterrupt:
        return


def _serve(storage: str, host: str, port: int) -> None:
    try:
        import optuna_dashboard
    except ImportError:
        raise PeftlabError('the dashboard needs optuna-dashboard: pip install "peftlab[dashboard]"') from None
    url = storage_url(storage)
    _check_port(host, port)
    opened = open_storage(url)
    try:
        optuna_dashboard.run_server(opened, host=host, port=port)
    except OSError as e:  # lost the race for the port between the check and the server's bind
        if e.errno == errno.EADDRINUSE:
            raise PeftlabError(_port_in_use(host, port)) from None
        raise


def open_storage(url: str):
    """An ``optuna.storages.RDBStorage`` for ``url``, checked to hold Optuna's tables before anything is served.

    Tables are not created (looking must not write) and the schema version is not enforced (optuna-dashboard reads
    older schemas); a connection or driver problem becomes a :class:`PeftlabError` naming the URL without its password.
    """
    import optuna
    import sqlalchemy
    import sqlalchemy.exc

    shown = _hide_password(url)
    try:
        engine = sqlalchemy.create_engine(url)
    except ImportError as e:
        hint = ': pip install "peftlab[postgres]"' if url.startswith("postgres") else ""
        raise PeftlabError(f"cannot open storage {shown}: its database driver is not installed{hint}") from e
    except sqlalchemy.exc.ArgumentError as e:
        raise PeftlabError(f"not a storage URL: {shown} ({_first_line(e)})") from None
    try:
        has_studies = sqlalchemy.inspect(engine).has_table("studies")
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise PeftlabError(f"cannot read storage {shown}: {_first_line(getattr(e, 'orig', None) or e)}") from None
    finally:
        engine.dispose()
    if not has_studies:
        raise PeftlabError(f"{shown} holds no Optuna studies (no studies table): run a search with this storage first")
    try:
        opened = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
        opened.get_all_studies()
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        cause = getattr(e, "orig", None) or e.__cause__ or e
        raise PeftlabError(f"cannot read storage {shown}: {_first_line(cause)}") from None
    return opened


def _sqlite_database(url: str) -> str | None:
    """The file path in an SQLite URL, or None for an in-memory database or a ``file:`` URI."""
    import sqlalchemy.engine

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as e:
        raise PeftlabError(f"not a storage URL: {url} ({_first_line(e)})") from None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("uri"):
        return None
    return database


def _check_sqlite_file(path: Path, given: str) -> None:
    if not path.exists():
        where = "" if str(path) == given else f" ({path})"
        raise PeftlabError(f"storage file does not exist: {given}{where}")
    if not path.is_file():
        raise PeftlabError(f"storage {given} is not a file: {path} (give the SQLite .db file)")
    with path.open("rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if header and header != _SQLITE_HEADER:
        raise PeftlabError(f"storage {given} is not an SQLite database: {path}")


def _check_port(host: str, port: int) -> None:
    """Bind (and release) the address the server will use, so a busy port is reported before anything starts.

    Binds the way wsgiref does (IPv6 only for a host with ``:``, SO_REUSEADDR set), so a port left in TIME_WAIT by a
    previous dashboard is not reported as busy.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PeftlabError(f"port must be a whole number from 1 to 65535, got {port!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PeftlabError(f"cannot listen on host {host!r}: {e.strerror}") from None
    fam, kind, proto, _, address = infos[0]
    with socket.socket(fam, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PeftlabError(_port_in_use(host, port)) from None
            raise PeftlabError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _port_in_use(host: str, port: int) -> str:
    return f"port {port} is already in use on {host}: stop what is using it or choose another port (--port)"


def _hide_password(url: str) -> str:
    try:
        import sqlalchemy.engine

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _first_line(e: object) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
