"""``peftlab.load``: one routine for both adapter formats on disk (peftlab's own and peft's).

Each format only reads its folder into a spec and tensors keyed by the adapter key scheme; building the
modules, copying the tensors in and cleaning up when that fails happen here, once, so a failed load never
leaves a half-loaded adapter behind on either path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftlab.core.peft_model import PeftModel, apply
from peftlab.errors import AdapterLoadError
from peftlab.formats import interop
from peftlab.formats import native as saving
from peftlab.formats.keys import load_targets, load_tensors
from peftlab.formats.weights import pickled_files


def load(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str | None = None,
    check_base: bool = True,
    activate: bool = True,
    check: bool = True,
    allow_non_finite: bool = False,
) -> PeftModel:
    """Load a saved adapter (peftlab or peft format) onto ``model`` (a transformers model or a PeftModel).
    ``check``: the weights file against the checksum saved with it (peftlab format); ``allow_non_finite``: load
    tensors holding NaN or Inf (refused by default: what a diverged run or a damaged file leaves)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter folder '{directory}' does not exist")
    base = model.base_model if isinstance(model, PeftModel) else model
    if (directory / saving.META).is_file():
        current = None
        if check_base:
            current = model.fingerprint if isinstance(model, PeftModel) else saving.fingerprint(base)
        spec, state, saved_name = saving.read_adapter(directory, current, check, allow_non_finite)
    elif (directory / interop.CONFIG).is_file():
        spec, state, saved_name = interop.read_peft(base, directory, allow_non_finite)
    else:
        pickled = pickled_files(directory)
        found = f" (it has {', '.join(pickled)}: peftlab reads safetensors only, it never unpickles)" if pickled else ""
        raise AdapterLoadError(
            f"'{directory}' holds neither a peftlab adapter ({saving.META}) nor a peft adapter{found}"
        )
    name = adapter_name or saved_name
    if isinstance(model, PeftModel):
        model.add_adapter(name, spec)
        pm = model
    else:
        pm = apply(model, spec, name)
    try:
        load_tensors(pm.adapters[name], state, directory)
    except AdapterLoadError:
        pm.delete_adapter(name)  # leave no half-loaded adapter behind
        raise
    if activate:
        pm.set_adapter(name)
    return pm


def init_from(pm: PeftModel, directory: str | Path) -> list[str]:
    """Start the active adapter from a saved peftlab adapter's tensors (SPoT: a prompt trained on another task):
    every tensor both hold, the task head's left out (another task's labels); a tensor of another shape is an error,
    and so is a source trained on another base (a prompt lives in its backbone's embedding space). Returns the keys
    copied; an adapter sharing none is an error."""
    directory = Path(directory)
    if not (directory / saving.META).is_file():
        raise AdapterLoadError(f"--init-from '{directory}' is not a peftlab adapter folder (no {saving.META})")
    _, state, _ = saving.read_adapter(directory, pm.fingerprint)
    targets = load_targets(pm.adapters[pm.active_adapter])
    shared = [k for k in targets if k in state and not k.startswith("head.")]
    if not shared:
        theirs = ", ".join(sorted(state)[:3]) or "(none)"
        raise AdapterLoadError(f"--init-from '{directory}' holds no tensor of this spec (it holds {theirs})")
    with torch.no_grad():
        for k in shared:
            if tuple(targets[k].shape) != tuple(state[k].shape):
                raise AdapterLoadError(
                    f"--init-from '{directory}': {k} has shape {tuple(state[k].shape)}, this spec's is "
                    f"{tuple(targets[k].shape)}"
                )
        for k in shared:
            targets[k].copy_(state[k].to(targets[k].dtype))
    return shared
