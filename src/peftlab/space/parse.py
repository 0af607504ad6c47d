"""Reading a space's JSON: one-line errors that name the field and what it allows."""

from __future__ import annotations

from typing import Any

from peftlab.errors import SpecError


def json_object(data: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be an object, got {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}; fields are: {', '.join(sorted(allowed))}")
    return dict(data)
