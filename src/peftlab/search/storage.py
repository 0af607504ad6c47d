"""Optuna storages: the URL of a path or URL, opening one to search (heartbeats) or to look (no writes).

Users type paths and URLs by hand; a typo must not silently create an empty SQLite file, and an error must
not print the password inside a PostgreSQL URL.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from peftlab import optional
from peftlab.errors import PeftlabError

#: The first 16 bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\x00"


def storage_url(value: str, must_exist: bool = True) -> str:
    """The SQLAlchemy URL of a storage given as a URL or as a path to an SQLite file.

    A path (anything without ``://``) becomes ``sqlite:///<absolute path>``. A missing SQLite file is an error when
    ``must_exist`` (the default, for commands that only read): SQLAlchemy would otherwise silently create an empty
    database and the user would look at nothing instead of learning about the typo. Commands that write a new study
    pass ``must_exist=False``. A plain ``postgresql://`` URL gets the installed driver; other URLs are returned
    unchanged.
    """
    value = str(value).strip()
    if not value:
        raise PeftlabError("empty storage: give an SQLite file (study.db) or a URL (postgresql://user@host/db)")
    if "://" not in value:
        path = Path(value).expanduser().resolve()
        if must_exist:
            _check_sqlite_file(path, value)
        return f"sqlite:///{path}"
    if value.startswith("sqlite:") and must_exist:
        database = _sqlite_database(value)
        if database is not None:
            _check_sqlite_file(Path(database).expanduser(), value)
    if value.startswith(("postgresql://", "postgres://")):
        return _postgres_driver(value)
    return value


def _postgres_driver(url: str) -> str:
    """A plain ``postgresql://`` URL with the driver that is installed: SQLAlchemy 2 picks psycopg (3) for it and
    fails on a machine that has only psycopg2; one without either gets told what to install."""
    rest = url.split("://", 1)[1]
    for driver in ("psycopg", "psycopg2"):
        if optional.available(driver):
            return f"postgresql+{driver}://{rest}"
    raise PeftlabError(f"storage {hide_password(url)} needs a PostgreSQL driver: {optional.INSTALL['psycopg'][1]}")


def open_storage(url: str, heartbeat: int | None = None, retry: bool = True) -> RDBStorage:
    """An Optuna RDB storage; with ``heartbeat``, trials of dead workers go stale (and with ``retry`` their
    points are queued again, once)."""
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna since v2.8
            warnings.simplefilter("ignore", ExperimentalWarning)
            kw: dict[str, Any] = {}
            if heartbeat:
                kw = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat}
                if retry:
                    kw["heartbeat_stale_trial_callback"] = RetryHeartbeatStaleTrialCallback(max_retry=1)
            for attempt in range(5):
                try:
                    return RDBStorage(url, engine_kwargs=engine, **kw)
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
                    if attempt == 4 or not _creation_race(e):
                        raise
                    time.sleep(0.5 + attempt)
    except Exception as e:  # SQLAlchemy raises many kinds: a bad URL, a missing driver, a refused connection
        raise PeftlabError(f"cannot open the study storage {hide_password(url)}: {first_line(e)}") from None


def _creation_race(error: Exception) -> bool:
    """Whether ``error`` comes from another worker creating the same tables at the same moment (PostgreSQL:
    "relation already exists", or a unique violation on its catalogue or on Optuna's version row)."""
    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)


def open_existing(url: str) -> RDBStorage:
    """An ``optuna.storages.RDBStorage`` for ``url``, checked to hold Optuna's tables before anything is served.

    Tables are not created (looking must not write) and the schema version is not enforced (optuna-dashboard reads
    older schemas); a connection or driver problem becomes a :class:`PeftlabError` naming the URL without its password.
    """
    shown = hide_password(url)
    try:
        engine = sqlalchemy.create_engine(url)
    except ImportError as e:
        hint = ': pip install "peftlab[postgres]"' if url.startswith("postgres") else ""
        raise PeftlabError(f"cannot open storage {shown}: its database driver is not installed{hint}") from e
    except sqlalchemy.exc.ArgumentError as e:
        raise PeftlabError(f"not a storage URL: {shown} ({first_line(e)})") from None
    try:
        has_studies = sqlalchemy.inspect(engine).has_table("studies")
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise PeftlabError(f"cannot read storage {shown}: {first_line(getattr(e, 'orig', None) or e)}") from None
    finally:
        engine.dispose()
    if not has_studies:
        raise PeftlabError(f"{shown} holds no Optuna studies (no studies table): run a search with this storage first")
    try:
        opened = optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
        opened.get_all_studies()
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        cause = getattr(e, "orig", None) or e.__cause__ or e
        raise PeftlabError(f"cannot read storage {shown}: {first_line(cause)}") from None
    return opened


def _sqlite_database(url: str) -> str | None:
    """The file path in an SQLite URL, or None for an in-memory database or a ``file:`` URI."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception as e:
        raise PeftlabError(f"not a storage URL: {url} ({first_line(e)})") from None
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


def hide_password(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def first_line(e: object) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
