"""The adapter tensor key scheme: where each module's tensors sit in an adapter file, and how they load back.

``layers.<layer>-<site>.<name>`` for a module at a site (``model-<site>`` for model-level sites),
``shared.<key>.<name>`` for a part the adapter's modules share, and a module's own ``state_prefix`` (``head``,
``embeddings``, ``base``) for the whole-model parts. Saving, loading and the peft interop all use these
functions, so the scheme is written down once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peftlab.errors import AdapterLoadError


def module_key(layer: int | None, site: str) -> str:
    """Key of a module in ``adapter.layers`` (ModuleDict keys cannot hold dots)."""
    return f"model-{site}" if layer is None else f"{layer}-{site}"


def tensor_key(layer: int | None, site: str, name: str) -> str:
    """Key of tensor ``name`` of the module at ``site`` of ``layer`` in an adapter file."""
    return f"layers.{module_key(layer, site)}.{name}"


def _root(key: str, module: Any) -> str:
    return module.state_prefix or f"layers.{key}"


def _keyed(adapter: Any, of_module: Callable[[Any], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``of_module``'s tensors of every module, and the stored shared parts, under their keys in the file."""
    out: dict[str, torch.Tensor] = {}
    for key, module in adapter.all_modules():
        out |= {f"{_root(key, module)}.{k}": v for k, v in of_module(module).items()}
    for key, part in adapter.shared.items():
        if part.peftlab_stored:
            out |= {f"shared.{key}.{k}": v for k, v in part.state_dict().items()}
    return out


def stored_tensors(adapter: Any) -> dict[str, torch.Tensor]:
    """Every tensor the adapter file holds, keyed by where it goes back."""
    return {k: v.detach() for k, v in _keyed(adapter, lambda m: m.stored_state()).items()}


def load_targets(adapter: Any) -> dict[str, torch.Tensor]:
    """The tensors of a freshly built adapter that a saved file's tensors load into, by the same keys."""
    return _keyed(adapter, lambda m: m.load_targets())


def load_tensors(adapter: Any, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Copy saved tensors into a freshly built adapter; any mismatch is an error, not a silent skip."""
    targets = load_targets(adapter)
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise AdapterLoadError(
            f"adapter '{where}' does not match its spec: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for k, t in targets.items():
            if t.shape != state[k].shape:
                raise AdapterLoadError(
                    f"adapter '{where}': tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(t.shape)}"
                )
            t.copy_(state[k].to(t.dtype))
