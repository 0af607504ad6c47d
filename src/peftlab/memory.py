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
    """Peak resident set of this process so far, in bytes. On Linux ``VmHWM`` of /proc/self/status: ``ru_maxrss``
    keeps the high-water mark of the process it was forked from across ``exec``, so a fresh worker started by a
    large process (a test session, a notebook) would report its parent's size. Elsewhere ``ru_maxrss`` (kB on Linux,
    bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
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
