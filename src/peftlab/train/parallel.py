"""Data parallelism under ``torchrun`` / ``accelerate launch``: each process trains on its share of every batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def dist_setup() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun / accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(params: list[nn.Parameter], loss: float, world: int) -> float:
    """Sum gradients and the loss over processes. Each process already weighted its share of the global
    batch, so the sum is the gradient of the global mean: the same as one process on the whole batch."""
    if world == 1:
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([*(g.reshape(-1) for g in grads), torch.tensor([loss], device=params[0].device)])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(flat[-1])


def is_main() -> bool:
    """Whether this process logs and writes (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0
