"""The run's optimiser: AdamW, with LoRA+'s faster B matrices and GaLore's projected gradients as options.

LoRA+ (Hayou et al. 2024) is a learning-rate choice, not a module: B takes ``loraplus_ratio`` times the rate of A (the
paper's 16), through its own parameter group, so the schedule scales both alike. GaLore (Zhao et al. 2024) keeps the
Adam state of a weight matrix in a rank-``galore_rank`` projection of its gradient; it is meant for full fine-tuning
(and training from scratch). It acts on the matrices of linear layers whose both sides exceed the rank: adapter matrices
(LoRA's A is r wide) are thinner than any useful rank and train as under plain AdamW, so with an adapter GaLore changes
nothing unless its rank is set below the adapter's sides.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.optional import require
from peftlab.train.config import TrainConfig


def _linear_weights(model: nn.Module) -> set[int]:
    """Ids of the weight matrices of linear layers (GPT-2's Conv1D included): what GaLore projects."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def is_lora_b(name: str) -> bool:
    """Whether a parameter is a LoRA B matrix (the one LoRA+ speeds up)."""
    return name.rsplit(".", 1)[-1] == "lora_B"


def param_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]], lr: float, config: TrainConfig) -> list[dict]:
    """The optimiser's groups: LoRA+'s B matrices at ratio × lr, GaLore's projected matrices, the rest at lr."""
    ratio = config.loraplus_ratio
    faster = [p for n, p in named if ratio is not None and is_lora_b(n)]
    if ratio is not None and not faster:
        raise PeftlabError("--loraplus-ratio speeds up LoRA's B matrices, and this spec has no LoRA module")
    fast_ids = {id(p) for p in faster}
    projected: list[nn.Parameter] = []
    if config.optimizer == "galore":
        linear = _linear_weights(model)
        projected = [
            p
            for _, p in named
            if id(p) in linear and id(p) not in fast_ids and p.dim() == 2 and min(p.shape) > config.galore_rank
        ]
    taken = fast_ids | {id(p) for p in projected}
    groups: list[dict[str, Any]] = [{"params": [p for _, p in named if id(p) not in taken], "lr": lr}]
    if faster:
        groups.append({"params": faster, "lr": lr * ratio, "loraplus": True})
    if projected:
        galore = {"rank": config.galore_rank, "update_proj_gap": config.galore_update_gap}
        groups.append({"params": projected, "lr": lr, **galore, "scale": config.galore_scale, "proj_type": "std"})
    return [g for g in groups if g["params"]]


def make_optimiser(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], lr: float, config: TrainConfig
) -> torch.optim.Optimizer:
    """torch's AdamW, or galore-torch's AdamW (which is AdamW on the groups without a rank)."""
    groups = param_groups(model, named, lr, config)
    if config.optimizer != "galore":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes, imported by galore-torch, talks about kernels it lacks
        galore = require("galore_torch", "--optimizer galore")
    return galore.GaLoreAdamW(groups, lr=lr, weight_decay=config.weight_decay, no_deprecation_warning=True)
