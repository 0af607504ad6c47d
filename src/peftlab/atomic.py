"""Atomic writes: a file (or a set of files in a folder) is either the old one or the whole new one.

A crash or a full disk in the middle of a write must not leave half a record, table or adapter that a later
run would read as finished. Every write goes to a temporary file in the same folder (same file system, so
the rename is atomic), is flushed to disk with ``fsync``, and then replaces the target with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Writes a file at the given path (``torch.save``, ``save_file``, ``fig.savefig`` ...).
Writer = Callable[[Path], object]


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename survives a power cut), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    if os.name == "posix":  # Windows cannot open a folder to fsync it
        _fsync(folder)


def write_with(path: str | Path, writer: Writer) -> Path:
    """Write ``path`` with ``writer`` called on a temporary sibling; returns ``path``.

    The temporary name is unique (concurrent writers do not collide) and keeps the suffix, so writers that
    choose a format by it (matplotlib) still do. The writer creates it, so it gets the usual permissions."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        writer(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda p: p.write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda p: p.write_text(text))


def write_json(path: str | Path, data: Any, indent: int = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """``data`` as indented JSON with a final newline."""
    return write_text(path, json.dumps(data, indent=indent, default=default) + "\n")


def write_files(folder: str | Path, files: dict[str, Writer]) -> Path:
    """Several files into ``folder``: all are written and flushed in a temporary sibling folder before any
    is moved in, so a failing writer leaves the folder as it was (an adapter is never half saved)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, writer in files.items():
            writer(tmp / name)
            _fsync(tmp / name)
        for name in files:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_folder(folder)
    return folder
