"""Memory of this process, in bytes: the one place that knows ``ru_maxrss``'s units per platform.

Run records (``peftlab train``) and the benchmark (``peftlab bench``) both report peak memory; they must
measure it the same way for their numbers to compare.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch


def peak_rss() -> int:
    """Peak resident set of this process so far, in bytes (``ru_maxrss`` is kB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def current_rss() -> int:
    """Resident set now, in bytes; where /proc is missing, the peak so far is the best available bound."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_memory(device: torch.device) -> int:
    """Peak memory of a run on ``device``: CUDA's peak allocation on a GPU, the peak resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss()
