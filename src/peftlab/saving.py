"""Adapters on disk: a folder with safetensors weights, the JSON spec and a fingerprint of the base model.

Nothing is unpickled. Loading checks the fingerprint first, so an adapter is never silently applied to a
different base; saving never overwrites an existing adapter unless asked to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab.anatomy import Anatomy, anatomy_for, find_blocks
from peftlab.atomic import write_files
from peftlab.errors import AdapterLoadError, PeftlabError
from peftlab.modules.prefix import PrefixSettings
from peftlab.spec import Spec

WEIGHTS = "adapter.safetensors"
META = "peftlab_adapter.json"
FORMAT_VERSION = 1
_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "num_key_value_heads",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
)
_SAMPLE = 4096


def _sample_hash(tensors: list[torch.Tensor]) -> str:
    """A hash of strided samples of the tensors, rounded to bfloat16 so a bf16 copy of the same base matches."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: nn.Module, anatomy: Anatomy | None = None) -> dict[str, Any]:
    """Identify a base model by its architecture and by samples of its weights (None on the meta device)."""
    anatomy = anatomy or anatomy_for(model.config.model_type)
    cfg = model.config.to_dict()
    arch = {k: cfg[k] for k in _CONFIG_KEYS if k in cfg}
    blocks = find_blocks(model, anatomy)
    tensors = [model.get_input_embeddings().weight]
    for block in (blocks[0], blocks[-1]):
        tensors += [p for _, p in sorted(block.module.named_parameters())]
    on_meta = any(t.device.type == "meta" for t in tensors)
    return {
        "architecture": arch,
        "config_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": None if on_meta else _sample_hash(tensors),
    }


def _storage_spec(spec: Spec) -> Spec:
    """The spec as stored: prefixes are saved as key/values, so they load without the MLP."""
    layers = {
        key: {
            site: dataclasses.replace(s, reparam=False) if isinstance(s, PrefixSettings) else s
            for site, s in sites.items()
        }
        for key, sites in spec.layers.items()
    }
    return dataclasses.replace(spec, layers=layers)


def adapter_state(pm, name: str) -> dict[str, torch.Tensor]:
    """Every tensor the adapter file holds, keyed by where it goes back."""
    adapter = pm.adapters[name]
    state: dict[str, torch.Tensor] = {}
    if adapter.spec.full:
        return {f"base.{k}": v for k, v in pm.base_model.state_dict().items()}
    for key, module in adapter.layers.items():
        state |= {f"layers.{key}.{k}": v for k, v in module.stored_state().items()}
    for key, shared in adapter.shared.items():
        if key != "prefix_pool":
            state |= {f"shared.{key}.{k}": v.detach() for k, v in shared.state_dict().items()}
    if adapter.head is not None:
        state |= {f"head.{k}": v.detach() for k, v in adapter.head.state_dict().items()}
    if adapter.spec.train_embeddings:
        state["embeddings.weight"] = pm.base_model.get_input_embeddings().weight.detach()
    return state


def _prepare_dir(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise PeftlabError(f"'{directory}' exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise PeftlabError(f"'{directory}' is not empty; choose a new folder or pass overwrite=True")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save(pm, directory: Path, format: str, adapter: str, overwrite: bool) -> Path:
    if format not in ("peftlab", "peft"):
        raise PeftlabError(f"unknown adapter format '{format}'; formats are: peftlab, peft")
    if adapter not in pm.adapters:
        raise PeftlabError(f"no adapter named '{adapter}'; adapters: {', '.join(pm.adapters)}")
    _prepare_dir(directory, overwrite)
    if format == "peft":
        from peftlab.interop import peft_files

        write_files(directory, peft_files(pm, adapter))
        return directory
    spec = pm.adapters[adapter].spec
    meta = {
        "format": "peftlab-adapter",
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter,
        "base_model_class": type(pm.base_model).__name__,
        "fingerprint": pm.fingerprint,
        "spec": _storage_spec(spec).to_dict(),
    }
    state = _contiguous(adapter_state(pm, adapter))
    write_files(
        directory,
        {
            WEIGHTS: lambda p: save_file(state, str(p), metadata={"format": "pt"}),
            META: lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"),
        },
    )
    return directory


def _check_base(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    if saved["config_sha256"] != current["config_sha256"]:
        raise AdapterLoadError(
            f"adapter '{where}' was trained on a different base model (architecture {saved['architecture']}); "
            f"this model is {current['architecture']}"
        )
    if saved["weights_sha256"] and current["weights_sha256"] and saved["weights_sha256"] != current["weights_sha256"]:
        raise AdapterLoadError(
            f"adapter '{where}' was trained on a base model with different weights (same architecture); "
            "load the base it was trained on, or pass check_base=False to load it anyway"
        )


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from an adapter folder, or one AdapterLoadError naming the file and what it should be."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"'{path}' is not a readable {what}: {e}") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"'{path}' is not a {what} (not a JSON object)")
    return data


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    meta = read_json_object(path, "peftlab adapter description")
    if meta.get("format") != "peftlab-adapter" or meta.get("format_version") != FORMAT_VERSION:
        raise AdapterLoadError(f"'{path}' is not a peftlab adapter of format version {FORMAT_VERSION}")
    return meta


def load(
    model: nn.Module,
    directory: str | Path,
    adapter_name: str | None = None,
    check_base: bool = True,
    activate: bool = True,
):
    """Load a saved adapter (peftlab or peft format) onto ``model`` (a transformers model or a PeftModel)."""
    from peftlab.peft_model import PeftModel, apply

    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter folder '{directory}' does not exist")
    if not (directory / META).is_file():
        if (directory / "adapter_config.json").is_file():
            from peftlab.interop import load_peft

            return load_peft(model, directory, adapter_name=adapter_name, activate=activate)
        raise AdapterLoadError(f"'{directory}' holds neither a peftlab adapter ({META}) nor a peft adapter")
    meta = read_meta(directory)
    spec = Spec.from_dict(meta["spec"])
    name = adapter_name or meta.get("adapter_name", "default")
    base = model.base_model if isinstance(model, PeftModel) else model
    current = model.fingerprint if isinstance(model, PeftModel) else fingerprint(base)
    if check_base:
        _check_base(meta["fingerprint"], current, directory)
    state = load_file(str(directory / WEIGHTS))
    if isinstance(model, PeftModel):
        model.add_adapter(name, spec)
        pm = model
    else:
        pm = apply(model, spec, name)
    load_adapter_state(pm, name, state, directory)
    if activate:
        pm.set_adapter(name)
    return pm


def load_adapter_state(pm, name: str, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Copy saved tensors into a freshly built adapter; any mismatch is an error, not a silent skip."""
    adapter = pm.adapters[name]
    targets: dict[str, torch.Tensor] = {}
    if adapter.spec.full:
        targets = {f"base.{k}": v for k, v in pm.base_model.state_dict().items()}
    else:
        for key, module in adapter.layers.items():
            targets |= {f"layers.{key}.{k}": v for k, v in module.state_dict().items()}
        for key, shared in adapter.shared.items():
            targets |= {f"shared.{key}.{k}": v for k, v in shared.state_dict().items()}
        if adapter.head is not None:
            targets |= {f"head.{k}": v for k, v in adapter.head.state_dict().items()}
        if adapter.spec.train_embeddings:
            targets["embeddings.weight"] = pm.base_model.get_input_embeddings().weight
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
