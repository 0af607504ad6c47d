"""The frozen-prefix activation cache (``--cache-frozen``): the hidden states entering the lowest layer an adapter
touches, computed once per example and reused across steps, epochs and the trials of one worker.

When nothing of the adapter acts below layer k (no prompt, no trained embeddings, no module in layers 0..k-1), the
hidden states entering layer k are a function of the input alone, provided the layers below run in eval mode. With
the cache they do: **dropout is off below k** (at dropout 0 a run gives the uncached run's results, up to float
rounding: an example's states may be computed in a batch padded to another length). A step then skips the blocks
below k (the embeddings, cheap, still run: the model builds its attention mask from them) and runs layers k.. and
the head; as without the cache, nothing is back-propagated below k.

k is read off the built model, not off kind names: each host module the adapter's callbacks sit on and each backbone
tensor it trains in place is placed in the forward pass, by its block, or, outside the blocks, by the order in which
one two-token forward calls it (before the first block: k = 0; between blocks i and i+1: i+1; after the last: no
limit, e.g. the task head). A host that contains the blocks (a hook on the whole model, as prompt tuning's) or that
the probe never calls counts as layer 0: no cache. Model-wide switches (prefix attention, which also changes how
masks are built) are part of the cache key rather than of k: they reach every layer.

Storage: per example, keyed by its token ids (so another split, ``k``, seed or input limit never reads another
example's states), unpadded, on the model's device, in a table per frozen part: the sampled weights and sums of every
tensor below k with the config, k, the live model-wide switches, the dtype and autocast. An example's ids say which
split it is in, so the split needs no place in the key. The tables share one byte budget (``cache_frozen_mb``);
when a run's table needs room, other tables go first (least recently used first); then examples beyond the budget
are computed on the fly each time they come, never evicting others: a training set is read in a new random order
every epoch, and for such cyclic reads keeping a fixed part gives more hits than evicting the oldest entry, which
always evicts what comes next.

Families: encoder models (the bert family: BERT, RoBERTa, MiniLM), whose batches are padded on the right and whose
positions do not depend on padding, so an example's states are the same in any batch. Decoders (padded on the left,
positions and rotary embeddings that depend on the padding) and T5 (the first layer's position bias feeds the rest)
are refused with one line.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftlab.backbone.anatomy import model_type_facts
from peftlab.core.peft_model import PeftModel
from peftlab.errors import PeftlabError

#: the architecture the cache supports (see the module docstring)
SUPPORTED = "encoder"
#: elements sampled from each tensor below k for the key (with the tensor's sum, which sees every element)
_SAMPLE = 4096
#: config entries that do not change the states below k: the head's, the dropouts' (the layers below k run in eval
#: mode), the dtype (keyed as the weights'), provenance
_NOT_BELOW = frozenset(
    {
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "architectures",
        "classifier_dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "_name_or_path",
    }
)


class _Captured(Exception):
    """Ends a forward pass once the states entering layer k are taken."""


@dataclass
class Probe:
    """One forward pass's order of calls: each module's first call, and the counter where each block starts and
    ends; ``tensors``: whether every block returned a plain tensor (what skipping a block must return too)."""

    first: dict[int, int] = field(default_factory=dict)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    tensors: bool = True


def probe(pm: PeftModel) -> Probe:
    """Run two tokens through the model in eval mode (no gradients, the random state untouched) and note the
    order in which its modules are first called."""
    base, blocks = pm.base_model, pm.blocks
    counter = itertools.count()
    found = Probe(ends=[-1] * len(blocks))
    handles = [m.register_forward_pre_hook(functools.partial(_first_call, found, counter)) for m in base.modules()]
    handles += [b.module.register_forward_hook(functools.partial(_block_end, found, counter, b.index)) for b in blocks]
    device = next(base.parameters()).device
    token = min(5, base.config.vocab_size - 1)
    dummy = {
        "input_ids": torch.full((1, 2), token, dtype=torch.long, device=device),
        "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device),
    }
    was_training = pm.training
    pm.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            pm(**dummy)
    finally:
        for h in handles:
            h.remove()
        pm.train(was_training)
    found.starts = [found.first.get(id(b.module), -1) for b in blocks]
    return found


def _first_call(found: Probe, counter: Iterator[int], module: nn.Module, args: tuple) -> None:
    found.first.setdefault(id(module), next(counter))


def _block_end(found: Probe, counter: Iterator[int], index: int, module: nn.Module, args: tuple, out: Any) -> None:
    found.ends[index] = next(counter)
    found.tensors = found.tensors and isinstance(out, torch.Tensor)


def touched(pm: PeftModel, backward: bool = False) -> list[nn.Module]:
    """The backbone modules the active adapter acts on: its callbacks' hosts and the owners of the backbone tensors
    it trains in place (``backward``: only the hosts a training step back-propagates through, see
    :meth:`~peftlab.core.hooks.HookRegistry.hosts`)."""
    name = pm.active_adapter
    if name is None:
        return []
    trained = {id(p) for _, m in pm.adapters[name].all_modules() for p in m.backbone_parameters()}
    owners = [m for m in pm.base_model.modules() if any(id(p) in trained for p in m.parameters(recurse=False))]
    return [*pm.hooks.hosts(name, backward), *owners]


def first_layer(pm: PeftModel, found: Probe) -> tuple[int, str]:
    """k, the lowest layer the active adapter acts on (the number of layers when it acts above them all, e.g. only
    the task head), and the module that decided it."""
    blocks = pm.blocks
    if any(s < 0 for s in found.starts) or any(e < 0 for e in found.ends):
        return 0, "a block the probe forward did not run"
    in_block = {id(m): b.index for b in blocks for m in b.module.modules()}
    named = list(pm.base_model.named_modules())
    stack = next(n for n, m in named if m is blocks[0].module)
    containing = {id(m) for n, m in named if not n or stack.startswith(n + ".")}
    names = {id(m): n or type(m).__name__ for n, m in named}
    k, where = len(blocks), "nothing below the task head"
    for host in touched(pm):
        layer = _layer_of(id(host), in_block, containing, found)
        if layer < k:
            k, where = layer, names.get(id(host), type(host).__name__)
    return k, where


def _ids(module: nn.Module) -> set[int]:
    return {id(m) for m in module.modules()}


def _layer_of(host: int, in_block: dict[int, int], containing: set[int], found: Probe) -> int:
    """The layer a host module acts in: its block's; for modules outside the blocks, the first block that runs
    after it (0 for modules that contain the blocks or never ran: they could act anywhere)."""
    if host in in_block:
        return in_block[host]
    first = found.first.get(host)
    if host in containing or first is None:
        return 0
    for i, (start, end) in enumerate(zip(found.starts, found.ends, strict=True)):
        if first < start:
            return i  # before block i: it changes what enters it
        if first < end:
            return i  # called while block i runs
    return len(found.starts)


def _tensor_digest(h: Any, name: str, t: torch.Tensor) -> None:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to("cpu")
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{float(flat.double().sum())!r}".encode())
    h.update(sample.contiguous().view(torch.uint8).numpy().tobytes())


def frozen_part(pm: PeftModel, k: int, found: Probe) -> list[nn.Module]:
    """The modules whose computation makes the states entering layer k: the blocks below k and the modules outside
    the blocks that run before the first one (the embeddings)."""
    blocks = pm.blocks
    in_blocks = {i for b in blocks for i in _ids(b.module)}
    before = [
        m
        for m in pm.base_model.modules()
        if id(m) not in in_blocks and found.first.get(id(m), len(found.first)) < found.starts[0]
    ]
    return before + [m for b in blocks[:k] for m in b.module.modules()]


def table_key(pm: PeftModel, k: int, found: Probe) -> str:
    """What the states entering layer k depend on besides the input and the autocast: the config (less the head's
    and the dropouts' entries), every tensor below k (sampled, and summed), k, the live model-wide switches, and the
    dtype and device they are computed in."""
    h = hashlib.sha256()
    config = {k: v for k, v in pm.config.to_dict().items() if k not in _NOT_BELOW}
    config["attention"] = getattr(pm.config, "_attn_implementation", None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for i, m in enumerate(frozen_part(pm, k, found)):
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            _tensor_digest(h, f"{i}.{name}", t)
    live = sorted(f"{s.__module__}.{s.__qualname__}" for s in _live_switches(pm))
    p = next(pm.base_model.parameters())
    h.update(json.dumps([k, live, str(p.dtype), str(p.device)]).encode())
    return h.hexdigest()


def _autocast(device: torch.device) -> str:
    """The autocast the states are computed in (a key part known only when they are: the loop autocasts steps)."""
    if not torch.is_autocast_enabled(device.type):
        return "none"
    return str(torch.get_autocast_dtype(device.type))


def _live_switches(pm: PeftModel) -> set[Any]:
    if pm.active_adapter is None:
        return set()
    return {
        switch for _, m in pm.adapters[pm.active_adapter].all_modules() if not m.merged for switch in m.model_switches
    }


class FrozenCache:
    """A worker's cached states: one table per key (:func:`table_key`), all under one byte budget. A search
    worker keeps one beside its backbone (:class:`~peftlab.train.warm.WarmStart`), so its trials share it."""

    def __init__(self) -> None:
        #: tables in order of last use, least recent first: example key -> its states (tokens, hidden)
        self.tables: dict[str, dict[bytes, torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def table(self, key: str) -> dict[bytes, torch.Tensor]:
        """The table for ``key``, made the most recently used."""
        table = self.tables.pop(key, None)
        self.tables[key] = {} if table is None else table
        self.sizes.setdefault(key, 0)
        return self.tables[key]

    def put(self, key: str, example: bytes, states: torch.Tensor, budget: int) -> bool:
        """Keep an example's states if the budget allows, after dropping other tables (least recently used first)
        if need be; False when they are not kept."""
        size = states.numel() * states.element_size()
        for other in list(self.tables):
            if self.nbytes + size <= budget:
                break
            if other != key:
                del self.tables[other], self.sizes[other]
        if self.nbytes + size > budget:
            return False
        self.tables[key][example] = states
        self.sizes[key] += size
        return True


def _example_keys(batch: dict[str, torch.Tensor], lengths: list[int]) -> list[bytes]:
    """Each example's identity: its token ids (and token types), unpadded."""
    parts = [batch[k].to("cpu", torch.int64).numpy() for k in ("input_ids", "token_type_ids") if k in batch]
    return [b"|".join(p[i, :n].tobytes() for p in parts) for i, n in enumerate(lengths)]


def _right_padded(mask: torch.Tensor) -> bool:
    """Whether each row's tokens come first and its padding after (what the per-example states assume)."""
    return bool((mask.cumprod(dim=1).sum(dim=1) == mask.sum(dim=1)).all())


class FrozenPrefix:
    """A run's use of the cache: k for its model and spec, its table, and what it saw (hits, misses, states kept,
    states over the budget, seconds spent gathering states)."""

    def __init__(self, pm: PeftModel, cache: FrozenCache, budget_mb: float) -> None:
        facts = model_type_facts(pm.config.model_type)
        if facts.architecture != SUPPORTED:
            raise PeftlabError(
                f"--cache-frozen supports encoder models (the bert family: BERT, RoBERTa, MiniLM); "
                f"'{pm.config.model_type}' is a {facts.architecture} model"
            )
        found = probe(pm)
        if not found.tensors:
            raise PeftlabError(
                f"--cache-frozen: the blocks of this '{pm.config.model_type}' model do not return plain tensors; "
                "it supports encoder models whose blocks do (the bert family in transformers 5)"
            )
        self.pm, self.cache, self.budget = pm, cache, int(budget_mb * 2**20)
        self.layer, self.where = first_layer(pm, found)
        self.key = table_key(pm, self.layer, found) if self.layer else ""
        self.hits = self.misses = self.kept = self.over = 0
        self.elapsed = 0.0

    @property
    def active(self) -> bool:
        """Whether there is anything to cache (k > 0)."""
        return self.layer > 0

    def summary(self) -> dict[str, Any]:
        """What the run record keeps: k, what decided it, and the counts."""
        return {
            "layer": self.layer,
            "decided_by": self.where,
            "hits": self.hits,
            "misses": self.misses,
            "kept": self.kept,
            "over_budget": self.over,
            "cache_mb": self.cache.nbytes / 2**20,
        }

    @contextmanager
    def feeding(self, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the block, the model's forward on ``batch`` starts at layer k from the cached states (those not
        cached yet are computed first). A batch that is not right-padded runs uncached."""
        if not self.active or not _right_padded(batch["attention_mask"]):
            yield
            return
        start = time.perf_counter()
        states = self._states(batch)
        self.elapsed += time.perf_counter() - start
        blocks = self.pm.blocks[: self.layer]
        try:
            for b in blocks[:-1]:
                b.module.forward = _skip
            blocks[-1].module.forward = functools.partial(_hand_over, states)
            yield
        finally:
            for b in blocks:
                vars(b.module).pop("forward", None)

    def _states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The padded (batch, length, hidden) states entering layer k: from the table, or computed and kept."""
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1).tolist()
        keys = _example_keys(batch, lengths)
        key = f"{self.key}:{_autocast(mask.device)}"
        table = self.cache.table(key)
        missing = [i for i, key in enumerate(keys) if key not in table]
        computed = self._compute(batch, missing, lengths) if missing else {}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for i, rows in computed.items():
            if self.cache.put(key, keys[i], rows, self.budget):
                self.kept += 1
            else:
                self.over += 1
        rows = [computed[i] if i in computed else table[key] for i, key in enumerate(keys)]
        out = rows[0].new_zeros(mask.shape[0], mask.shape[1], rows[0].shape[-1])
        for i, (n, r) in enumerate(zip(lengths, rows, strict=True)):
            out[i, :n] = r
        return out

    @torch.no_grad()
    def _compute(self, batch: dict[str, torch.Tensor], rows: list[int], lengths: list[int]) -> dict[int, torch.Tensor]:
        """The states entering layer k of ``rows``, in one forward (eval mode) padded to their longest, stopped
        there."""
        width = max(lengths[i] for i in rows)
        index = torch.tensor(rows, device=batch["input_ids"].device)
        inputs = {k: v[index, :width] for k, v in batch.items() if k != "labels" and v.dim() == 2}
        taken: list[torch.Tensor] = []
        handle = self.pm.blocks[self.layer - 1].module.register_forward_hook(functools.partial(_take, taken))
        was_training = self.pm.training
        self.pm.eval()
        try:
            self.pm(**inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
            self.pm.train(was_training)
        states = taken[0]
        return {i: states[j, : lengths[i]].clone() for j, i in enumerate(rows)}


def _take(taken: list[torch.Tensor], module: nn.Module, args: tuple, out: torch.Tensor) -> None:
    taken.append(out.detach())
    raise _Captured


def _skip(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A block below k: its output would be thrown away."""
    return hidden_states


def _hand_over(states: torch.Tensor, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The last block below k: its output is the cached states."""
    if hidden_states.shape[:2] != states.shape[:2]:
        raise RuntimeError(
            f"the cached states are for a batch of shape {tuple(states.shape[:2])}, the forward pass got "
            f"{tuple(hidden_states.shape[:2])}; this is a peftlab bug"
        )
    return states
