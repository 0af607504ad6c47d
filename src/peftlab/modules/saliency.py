"""Gradient statistics of frozen or fresh weights over a few training examples, taken before the first step: what
FishMask (the diagonal Fisher) and SparseAdapter (SNIP) rank weight entries by. One loop, so both read the model in
eval mode (no dropout), count examples the same way and leave every ``requires_grad`` flag as they found it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


def _rows(batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """The batch's examples one at a time (every tensor of a batch is batch-first)."""
    n = next(iter(batch.values())).shape[0]
    for i in range(n):
        yield {k: v[i : i + 1] for k, v in batch.items()}


def gradient_sums(
    model: nn.Module,
    weights: list[nn.Parameter],
    batches: Iterable[dict[str, torch.Tensor]],
    samples: int,
    *,
    squared: bool,
) -> list[torch.Tensor]:
    """Per weight, in float32: the sum over the first ``samples`` examples of the loss gradient (``squared=False``:
    one gradient per batch, SNIP's connection sensitivity) or of its per-example square (``squared=True``: the
    empirical diagonal Fisher, which needs one backward pass per example)."""
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    was, flags, seen = model.training, [w.requires_grad for w in weights], 0
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            for part in _rows(batch) if squared else (batch,):
                grads = torch.autograd.grad(model(**part).loss, weights, allow_unused=True)
                for total, g in zip(sums, grads, strict=True):
                    if g is not None:
                        total += g.float().pow(2) if squared else g.float()
                seen += next(iter(part.values())).shape[0]
                if seen >= samples:
                    return sums
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was)
    return sums
