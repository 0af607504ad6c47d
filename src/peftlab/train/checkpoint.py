"""Checkpoints to resume a run exactly, and the best-so-far snapshot of the trainable tensors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from peftlab.atomic import write_files
from peftlab.errors import PeftlabError, changes
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


def _modules(pm) -> dict[str, nn.Module]:
    """The active adapter's modules by key (none for a model peftlab did not build, e.g. a peft model)."""
    adapters = getattr(pm, "adapters", None)
    return dict(adapters[pm.active_adapter].all_modules()) if adapters else {}


def run_state(pm) -> dict[str, torch.Tensor]:
    """Every module's :meth:`~peftlab.modules.base.PeftModule.run_state`, keyed ``<module key>/<name>``."""
    return {f"{key}/{k}": v.detach().clone() for key, m in _modules(pm).items() for k, v in m.run_state().items()}


def load_run_state(pm, state: dict[str, torch.Tensor]) -> None:
    for key, m in _modules(pm).items():
        mine = {k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == key}
        if mine:
            m.load_run_state(mine)


def save_checkpoint(path: Path, pm, opt, sched, record: RunRecord, state: dict) -> None:
    """Everything needed to continue exactly: trainable tensors, the modules' run state, optimiser, schedule, RNG,
    record."""
    saved = {
        "trainable": snapshot(pm),
        "modules": run_state(pm),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "state": state,
    }
    write_files(path, {"state.pt": lambda p: torch.save(saved, p), "record.json": record.save})


#: settings a checkpoint must share with the run that continues it (the rest, e.g. the output, may change)
SAME_RUN = ("model", "task", "train_file", "seed", "data_seed", "k", "dev_size", "batch_size", "grad_accum")


def load_checkpoint(path: Path, pm, opt, sched, record: RunRecord) -> dict:
    """Continue from a checkpoint of the same run; one that belongs to another (another spec or data) is refused
    with what differs, and left as it is."""
    earlier = json.loads((path / "record.json").read_text())
    spec = earlier.get("spec") or {}
    theirs = {"method": spec.get("method"), "spec": spec, **{k: earlier.get("config", {}).get(k) for k in SAME_RUN}}
    mine = {"method": record.spec.get("method"), "spec": record.spec, **{k: record.config.get(k) for k in SAME_RUN}}
    diff = changes(theirs, json.loads(json.dumps(mine)))  # as JSON, as the checkpoint's record was stored
    if diff:
        shown = "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise PeftlabError(
            f"'{path}' holds the checkpoint of another run ({shown}: the checkpoint's → this command's); choose "
            "another --output, or delete that folder to start over (nothing was changed)"
        )
    try:
        saved = torch.load(path / "state.pt", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        where = path / "state.pt"
        raise PeftlabError(f"'{where}' is not a readable checkpoint ({e}); delete it to start over") from None
    restore(pm, saved["trainable"])
    load_run_state(pm, saved.get("modules", {}))
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    record.evaluations, record.best = earlier["evaluations"], earlier["best"]
    return saved["state"]
