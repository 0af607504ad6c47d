"""Adapters on disk: a folder with safetensors weights, the JSON spec and a fingerprint of the base model.

Nothing is unpickled. Loading checks the fingerprint first, so an adapter is never silently applied to a
different base; saving never overwrites an existing adapter unless asked to.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.atomic import write_files
from peftlab.backbone.anatomy import Anatomy, anatomy_for, find_blocks
from peftlab.backbone.quant import is_linear, model_quantize
from peftlab.core.spec import Spec
from peftlab.errors import AdapterLoadError, PeftlabError
from peftlab.formats.keys import stored_tensors
from peftlab.formats.weights import checksum, encode, read_weights
from peftlab.reading import parse_json, read_text

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
    kept = list(tensors)  # what quantizing leaves as it was: the embeddings and the blocks' norms
    for block in (blocks[0], blocks[-1]):
        tensors += [p for _, p in sorted(block.module.named_parameters())]
        linear = {id(p) for m in block.module.modules() if is_linear(m) for p in m.parameters(recurse=False)}
        kept += [p for _, p in sorted(block.module.named_parameters()) if id(p) not in linear]
    on_meta = any(t.device.type == "meta" for t in tensors)
    return {
        "architecture": arch,
        "config_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": None if on_meta else _sample_hash(tensors),
        # an adapter trained on a quantized base loads onto the full-precision one (to merge there) and back
        "quantize": model_quantize(model),
        "unquantized_sha256": None if on_meta else _sample_hash(kept),
    }


def _prepare_dir(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise PeftlabError(f"'{directory}' exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise PeftlabError(f"'{directory}' is not empty; choose a new folder or pass overwrite=True")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_folder(directory: Path, files: dict[str, Callable[[Path], None]], overwrite: bool) -> Path:
    """Write an adapter folder's files, each with its writer; never into a non-empty folder unless asked."""
    _prepare_dir(directory, overwrite)
    write_files(directory, files)
    return directory


def adapter_files(pm: Any, adapter: str) -> dict[str, Callable[[Path], None]]:
    """The files of a peftlab adapter folder, each with its writer."""
    spec = pm.adapters[adapter].spec
    meta = {
        "format": "peftlab-adapter",
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter,
        "base_model_class": type(pm.base_model).__name__,
        "fingerprint": pm.fingerprint,
        "spec": spec.stored().to_dict(),
    }
    data = encode(_contiguous(stored_tensors(pm.adapters[adapter])))
    meta["checksums"] = {WEIGHTS: checksum(data)}
    return {
        WEIGHTS: lambda p: p.write_bytes(data),
        META: lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"),
    }


def _check_base(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    if saved.get("config_sha256") != current["config_sha256"]:
        raise AdapterLoadError(
            f"adapter '{where}' was trained on a different base model (architecture {saved.get('architecture')}); "
            f"this model is {current['architecture']}"
        )
    # Bases quantized differently (or one not at all) share only what quantizing leaves unchanged.
    key = "weights_sha256" if saved.get("quantize") == current["quantize"] else "unquantized_sha256"
    theirs, mine = saved.get(key), current[key]
    if theirs and mine and theirs != mine:
        raise AdapterLoadError(
            f"adapter '{where}' was trained on a base model with different weights (same architecture); "
            "load the base it was trained on, or pass check_base=False to load it anyway"
        )


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from an adapter folder, or one AdapterLoadError naming the file and what it should be."""
    data = parse_json(read_text(path, what, AdapterLoadError), f"{what} '{path}'", AdapterLoadError)
    if not isinstance(data, dict):
        raise AdapterLoadError(f"'{path}' is not a {what} (not a JSON object)")
    return data


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    meta = read_json_object(path, "peftlab adapter description")
    if meta.get("format") != "peftlab-adapter" or meta.get("format_version") != FORMAT_VERSION:
        raise AdapterLoadError(f"'{path}' is not a peftlab adapter of format version {FORMAT_VERSION}")
    for key in ("spec", "fingerprint"):
        if not isinstance(meta.get(key), dict):
            raise AdapterLoadError(f"'{path}' has no '{key}' object: the file is damaged; save the adapter again")
    return meta


def read_adapter(
    directory: Path, current: dict[str, Any] | None, check: bool = True, allow_non_finite: bool = False
) -> tuple[Spec, dict[str, torch.Tensor], str]:
    """The spec, tensors and name of a peftlab adapter folder; ``current`` (the base's fingerprint) is checked
    against the one it was trained on unless None; ``check``: the weights file against its saved checksum (older
    adapters have none)."""
    meta = read_meta(directory)
    try:
        spec = Spec.from_dict(meta["spec"])
    except PeftlabError as e:
        raise AdapterLoadError(f"'{directory / META}' holds no valid spec: {e}") from None
    if current is not None:
        _check_base(meta["fingerprint"], current, directory)
    sums = meta.get("checksums")
    expected = sums.get(WEIGHTS) if isinstance(sums, dict) else None
    state = read_weights(directory / WEIGHTS, expected, check, allow_non_finite)
    return spec, state, meta.get("adapter_name", "default")
