"""What a benchmark compares: its rows, each a label and the spec it measures, read from ``--methods`` and
``--methods-file``. Every bad item is one error naming the item and what is allowed, before anything runs.

``--methods`` is a comma-separated list of ``NAME[:KEY=VALUE[:KEY=VALUE...]]`` (``lora:r=16:targets=all-linear``);
values are Python literals, else strings, as ``peftlab train --set`` reads them. Commas and colons inside brackets
or quotes belong to the value (``prefix:layers=[2,3]``). The row is labelled with the item as given.

``--methods-file`` is a JSON list whose items are ``{"label": ..., "spec": <spec dict>}`` or
``{"method": NAME, "settings": {...}}`` (label optional: then the ``NAME:KEY=VALUE`` form of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftlab import methods
from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError, SpecError
from peftlab.reading import parse_json, read_text

#: the row of the frozen backbone (every weight frozen, gradients to the embedding output): measured in every run
FLOOR = "floor"
#: the row of full fine-tuning, added unless listed or left out (``--no-full``)
FULL = "full"
#: the label of a row's twin trained from the frozen-prefix cache (``--cache-frozen``)
CACHED = "{} + frozen cache"
_OPEN, _CLOSE, _QUOTES = "([{", ")]}", "'\""


@dataclass
class Entry:
    """One row: its label, and either a preset with settings or a whole spec (from a methods file)."""

    label: str
    method: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] | None = None

    def make(self, model: str | nn.Module) -> Spec:
        """The spec this row measures, sized for ``model`` where the preset needs it (s4); a bad value is one error
        naming the row."""
        try:
            if self.spec is not None:
                return Spec.from_dict(self.spec)
            return methods.for_model(self.method, model, **self.settings)
        except SpecError as e:
            raise PeftlabError(f"method '{self.label}': {e}") from None


def split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in _QUOTES:
            quote = c
        elif c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def label_of(method: str, settings: dict[str, Any]) -> str:
    """The ``NAME:KEY=VALUE`` form of a preset and its settings."""
    return ":".join([method, *(f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in settings.items())])


def _preset(item: str, method: Any, settings: Any, label: str) -> Entry:
    """A preset entry, its name and setting names checked (values are checked when its spec is made)."""
    every = [*methods.METHODS, *methods.MODEL_METHODS]
    if not isinstance(method, str) or method not in every:
        raise PeftlabError(f"{item}: unknown method {method!r}; methods are: {', '.join(every)}")
    if not isinstance(settings, dict):
        raise PeftlabError(f"{item}: settings must be a JSON object of KEY: VALUE, got {settings!r}")
    allowed = methods.settings_of(method)
    unknown = [k for k in settings if k not in allowed]
    if unknown:
        raise PeftlabError(
            f"{item}: {method} has no setting {', '.join(map(repr, unknown))}; "
            f"its settings are: {', '.join(allowed) or '(none)'}"
        )
    return Entry(label=label, method=method, settings=dict(settings))


def parse_methods(text: str) -> list[Entry]:
    """The entries of a ``--methods`` value (empty items are skipped)."""
    out = []
    for raw in split_top(text, ","):
        item = raw.strip()
        if not item:
            continue
        name, *pairs = [p.strip() for p in split_top(item, ":")]
        where = f"--methods item '{item}'"
        settings = methods.parse_settings(pairs, where)
        out.append(_preset(where, name, settings, item))
    return out


def read_methods_file(path: str) -> list[Entry]:
    """The entries of a ``--methods-file`` (a JSON list of ``{"label", "spec"}`` or ``{"method", "settings"}``)."""
    data = parse_json(read_text(path, "methods file"), f"methods file {path}")
    if not isinstance(data, list):
        raise PeftlabError(f"methods file {path}: expected a JSON list of items, got {type(data).__name__}")
    out = []
    for i, raw in enumerate(data, 1):
        where = f"methods file {path} item {i}"
        if not isinstance(raw, dict):
            raise PeftlabError(f"{where}: expected an object, got {raw!r}")
        keys = set(raw)
        if "spec" in raw:
            if keys != {"label", "spec"} or not isinstance(raw["label"], str) or not raw["label"].strip():
                raise PeftlabError(
                    f'{where}: a spec item is {{"label": TEXT, "spec": {{...}}}}, got keys {sorted(keys)}'
                )
            try:
                Spec.from_dict(raw["spec"])
            except SpecError as e:
                raise PeftlabError(f"{where} ('{raw['label']}'): {e}") from None
            out.append(Entry(label=raw["label"].strip(), spec=raw["spec"]))
        elif "method" in raw and keys <= {"label", "method", "settings"}:
            settings = raw.get("settings", {})
            label = raw.get("label")
            if label is not None and (not isinstance(label, str) or not label.strip()):
                raise PeftlabError(f"{where}: label must be a non-empty string, got {label!r}")
            entry = _preset(where, raw["method"], settings, "")
            entry.label = label.strip() if label else label_of(entry.method, entry.settings)
            out.append(entry)
        else:
            raise PeftlabError(
                f'{where}: expected {{"label", "spec"}} or {{"method", "settings"[, "label"]}}, got keys {sorted(keys)}'
            )
    return out


def check_labels(entries: list[Entry]) -> None:
    """Labels name rows: each once, and never the floor's."""
    seen: set[str] = set()
    for e in entries:
        if e.label == FLOOR:
            raise PeftlabError(f"'{FLOOR}' is the frozen-backbone row every run measures; it cannot be listed")
        if e.label in seen:
            raise PeftlabError(f"method '{e.label}' is listed twice (every row needs its own label)")
        seen.add(e.label)
