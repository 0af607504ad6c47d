"""Where a training step's time goes: the forward + backward under ``torch.profiler``, each operator's own time
(self time, so nested calls are not counted twice) summed into a few categories that tell FLOPs from overhead.

The cost model (:mod:`peftlab.bench.flops`) counts matmul FLOPs only; a method above its prediction spends the
difference somewhere else, and these categories say where: elementwise work (gates, scales, activations), copies
and layout changes, norms, dropout, or the framework itself (autograd nodes, hooks: the time not inside an aten
operator).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

#: categories in the order tables show them
CATEGORIES = ("matmul", "attention", "norm", "dropout", "elementwise", "copy", "framework")
_MATMUL = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "_int_mm", "mv", "dot")
_ATTENTION = ("_softmax", "_softmax_backward_data", "softmax", "_safe_softmax")
_NORM = ("native_layer_norm", "native_layer_norm_backward", "_fused_rms_norm", "_fused_rms_norm_backward", "rsqrt")
_DROPOUT = ("bernoulli_", "native_dropout", "native_dropout_backward", "dropout")
_COPY = (
    "copy_", "clone", "contiguous", "cat", "stack", "_to_copy", "to", "index", "index_select", "index_put_", "gather",
    "scatter", "scatter_add_", "embedding", "embedding_dense_backward", "narrow_copy", "_unsafe_view", "zeros",
    "empty_like", "zero_", "fill_", "new_zeros", "transpose", "permute", "expand", "reshape", "view", "t", "select",
    "slice", "as_strided", "unsqueeze", "squeeze", "split", "chunk", "_reshape_alias", "detach",
)  # fmt: skip


def category(name: str) -> str:
    """The category of one profiler event by its operator name."""
    if not name.startswith("aten::"):
        return "framework"
    op = name.removeprefix("aten::")
    if op in _MATMUL or op.startswith(("_mkldnn", "mkldnn_")):
        return "matmul"
    if op in _ATTENTION or op.startswith(("_scaled_dot_product", "scaled_dot_product", "_flash_attention")):
        return "attention"
    for cat, ops in (("norm", _NORM), ("dropout", _DROPOUT), ("copy", _COPY)):
        if op in ops:
            return cat
    return "elementwise"


def profile_ms(run: Callable[[], None], steps: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per call of ``run`` by category (own time of every operator over ``steps`` calls; on a GPU the
    device time). The profiler's own overhead makes the sum somewhat larger than the timed step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        own = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[category(event.key)] += own / 1e3 / steps  # µs -> ms per call
    return totals
