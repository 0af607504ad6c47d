"""An adapter's weights file: read only as safetensors (never unpickled), checked against the checksum saved
beside it, and refused when it holds values that are not finite (what a diverged run leaves, or a flipped
exponent bit), so a damaged adapter is an error naming the file rather than a model that silently predicts
nonsense."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from peftlab.errors import AdapterLoadError

PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def pickled_files(directory: Path) -> list[str]:
    """Files in ``directory`` that look like pickled weights (which peftlab refuses to read)."""
    return sorted(p.name for pattern in PICKLES for p in directory.glob(pattern))


def encode(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of ``state`` (what is written, and what the checksum is of)."""
    return save(state, metadata={"format": "pt"})


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_weights(
    path: Path, expected: str | None = None, check: bool = True, allow_non_finite: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``expected``: its saved checksum, verified unless ``check`` is off."""
    if not path.is_file():
        pickled = pickled_files(path.parent)
        found = f" (found {', '.join(pickled)})" if pickled else ""
        raise AdapterLoadError(
            f"'{path.parent}' has no {path.name}{found}; peftlab reads safetensors only (it never unpickles)"
        )
    data = path.read_bytes()
    if check and expected is not None and checksum(data) != expected:
        raise AdapterLoadError(
            f"'{path}' does not match the checksum saved with it: the file changed after it was saved "
            "(corrupted or edited); check=False loads it anyway"
        )
    try:
        state = load(data)
    except (SafetensorError, ValueError) as e:
        size = f"{len(data)} bytes" if data else "empty"
        raise AdapterLoadError(f"'{path}' is not a readable safetensors file ({size}: {e})") from None
    if not allow_non_finite:
        for name, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdapterLoadError(
                    f"'{path}': tensor '{name}' holds values that are not finite (NaN or Inf); "
                    "allow_non_finite=True loads it anyway"
                )
    return state
