"""Checkpoints to resume a run exactly, and the best-so-far snapshot of the trainable tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from peftlab.atomic import write_files
from peftlab.train.config import RunRecord


def trainable(pm: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in pm.named_parameters() if p.requires_grad]


def snapshot(pm: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable(pm)}


def restore(pm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def save_checkpoint(path: Path, pm, opt, sched, record: RunRecord, state: dict) -> None:
    """Everything needed to continue exactly: trainable tensors, optimiser, schedule, RNG, record."""
    saved = {
        "trainable": snapshot(pm),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "state": state,
    }
    write_files(path, {"state.pt": lambda p: torch.save(saved, p), "record.json": record.save})


def load_checkpoint(path: Path, pm, opt, sched, record: RunRecord) -> dict:
    saved = torch.load(path / "state.pt", weights_only=True)
    restore(pm, saved["trainable"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    earlier = json.loads((path / "record.json").read_text())
    record.evaluations, record.best = earlier["evaluations"], earlier["best"]
    return saved["state"]
