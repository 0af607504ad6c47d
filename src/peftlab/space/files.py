"""Spaces by name (the built-in ``autopeft`` and ``s4``) or from a JSON / YAML file."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from peftlab.errors import PeftlabError
from peftlab.space.backbone import Backbone
from peftlab.space.base import SearchSpace
from peftlab.space.layers import LayerSpace
from peftlab.space.s4 import DesignSpace

#: Built-in spaces by name; both depend on the model (its depth and hidden size, its module costs).
BUILTIN_SPACES = ("autopeft", "s4")


def load_space(name_or_path: str | Path, model: str | nn.Module | Backbone | None = None) -> SearchSpace:
    """A built-in space (``autopeft``, ``s4``) for a model, or a space file."""
    name = str(name_or_path)
    if name in BUILTIN_SPACES:
        if model is None:
            raise PeftlabError(f"the built-in space '{name}' depends on the model; give a model")
        backbone = Backbone.of(model)
        if name == "autopeft":
            return LayerSpace.autopeft(backbone.num_layers, backbone.hidden)
        return DesignSpace.for_model(backbone)
    path = Path(name_or_path)
    if not path.is_file():
        raise PeftlabError(
            f"no space '{name_or_path}': built-in spaces are {', '.join(BUILTIN_SPACES)}, "
            "else give a JSON (or YAML) file"
        )
    return SearchSpace.from_file(path, model)
