"""What a module may know of the sequence it acts on: which positions are real tokens, and how much a KV cache holds.

Hooks on a sub-module see hidden states, never the batch's attention mask, so a per-sequence statistic (UniPELT's
gates average over the sequence) would count padding. A :class:`SequenceView` watches the forward of the module that
takes a stack's padding mask (``Block.root``: BertModel, LlamaModel, GPT2Model, each of T5's stacks) and keeps, for
the forward in progress, the 2-D mask and the number of positions the cache already holds. A module asks for the view
of its block's stack through ``BuildContext.sequence()``; the view is made, and its watching hook registered, on the
first request (one per adapter and stack), so models without such modules run no extra hook.

Causal stacks (decoders) also keep each statistic's running sums per position (:meth:`SequenceView.carry`): a
decoding step that sees only its new token continues the sums of the positions in the cache, so a running mean at
that step equals what a forward over the whole sequence gives there. The sums follow the cache when generation
reorders (beam search) or selects batch rows.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftlab.errors import PeftlabError

#: The forward argument that carries the key/value cache: ``past_key_values`` up to transformers 5.23, ``cache``
#: from 5.24 on.
CACHE_ARGS = ("cache", "past_key_values")
#: the cache attribute listing the views whose running sums follow its reordering
_VIEWS_ATTR = "_peftlab_sequence_views"


class SequenceView:
    """The padding mask and cached length of the forward in progress at one stack, for one adapter's modules."""

    merged = False  # a hook owner of the registry: never merged, live while its adapter is
    observer = True  # it reads the forward's arguments and changes nothing (see HookRegistry.hosts)

    def __init__(self, adapter_name: str, root: nn.Module, causal: bool) -> None:
        self.adapter_name = adapter_name
        self.causal = causal
        #: (batch, positions) with 1 for real tokens, or None (every position is real)
        self.mask: torch.Tensor | None = None
        #: positions the KV cache held before this forward
        self.past = 0
        #: per statistic: its cumulative sums and counts over the positions seen so far, (batch, positions, 1) each
        self._sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._signature = inspect.signature(root.forward)

    def watch(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A ``kwargs`` pre-hook on the stack's root: record the mask and the cached length, change nothing."""
        bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        bound |= bound.pop("kwargs", {})
        mask = bound.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = next((bound[k] for k in CACHE_ARGS if bound.get(k) is not None), None)
        self.past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if not self.past:
            self._sums.clear()
        if self.causal and cache is not None:
            _follow(cache, self)
        return args, kwargs

    def real(self, like: torch.Tensor) -> torch.Tensor:
        """(batch, length, 1) in ``like``'s dtype: 1 at the real tokens among the ``length`` positions of ``like``
        (batch, length, ...), the current forward's. Positions the mask does not cover (a soft prompt prepended
        after the mask was read) count as real."""
        batch, length = like.shape[0], like.shape[1]
        if self.mask is None or self.mask.shape[0] != batch:
            return like.new_ones(batch, length, 1)
        m = self.mask[:, -length:]  # the current positions are the mask's last columns
        if m.shape[1] < length:
            m = torch.cat([m.new_ones(batch, length - m.shape[1]), m], dim=1)
        return m.to(like.dtype).unsqueeze(-1)

    def carry(self, key: int, sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Running ``sums`` and ``counts`` (batch, length, 1) over this forward's positions, continued from the
        positions the cache holds; records them for the next step. Idempotent within one forward (a statistic
        computed twice, e.g. the LoRA gate shared by q and v, records the same)."""
        if self.past:
            before = self._sums.get(key)
            if before is None or before[0].shape[0] != sums.shape[0] or before[0].shape[1] < self.past:
                raise PeftlabError(
                    "a sequence-gated module cannot continue this KV cache: it was filled without this adapter's "
                    "gates (run the whole sequence again, or generate with the adapter active from the start)"
                )
            sums = sums + before[0][:, self.past - 1 : self.past]
            counts = counts + before[1][:, self.past - 1 : self.past]
            whole = (torch.cat([before[0][:, : self.past], sums.detach()], 1),)
            whole += (torch.cat([before[1][:, : self.past], counts.detach()], 1),)
        else:
            whole = (sums.detach(), counts.detach())
        self._sums[key] = whole
        return sums, counts

    def select(self, index: torch.Tensor) -> None:
        """Follow the cache's batch rows (beam search's reordering, a selection of rows)."""
        self._sums = {
            k: (s.index_select(0, index.to(s.device)), c.index_select(0, index.to(c.device)))
            for k, (s, c) in self._sums.items()
        }


def _follow(cache: Any, view: SequenceView) -> None:
    """Make ``view``'s running sums follow the cache's row reordering and selection (once per cache and view)."""
    views: list[SequenceView] | None = getattr(cache, _VIEWS_ATTR, None)
    if views is None:
        views = []
        setattr(cache, _VIEWS_ATTR, views)
        for name in ("reorder_cache", "batch_select_indices"):
            original = getattr(cache, name, None)
            if original is not None:
                setattr(cache, name, _following(original, views))
    if view not in views:
        views.append(view)


def _following(original: Any, views: list[SequenceView]) -> Any:
    def method(index: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(index, *args, **kwargs)
        for view in views:
            view.select(index)
        return out

    return method
