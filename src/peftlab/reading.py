"""Reading the user's text files: one clear error for bytes that are not UTF-8 and JSON that cannot be read,
instead of a UnicodeDecodeError or RecursionError traceback from deep inside the parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError


def read_text(path: str | Path, what: str, error: type[PeftlabError] = PeftlabError) -> str:
    """The file's text; ``what`` names the file in the error (e.g. "spec file")."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} '{p}' does not exist" if not p.exists() else f"{what} '{p}' is not a file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(
            f"{what} '{p}' is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
            "save it as UTF-8"
        ) from None


def parse_json(text: str, what: str, error: type[PeftlabError] = PeftlabError) -> Any:
    """JSON values of ``text``; numbers too large for a float and nesting too deep for the parser are errors."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to read (JSON nested thousands of levels deep)") from None
    except ValueError as e:  # NaN / Infinity, or an integer with more digits than Python converts
        raise error(f"{what} is not valid JSON: {e}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
