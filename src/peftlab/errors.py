"""Errors a user can cause; the CLI prints their one-line message instead of a traceback."""


class PeftlabError(ValueError):
    """A user mistake with a message that names what was wrong and what is allowed."""


class SpecError(PeftlabError):
    """A spec that cannot be applied to this model."""


class AdapterLoadError(PeftlabError):
    """A saved adapter that cannot be loaded onto this model."""


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The fields that differ between two settings dicts, nested ones by dotted name, as "name: old → new" (what
    a refusal to mix two runs' settings shows: the differences, not both dicts)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out
