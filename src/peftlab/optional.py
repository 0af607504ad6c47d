"""Optional dependencies, all declared here and imported the same way: where they are used, through
:func:`require`, so peftlab runs without them and a missing one is one line naming what needs it and how to
install it. Everything else is imported at the top of the module that uses it."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from peftlab.errors import PeftlabError

#: importable name -> (the package's name, how to install it)
INSTALL = {
    "botorch": ("BoTorch", 'pip install "peftlab[bo]"'),
    "matplotlib": ("matplotlib", 'pip install "peftlab[bench]"'),
    "peft": ("peft", 'pip install "peftlab[bench]"'),
    "optuna_dashboard": ("optuna-dashboard", 'pip install "peftlab[dashboard]"'),
    "psycopg": ("psycopg", 'pip install "peftlab[postgres]"'),
    "datasets": ("datasets", "pip install datasets"),
    "yaml": ("PyYAML", "pip install pyyaml"),
    "rouge_score": ("rouge-score", 'pip install "peftlab[generation]"'),
    "trl": ("trl", "pip install trl"),
    "bitsandbytes": ("bitsandbytes", 'pip install "peftlab[quant]"'),
}
#: peftlab modules that import an optional package at their top, and that package
WRAPPERS = {"peftlab.search.bo": "botorch"}


def available(name: str) -> bool:
    """Whether the optional package ``name`` can be imported (without importing it; one already imported, or
    blocked with ``sys.modules[name] = None``, answers for itself)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def require(name: str, needed_for: str) -> ModuleType:
    """The module ``name`` (a submodule too) of an optional package, or a PeftlabError saying ``needed_for`` needs
    it and how to install it."""
    top = WRAPPERS.get(name, name).split(".")[0]
    if top not in INSTALL:
        raise ValueError(f"'{top}' is not one of peftlab's optional dependencies: {', '.join(INSTALL)}")
    try:
        return importlib.import_module(name)
    except ImportError:
        package, install = INSTALL[top]
        raise PeftlabError(f"{needed_for} needs {package}: {install}") from None


def plotting() -> ModuleType:
    """matplotlib's pyplot on the file-only backend (plots are written, never shown)."""
    require("matplotlib", "plotting").use("Agg")
    return require("matplotlib.pyplot", "plotting")
