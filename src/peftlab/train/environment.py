"""Where and with what a run ran: the device and the library versions its record keeps."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch
import transformers

from peftlab import __version__


def library_versions() -> dict[str, str]:
    """python, torch, transformers, peft, optuna and peftlab versions: what a reader needs to compare records and
    benchmarks, and what a bug report starts with (``peftlab version``)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": _installed("peft"),
        "optuna": _installed("optuna"),
        "peftlab": __version__,
    }


def _installed(package: str) -> str:
    """A package's installed version, read from its metadata (without importing it)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under torchrun) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """What ran the run, for records read later: ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    return f"{device} ({torch.cuda.getdevice_name(device)})" if device.type == "cuda" else str(device)
