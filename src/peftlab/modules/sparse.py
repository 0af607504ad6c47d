"""Selective tuning beyond biases and norms: sparse updates (FishMask, LT-SFT, DiffPruning), whole sites or layers
(cross-attention tuning, top-k layer tuning) and DiffFit's scale factors.

Like :mod:`peftlab.modules.selective`, every kind trains a *delta* beside the backbone tensors it tunes, added in a
hook and merged by addition, so the backbone stays intact and several adapters can coexist.

Sparse updates (the survey's sparse-selective methods) change a few entries of the linear weights: W + ΔW where ΔW is
zero outside a mask. ΔW is a trained vector of values scattered into the masked positions, then one matmul with the
site input. Measured on CPU (one thread, 2048 tokens, MiniLM's 384 × 384 and 384 × 1536 weights, 0.5% and 5%
density, forward and backward): scattering the values costs what a dense delta multiplied by a fixed mask costs
(both are the dense matmul, within timing noise of each other: 94 vs 82 ms, 102 vs 110 ms at 0.5% of the larger
weights), and gathering the masked inputs with an ``index_add`` into the output is no faster at 0.5% (1 to 1.5 times
the time) and 10 to 20 times slower at 5%; the scattered vector is kept because only its k values are
parameters (the masked dense delta would give the optimiser the whole matrix). The adapter file holds the values and
their positions (int32 where the positions fit), never the dense delta: *stored* counts values plus indices,
*changed* the entries the mask lets change.

FishMask and LT-SFT share one mask over every placed weight (a shared part), so the top entries are chosen across the
whole model, as the papers choose them, while the saved shapes stay what the spec says. Both choose their mask from
training data through the kind's ``prepare`` hook (see :mod:`peftlab.modules.base`); without data (counting,
``peftlab show``, a spec applied by hand) the mask is a seeded random one of the same size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.backbone.anatomy import Block, LinearRef
from peftlab.errors import SpecError
from peftlab.modules.base import Batches, BuildContext, PeftModule, Settings, need_float, need_int, register
from peftlab.modules.linear import LinearModule
from peftlab.modules.saliency import gradient_sums
from peftlab.modules.selective import LNTune, model_norms


def site_view(ref: LinearRef, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, shaped like the host's weight (its gradient, its change), as the site's (out, in) view."""
    t = tensor.T if ref.transposed else tensor
    return t if ref.out_slice is None else t[ref.out_slice]


def index_dtype(total: int) -> torch.dtype:
    """Positions as int32 where they fit: half the file of int64."""
    return torch.int32 if total < 2**31 else torch.int64


def random_positions(total: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct sorted positions in [0, total) drawn from ``seed``: the mask without data. Large totals draw
    with rejection, so memory stays O(k) (a permutation of a 7B model's positions would not fit)."""
    g = torch.Generator().manual_seed(seed)
    if total <= 1 << 24:
        return torch.randperm(total, generator=g)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        chosen = torch.unique(torch.cat([chosen, torch.randint(total, (2 * (k - chosen.numel()),), generator=g)]))
    return chosen[torch.randperm(chosen.numel(), generator=g)[:k]].sort().values


def top_positions(scores: list[torch.Tensor], k: int) -> torch.Tensor:
    """Sorted positions of the ``k`` largest scores over the tensors laid end to end (flattened, in order). Each
    tensor offers its own top k first, so memory stays O(tensors · k) rather than the model's size."""
    values, positions, offset = [], [], 0
    for s in scores:
        flat = s.detach().reshape(-1).float()
        top = flat.topk(min(k, flat.numel()))
        values.append(top.values.cpu())
        positions.append(top.indices.cpu() + offset)
        offset += flat.numel()
    chosen = torch.cat(values).topk(k).indices
    return torch.cat(positions)[chosen].sort().values


def _same(placed: list[Settings], fields: tuple[str, ...]) -> None:
    if len({tuple(getattr(s, f) for f in fields) for s in placed}) > 1:
        shared = ", ".join(fields)
        raise SpecError(f"all {placed[0].kind} sites of one adapter must share {shared} (one mask serves them all)")


# -- a shared sparse mask ----------------------------------------------------------------------------------------
class SparseMask(nn.Module):
    """One adapter's mask over every site of its kind: ``indices``, sorted positions in the sites' weights laid end
    to end (placement order, each weight row-major as (out, in)), and the trained ``values`` there."""

    def __init__(self, sizes: list[int], k: int, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        total = sum(sizes)
        self.offsets = [0, *itertools.accumulate(sizes)]
        if torch.device(device).type == "meta":
            positions = torch.empty(k, dtype=torch.int64, device="meta")
        else:
            positions = random_positions(total, k, seed)
        self.register_buffer("indices", positions.to(device=device, dtype=index_dtype(total)))
        self.values = nn.Parameter(torch.zeros(k, device=device, dtype=dtype))
        self._cuts: tuple[tuple[int, int], list[int]] | None = None

    def changed_numel(self) -> int:
        """The entries the mask lets change (the indices are stored, but change nothing)."""
        return self.values.numel()

    def choose(self, positions: torch.Tensor) -> None:
        """Make ``positions`` (sorted, global) the mask, with zero values (the model as the backbone)."""
        with torch.no_grad():
            self.indices.copy_(positions.to(self.indices.device, self.indices.dtype))
            self.values.zero_()

    def segment(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``site``'s entries: positions within its flattened weight, and their values."""
        version = (self.indices.data_ptr(), self.indices._version)
        if self._cuts is None or self._cuts[0] != version:  # chosen or loaded since: find each site's run again
            edges = torch.tensor(self.offsets, dtype=self.indices.dtype, device=self.indices.device)
            self._cuts = (version, torch.searchsorted(self.indices, edges).tolist())
        lo, hi = self._cuts[1][site], self._cuts[1][site + 1]
        return self.indices[lo:hi].long() - self.offsets[site], self.values[lo:hi]


class SparseDelta(LinearModule):
    """W + ΔW at one linear site, ΔW the site's share of the adapter's :class:`SparseMask` scattered into place."""

    def __init__(self, ctx: BuildContext, mask: SparseMask, position: int) -> None:
        super().__init__(ctx)
        self._mask = (mask,)  # shared: not a submodule, so it is stored and counted once
        self.position = position

    @property
    def mask(self) -> SparseMask:
        return self._mask[0]

    def weight_delta(self) -> torch.Tensor:
        local, values = self.mask.segment(self.position)
        out, inp = self.ref.out_features, self.ref.in_features
        return values.new_zeros(out * inp).index_put((local,), values).view(out, inp)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.weight_delta()
        return F.linear(x.to(delta.dtype), delta).to(y.dtype)

    def flops_per_token(self) -> float:
        return 2.0 * self.ref.in_features * self.ref.out_features  # the scattered delta's dense matmul

    def changed_numel(self) -> int:
        return 0  # counted once, at the shared mask


@dataclass
class MaskSettings(Settings):
    """Base of the kinds that train a fixed sparse mask of the linear weights: ``density`` of the placed weights'
    entries, chosen over all of them together; ``seed`` draws the mask used without data."""

    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 1e-3

    density: float = 0.005
    seed: int = 0

    def check(self) -> None:
        need_float("density", self.density, 0.0, 1.0, low_open=True)
        need_int("seed", self.seed, 0)

    @classmethod
    def plan(cls, placed: list[Settings]) -> None:
        _same(placed, tuple(f for f in cls.__dataclass_fields__))

    def build(self, ctx: BuildContext) -> PeftModule:
        placed = ctx.placed or [(ctx.block, ctx.site)]
        sizes = [ref.out_features * ref.in_features for ref in (block.linear(site) for block, site in placed)]
        k = max(1, round(self.density * sum(sizes)))
        mask = ctx.share(f"{self.kind}_mask", lambda: SparseMask(sizes, k, self.seed, ctx.device, ctx.dtype))
        position = next(i for i, (block, site) in enumerate(placed) if block is ctx.block and site == ctx.site)
        module = SparseDelta(ctx, mask, position)
        module.settings = self
        return module

    @staticmethod
    def _deltas(modules: list[PeftModule]) -> list[SparseDelta]:
        return sorted((m for m in modules if isinstance(m, SparseDelta)), key=lambda m: m.position)


def _host_weights(refs: list[LinearRef]) -> list[nn.Parameter]:
    """The host weights of the sites, once each (GPT-2's q, k and v share one)."""
    return list({id(r.module.weight): r.module.weight for r in refs}.values())


def fisher(model: nn.Module, refs: list[LinearRef], batches: Iterator[dict[str, torch.Tensor]], samples: int):
    """The diagonal empirical Fisher of each site's weight: squared per-example gradients of the loss (the true
    labels'), summed over ``samples`` examples, the model in eval mode (no dropout)."""
    weights = _host_weights(refs)
    sums = dict(zip(map(id, weights), gradient_sums(model, weights, batches, samples, squared=True), strict=True))
    return [site_view(r, sums[id(r.module.weight)]) for r in refs]


@register
@dataclass
class FishMaskSettings(MaskSettings):
    """FishMask (Sung et al. 2021): a fixed mask of the ``density`` entries with the largest diagonal Fisher
    information, estimated on ``samples`` training examples before the first step (1024 in the paper), and only
    they train. The mask covers the placed linear weights (the paper ranks every parameter)."""

    kind = "fishmask"
    samples: int = 1024

    def check(self) -> None:
        super().check()
        need_int("samples", self.samples, 1)

    @classmethod
    def prepare(cls, model: nn.Module, modules: list[PeftModule], batches: Batches) -> None:
        deltas = cls._deltas(modules)
        if deltas:
            mask = deltas[0].mask
            scores = fisher(model, [d.ref for d in deltas], batches(), deltas[0].settings.samples)
            mask.choose(top_positions(scores, mask.values.numel()))


@register
@dataclass
class LtSftSettings(MaskSettings):
    """LT-SFT (Ansell et al. 2022), lottery-ticket sparse fine-tuning: fine-tune the whole model for ``steps`` steps
    (AdamW at ``lr``), keep as the mask the ``density`` entries of the placed weights that moved most, put every
    weight back, then train only the mask. The paper's first phase is a full fine-tuning as long as the second;
    here it is short (``steps``)."""

    kind = "lt-sft"
    steps: int = 100
    lr: float = 2e-5

    def check(self) -> None:
        super().check()
        need_int("steps", self.steps, 1)
        need_float("lr", self.lr, 0.0, low_open=True)

    @classmethod
    def prepare(cls, model: nn.Module, modules: list[PeftModule], batches: Batches) -> None:
        deltas = cls._deltas(modules)
        if not deltas:
            return
        s, mask, refs = deltas[0].settings, deltas[0].mask, [d.ref for d in deltas]
        adapter = model.adapters[model.active_adapter]
        params = list(model.base_model.parameters())
        params += [p for p in adapter.parameters() if p.requires_grad and p is not mask.values]  # e.g. the head
        saved = [p.detach().clone() for p in params]
        flags, was = [p.requires_grad for p in params], model.training
        start = {id(w): saved[i] for i, p in enumerate(params) for w in _host_weights(refs) if p is w}
        try:
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
            model.train()
            for batch in itertools.islice(batches(), s.steps):
                opt.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
                opt.step()
            moved = [site_view(r, (r.module.weight.detach() - start[id(r.module.weight)]).abs()) for r in refs]
            chosen = top_positions(moved, mask.values.numel())
        finally:
            with torch.no_grad():
                for p, before, flag in zip(params, saved, flags, strict=True):
                    p.copy_(before)
                    p.requires_grad_(flag)
                    p.grad = None
            mask.values.grad = None
            model.train(was)
        mask.choose(chosen)


# -- DiffPruning -------------------------------------------------------------------------------------------------
#: the hard-concrete distribution's stretch (gamma, zeta) and temperature (beta), Louizos et al. 2018
GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0
#: log alpha of a gate loaded shut / open (deterministic gate exactly 0 / 1)
_SHUT, _OPEN = -10.0, 10.0


class L0Penalty:
    """DiffPruning's objective: the task loss plus ``weight`` times the expected L0 norm of the diff vector (the
    expected number of open gates, summed over entries). The default weight is the paper's lambda."""

    default_weight = 1.25e-7

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], out, weight: float) -> torch.Tensor:
        adapter = model.adapters[model.active_adapter]
        live = [m for _, m in adapter.all_modules() if isinstance(m, DiffPruning) and not m.fixed]
        return out.loss + weight * sum(m.expected_l0() for m in live) if live else out.loss


@register
@dataclass
class DiffPruningSettings(Settings):
    """DiffPruning (Guo et al. 2021): a dense diff vector w and, per entry, a hard-concrete gate z (Louizos et al.'s
    L0 relaxation, log alpha starting at ``alpha_init``); training uses ΔW = w ⊙ z with sampled gates and adds the
    expected L0 (:class:`L0Penalty`). The final update keeps the ``density`` entries of each weight with the largest
    |w ⊙ z| (deterministic gates): what evaluation, merging and the adapter file use. It trains twice the placed
    weights' entries and changes ``density`` of them. The paper's second phase, magnitude projection to the target
    density and then fine-tuning the diff under that fixed mask without the penalty, takes the last ``fixed_fraction``
    of the run's optimiser steps (the paper runs it as extra epochs; 0 leaves it out)."""

    kind = "diffpruning"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4
    training_loss = L0Penalty()

    density: float = 0.005
    alpha_init: float = 5.0
    fixed_fraction: float = 0.25

    def check(self) -> None:
        need_float("density", self.density, 0.0, 1.0, low_open=True)
        need_float("alpha_init", self.alpha_init, -10.0, 10.0)
        need_float("fixed_fraction", self.fixed_fraction, 0.0, 1.0)
        if self.fixed_fraction >= 1.0:
            raise SpecError(f"fixed_fraction must be below 1 (the mask is learned first), got {self.fixed_fraction!r}")

    def build(self, ctx: BuildContext) -> PeftModule:
        return DiffPruning(ctx, self)

    @classmethod
    def after_step(cls, modules: list[PeftModule], step: int, total: int) -> None:
        """Project to the fixed mask once the run enters its last ``fixed_fraction`` (again after a resume)."""
        for m in (m for m in modules if isinstance(m, DiffPruning)):
            if m.fixed_fraction > 0 and not m.fixed and step >= math.ceil(total * (1.0 - m.fixed_fraction)):
                m.fix()


class DiffPruning(LinearModule):
    """The dense diff and its gates (trained), and the final sparse update (``indices``/``values`` buffers).

    The buffers follow the dense parameters: after these change (a step, a restored checkpoint) the final update is
    chosen again when next used. Loading writes the buffers; the dense parameters then follow them (the loaded
    entries open, the rest shut), so training may go on from a loaded adapter. Once :meth:`fix`-ed (the second
    phase), training uses the deterministic gates, exactly the kept entries, and the penalty leaves it out."""

    def __init__(self, ctx: BuildContext, s: DiffPruningSettings) -> None:
        super().__init__(ctx)
        self.fixed, self.fixed_fraction = False, s.fixed_fraction
        out, inp = ctx.linear.out_features, ctx.linear.in_features
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.diff = nn.Parameter(torch.zeros(out, inp, **kw))
        self.log_alpha = nn.Parameter(torch.full((out, inp), float(s.alpha_init), **kw))
        k = max(1, round(s.density * out * inp))
        self.register_buffer("indices", torch.arange(k, device=ctx.device, dtype=index_dtype(out * inp)))
        self.register_buffer("values", torch.zeros(k, **kw))
        self._synced = self._versions()

    def _versions(self) -> tuple[int, ...]:
        tensors = (self.diff, self.log_alpha, self.indices, self.values)
        return tuple(v for t in tensors for v in (t.data_ptr(), t._version))

    @torch.no_grad()
    def _sync(self) -> None:
        """Bring the dense parameters and the final update in line with whichever changed last."""
        now = self._versions()
        if now == self._synced or self.diff.device.type == "meta":
            return
        if now[4:] != self._synced[4:]:  # the buffers were written (a load): open the loaded entries only
            idx = self.indices.long()
            self.diff.zero_().view(-1)[idx] = self.values.to(self.diff.dtype)
            self.log_alpha.fill_(_SHUT).view(-1)[idx] = _OPEN
        else:  # the dense parameters moved: choose the final update again
            final = (self.diff * self._gate_mean()).reshape(-1)
            idx = final.abs().topk(self.values.numel()).indices.sort().values
            self.indices.copy_(idx.to(self.indices.dtype))
            self.values.copy_(final[idx])
        self._synced = self._versions()

    @torch.no_grad()
    def fix(self) -> None:
        """The second phase: keep the final update's entries (magnitude projection), open their gates and shut the
        rest; from here the gates are constants and only those entries of the diff change the model."""
        idx, values = self.final()
        idx = idx.long()
        self.diff.zero_().view(-1)[idx] = values.to(self.diff.dtype)
        self.log_alpha.fill_(_SHUT).view(-1)[idx] = _OPEN
        self.fixed = True

    def _gate_mean(self) -> torch.Tensor:
        """The deterministic gate (test time in Louizos et al.)."""
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def _gate_sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1.0 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """The expected number of non-zero gates: sum of P(z != 0)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()

    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final sparse update: positions in the flattened weight, and values."""
        self._sync()
        return self.indices, self.values

    def weight_delta(self) -> torch.Tensor:
        idx, values = self.final()
        out, inp = self.ref.out_features, self.ref.in_features
        return values.new_zeros(out * inp).index_put((idx.long(),), values).view(out, inp)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._sync()
            if self.fixed:
                with torch.no_grad():
                    gate = self._gate_mean()  # exactly 0 or 1: no gradient to the gates
            delta = self.diff * (gate if self.fixed else self._gate_sample())
        else:
            delta = self.weight_delta()
        return F.linear(x.to(delta.dtype), delta).to(y.dtype)

    def flops_per_token(self) -> float:
        return 2.0 * self.ref.in_features * self.ref.out_features

    def stored_state(self) -> dict[str, torch.Tensor]:
        idx, values = self.final()
        return {"indices": idx.detach(), "values": values.detach()}

    def load_targets(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices, "values": self.values}

    def stored_numel(self) -> int:
        return 2 * self.values.numel()

    def changed_numel(self) -> int:
        return self.values.numel()


# -- whole sites and layers ---------------------------------------------------------------------------------------
def in_top(block: Block, blocks: list[Block], top: int) -> bool:
    """Whether ``block`` is among the ``top`` last blocks of its stack (T5's encoder and decoder each have theirs)."""
    stack = [b for b in blocks if b.stack is block.stack]
    return stack.index(block) >= len(stack) - top


@register
@dataclass
class UnfreezeSettings(Settings):
    """Train a site's own tensors, as full fine-tuning does there, as a zero-initialised delta beside them: a linear
    site's weight and bias, a norm site's gains and biases. ``top`` > 0 keeps it to the ``top`` last blocks of each
    stack (top-k layer tuning); 0: wherever placed (cross-attention tuning)."""

    kind = "unfreeze"
    roles = frozenset({"linear", "norm"})
    mergeable = True
    default_lr = 2e-5  # full fine-tuning's (UniPELT's appendix B): these are the backbone's own tensors

    top: int = 0

    def check(self) -> None:
        need_int("top", self.top, 0)

    def build(self, ctx: BuildContext) -> PeftModule | None:
        if ctx.block is None:
            hosts = model_norms(ctx)
            return LNTune(ctx, hosts) if hosts else None
        if self.top and not in_top(ctx.block, ctx.blocks, self.top):
            return None
        if ctx.linear is None:
            return LNTune(ctx, ctx.block.norms())
        return DenseDelta(ctx)


class DenseDelta(LinearModule):
    """A dense ΔW (and Δb where the host has a bias) at one linear site."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.weight = nn.Parameter(torch.zeros(ctx.linear.out_features, ctx.linear.in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(ctx.linear.out_features, **kw)) if ctx.linear.bias is not None else None

    def weight_delta(self) -> torch.Tensor:
        return self.weight

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(y.dtype) if self.bias is not None else None
        return F.linear(x.to(y.dtype), self.weight.to(y.dtype), bias)

    def flops_per_token(self) -> float:
        return 2.0 * self.ref.in_features * self.ref.out_features

    def merge(self) -> None:
        super().merge()
        if self.bias is not None:
            with torch.no_grad():
                self.ref.bias.add_(self.bias.to(self.ref.bias.dtype))

    def unmerge(self) -> None:
        super().unmerge()
        if self.bias is not None:
            with torch.no_grad():
                self.ref.bias.sub_(self.bias.to(self.ref.bias.dtype))

    def changed_numel(self) -> int:
        return self.own_numel()


# -- DiffFit -----------------------------------------------------------------------------------------------------
@register
@dataclass
class DiffFitSettings(Settings):
    """DiffFit (Xie et al. 2023): the biases, and with ``scale`` a learned per-channel factor gamma (starting at 1)
    on the site's output, which at a sub-layer's output projection scales its residual branch. The norms train
    beside it (the preset places LayerNorm tuning)."""

    kind = "difffit"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 1e-3

    scale: bool = False

    def check(self) -> None:
        if not isinstance(self.scale, bool):
            raise SpecError(f"scale must be true or false, got {self.scale!r}")

    def build(self, ctx: BuildContext) -> PeftModule | None:
        if not self.scale and ctx.linear.bias is None:
            return None  # a bias-free projection (Llama, T5) has nothing to tune without a scale
        return DiffFit(ctx, self.scale)


class DiffFit(LinearModule):
    """y -> gamma ⊙ (y + Δb): merged as W <- gamma ⊙ W, b <- gamma ⊙ (b + Δb)."""

    def __init__(self, ctx: BuildContext, scale: bool) -> None:
        super().__init__(ctx)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        n = ctx.linear.out_features
        self.gamma = nn.Parameter(torch.ones(n, **kw)) if scale else None
        self.bias = nn.Parameter(torch.zeros(n, **kw)) if ctx.linear.bias is not None else None

    def flops_per_token(self) -> float:
        return 0.0  # elementwise

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        base = y if self.ref.out_slice is None else y[..., self.ref.out_slice]
        out = base + self.bias.to(y.dtype) if self.bias is not None else base
        if self.gamma is not None:
            out = out * self.gamma.to(y.dtype)
        return out - base

    def merge(self) -> None:
        with torch.no_grad():
            if self.bias is not None:
                self.ref.bias.add_(self.bias.to(self.ref.bias.dtype))
            if self.gamma is not None:
                self.ref.weight.mul_(self.gamma[:, None].to(self.ref.weight.dtype))
                if self.ref.bias is not None:
                    self.ref.bias.mul_(self.gamma.to(self.ref.bias.dtype))
        self.merged = True

    def unmerge(self) -> None:
        with torch.no_grad():
            if self.gamma is not None:
                self.ref.weight.div_(self.gamma[:, None].to(self.ref.weight.dtype))
                if self.ref.bias is not None:
                    self.ref.bias.div_(self.gamma.to(self.ref.bias.dtype))
            if self.bias is not None:
                self.ref.bias.sub_(self.bias.to(self.ref.bias.dtype))
        self.merged = False

    def changed_numel(self) -> int:
        """The weight rows gamma rescales and the biases it shifts or rescales."""
        bias = self.ref.bias.numel() if self.ref.bias is not None else 0
        return (self.ref.weight.numel() if self.gamma is not None else 0) + bias
