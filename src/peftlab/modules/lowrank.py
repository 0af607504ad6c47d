"""Adaptive and generalised low-rank updates of one weight matrix: AdaLoRA and GLoRA.

Both are :class:`~peftlab.modules.linear.LinearModule` s (an output delta from the site input, a weight delta for
merging). AdaLoRA follows peft 0.21's ``AdaLoraConfig`` / ``RankAllocator`` exactly (parameters, initialisation,
scaling, importance scores, budget schedule and orthogonality regulariser), so an adapter exports to peft's ADALORA
format with the same outputs (:mod:`peftlab.formats.interop`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import SpecError
from peftlab.modules.base import BuildContext, PeftModule, Settings, need_float, need_int, register
from peftlab.modules.linear import LinearModule
from peftlab.modules.reparam import _same


# -- AdaLoRA ---------------------------------------------------------------------------------------------
class OrthogonalityLoss:
    """AdaLoRA's training objective: the task loss plus ``orth_reg_weight`` times the mean over P and Q of every
    trained AdaLoRA matrix of ||PPᵀ − I||_F (resp. ||QᵀQ − I||_F), peft's ``AdaLoraModel.forward``. ``weight``
    (the run's ``consistency`` setting) scales the settings' weight: 1 keeps it, 0 turns it off."""

    default_weight = 1.0

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], out: Any, weight: float) -> torch.Tensor:
        terms = [m.orthogonality() for m in model.modules() if isinstance(m, AdaLoRA) and m.lora_A.requires_grad]
        if not terms:
            return out.loss
        return out.loss + weight * torch.stack(terms).mean()


@register
@dataclass
class AdaLoraSettings(Settings):
    """AdaLoRA (Zhang et al. 2023): dW = (alpha / init_r)·P·diag(Λ)·Q in SVD form, P (out × r), Q (r × in) kept near
    orthogonal by a regulariser; during training the least important singular values are masked until the adapter's
    budget falls from init_r to target_r per matrix on average (a cubic schedule from step tinit to total − tfinal,
    masking every deltaT steps, then the final pattern is kept). Importance: |w·∂L/∂w| smoothed by an EMA (beta1)
    times its uncertainty (an EMA of the deviation, beta2). The settings are peft's ``AdaLoraConfig``'s; ``total_step``
    0 takes the training run's length."""

    kind = "adalora"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4  # as LoRA (AdaLoRA's GLUE runs use 5e-4 to 1e-3)
    training_loss = OrthogonalityLoss()

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # peft's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int = 0

    def check(self) -> None:
        need_int("init_r", self.init_r, 1, 4096)
        need_int("target_r", self.target_r, 0, 4096)
        if self.target_r > self.init_r:
            raise SpecError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        need_float("alpha", self.alpha, 0.0, low_open=True)
        need_float("dropout", self.dropout, 0.0, 0.99)
        need_int("tinit", self.tinit, 0)
        need_int("tfinal", self.tfinal, 0)
        need_int("deltaT", self.deltaT, 1)
        need_float("beta1", self.beta1, 0.0, 1.0)
        need_float("beta2", self.beta2, 0.0, 1.0)
        need_float("orth_reg_weight", self.orth_reg_weight, 0.0)
        need_int("total_step", self.total_step, 0)
        if self.total_step and self.tinit >= self.total_step - self.tfinal:
            raise SpecError(
                f"tinit ({self.tinit}) must be below total_step - tfinal ({self.total_step - self.tfinal}): "
                "the budget schedule needs steps to prune in"
            )

    @classmethod
    def plan(cls, placed: list[Settings]) -> None:
        _same(placed, ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "total_step"), "one budget")

    def build(self, ctx: BuildContext) -> PeftModule:
        return AdaLoRA(ctx, self)

    @classmethod
    def after_step(cls, modules: list[PeftModule], step: int, total: int) -> None:
        """peft's ``update_and_allocate``: smooth the importance scores, then mask to the scheduled budget."""
        live = [m for m in modules if isinstance(m, AdaLoRA) and m.lora_A.requires_grad]
        if live:
            allocate(live, step, total)


def budget(s: AdaLoraSettings, n: int, step: int, total: int) -> tuple[int, bool]:
    """The adapter's rank budget at ``step`` and whether to mask at it (peft's ``RankAllocator.budget_schedule``):
    init_r·n until tinit, then a cubic fall to target_r·n at total − tfinal, masking every deltaT steps."""
    init, target = s.init_r * n, s.target_r * n
    if step <= s.tinit:
        return init, False
    if step > total - s.tfinal:
        return target, True
    progress = 1 - (step - s.tinit) / (total - s.tfinal - s.tinit)
    return int((init - target) * progress**3 + target), step % s.deltaT == 0


def allocate(modules: list[AdaLoRA], step: int, total: int) -> None:
    """One step of peft's ``AdaLoraModel.update_and_allocate``: before the final phase, update the scores and mask
    on schedule; at total − tfinal fix the final pattern; after it keep masking by that pattern."""
    s = modules[0].settings
    total = s.total_step or total
    final = total - s.tfinal
    if step < final:
        for m in modules:
            m.update_importance()
        count, due = budget(s, len(modules), step, total)
        if due:
            _mask_to_budget(modules, count)
    elif step == final:
        for m in modules:
            m.update_importance()
        _mask_to_budget(modules, s.target_r * len(modules))
        for m in modules:
            m.reset_importance()
    else:
        for m in modules:
            if not m.masked:  # a run resumed in the final phase: the pattern is where Λ was zeroed
                m.set_mask(m.lora_E.detach().view(-1) != 0)
            m.apply_mask()


def _mask_to_budget(modules: list[AdaLoRA], count: int) -> None:
    """Keep the ``count`` most important triplets (P column, λ, Q row) over all matrices; zero the others' λ."""
    scores = [m.triplet_scores() for m in modules]
    k = sum(len(x) for x in scores) - count
    if k <= 0:
        return
    threshold = torch.kthvalue(torch.cat(scores), k).values.item()
    for m, score in zip(modules, scores, strict=True):
        m.set_mask(score > threshold)


class AdaLoRA(LinearModule):
    """P·Λ·Q with peft's names and shapes: ``lora_A`` (Q, r × in), ``lora_E`` (Λ, r × 1), ``lora_B`` (P, out × r).
    Λ starts at zero (the model unchanged), P and Q normal (std 0.02). Pruned singular values are exact zeros in Λ,
    so the kept rank is what the stored Λ shows (and what :attr:`rank` counts)."""

    def __init__(self, ctx: BuildContext, s: AdaLoraSettings) -> None:
        super().__init__(ctx)
        ref = ctx.linear
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.settings = s
        self.lora_A = nn.Parameter(torch.empty(s.init_r, ref.in_features, **kw))
        self.lora_E = nn.Parameter(torch.zeros(s.init_r, 1, **kw))
        self.lora_B = nn.Parameter(torch.empty(ref.out_features, s.init_r, **kw))
        if ctx.device.type != "meta":
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        # the budget's current mask (what the final phase keeps applying); the stored Λ's zeros are the pruned ranks
        self.register_buffer("rank_mask", torch.ones(s.init_r, dtype=torch.bool, device=ctx.device), persistent=False)
        self.scaling = s.alpha / (s.init_r + 1e-5)  # peft: lora_alpha / (ranknum + 1e-5), ranknum = init_r
        self.dropout = nn.Dropout(s.dropout) if s.dropout > 0 else None
        self._scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # EMA of importance and of its uncertainty
        self.masked = False  # whether the allocator has set rank_mask in this process (checkpoints keep Λ only)

    def flops_per_token(self) -> float:
        r, d_in = self.lora_A.shape
        return 2.0 * r * (d_in + self.lora_B.shape[0])

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.dtype)
        h = self.dropout(x) if self.dropout is not None else x
        out = F.linear(F.linear(h, self.lora_A * self.lora_E), self.lora_B) * self.scaling
        return out.to(y.dtype)

    def weight_delta(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def orthogonality(self) -> torch.Tensor:
        """The mean of ||QQᵀ − I||_F and ||PᵀP − I||_F, times the settings' weight."""
        a, b = self.lora_A, self.lora_B
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        terms = torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)
        return self.settings.orth_reg_weight * terms / 2

    @property
    def rank(self) -> int:
        """The singular values in use: the non-zero entries of Λ (all of them zero before training)."""
        return int((self.lora_E != 0).sum())

    # -- the rank allocator's per-matrix part -----------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """I = |w·∂L/∂w| per entry, smoothed (beta1), and its uncertainty |I − Ī| smoothed (beta2)."""
        s = self.settings
        for name in ("lora_A", "lora_E", "lora_B"):
            p = getattr(self, name)
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs().float()
            avg, unc = self._scores.get(name, (torch.zeros_like(ipt), torch.zeros_like(ipt)))
            avg = s.beta1 * avg + (1 - s.beta1) * ipt
            unc = s.beta2 * unc + (1 - s.beta2) * (ipt - avg).abs()
            self._scores[name] = (avg, unc)

    def reset_importance(self) -> None:
        self._scores = {}

    def run_state(self) -> dict[str, torch.Tensor]:
        """The smoothed importance and uncertainty, and the budget's mask once set."""
        state = {
            f"{name}.{part}": t
            for name, pair in self._scores.items()
            for part, t in zip(("avg", "unc"), pair, strict=True)
        }
        return state | ({"rank_mask": self.rank_mask.clone()} if self.masked else {})

    def load_run_state(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.lora_E.device
        names = {k.split(".")[0] for k in state if k != "rank_mask"}
        self._scores = {n: (state[f"{n}.avg"].to(dev), state[f"{n}.unc"].to(dev)) for n in names}
        if "rank_mask" in state:
            self.rank_mask.copy_(state["rank_mask"])
            self.masked = True

    def triplet_scores(self) -> torch.Tensor:
        """One score per singular value: its own plus the mean over its column of P and its row of Q."""
        r = self.lora_E.shape[0]
        if not self._scores:
            return torch.zeros(r, device=self.lora_E.device)
        score = {n: avg * unc for n, (avg, unc) in self._scores.items()}
        return score["lora_E"].view(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.rank_mask.copy_(keep)
        self.masked = True
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)


# -- GLoRA -----------------------------------------------------------------------------------------------
@register
@dataclass
class GloraSettings(Settings):
    """GLoRA (Chavan et al. 2023): f(x) = (W0 + W0⊙A + B)x + W0·C + b0⊙D + E + b0, every support tensor trained and
    merged back. This preset fixes one point of the paper's search space: A and B low rank (rank ``r``), C, D and E
    vectors (C over the inputs, D and E over the outputs). A, C, D and E start at zero and B = B_u·B_d with B_u zero,
    so the model starts unchanged. A host without a bias gets no C, D, E (they would add a bias it cannot merge
    into; D scales a bias it does not have)."""

    kind = "glora"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4  # as LoRA

    r: int = 4

    def check(self) -> None:
        need_int("r", self.r, 1, 4096)

    def build(self, ctx: BuildContext) -> PeftModule:
        return GLoRA(ctx, self)


class GLoRA(LinearModule):
    """GLoRA's weight path W0⊙A + B (low rank) and bias path W0·C + b0⊙D + E (vectors)."""

    def __init__(self, ctx: BuildContext, s: GloraSettings) -> None:
        super().__init__(ctx)
        ref = ctx.linear
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        out_f, in_f = ref.out_features, ref.in_features
        self.glora_Ad = nn.Parameter(torch.empty(s.r, in_f, **kw))
        self.glora_Au = nn.Parameter(torch.zeros(out_f, s.r, **kw))
        self.glora_Bd = nn.Parameter(torch.empty(s.r, in_f, **kw))
        self.glora_Bu = nn.Parameter(torch.zeros(out_f, s.r, **kw))
        if ctx.device.type != "meta":
            nn.init.kaiming_uniform_(self.glora_Ad, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.glora_Bd, a=math.sqrt(5))
        self.has_bias = ref.bias is not None
        if self.has_bias:
            self.glora_C = nn.Parameter(torch.zeros(in_f, **kw))
            self.glora_D = nn.Parameter(torch.zeros(out_f, **kw))
            self.glora_E = nn.Parameter(torch.zeros(out_f, **kw))

    def flops_per_token(self) -> float:
        """The input through the formed weight delta (W0⊙A is full rank, so the delta is applied whole)."""
        return 2.0 * self.glora_Ad.shape[1] * self.glora_Au.shape[0]

    def flops_per_step(self) -> float:
        """A_u·A_d, B_u·B_d and W0·C, once per pass."""
        r, d_in = self.glora_Ad.shape
        return 2.0 * self.glora_Au.shape[0] * d_in * (2 * r + (1 if self.has_bias else 0))

    def weight_delta(self) -> torch.Tensor:
        w = self.ref.weight.to(self.glora_Ad.dtype)
        return w * (self.glora_Au @ self.glora_Ad) + self.glora_Bu @ self.glora_Bd

    def bias_delta(self) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        w = self.ref.weight.to(self.glora_C.dtype)
        return w @ self.glora_C + self.ref.bias.to(self.glora_D.dtype) * self.glora_D + self.glora_E

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.glora_Ad.dtype)
        out = F.linear(x, self.weight_delta(), self.bias_delta())
        return out.to(y.dtype)

    def merge(self) -> None:
        with torch.no_grad():
            bias = self.bias_delta()
            self.ref.weight.add_(self.weight_delta().to(self.ref.weight.dtype))
            if bias is not None:
                self.ref.bias.add_(bias.to(self.ref.bias.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """The deltas depend on W0 and b0: recover them from the merged W' = W0⊙(1 + A) + B, b' = b0⊙(1 + D) + ..."""
        with torch.no_grad():
            w = self.ref.weight
            a = self.glora_Au @ self.glora_Ad
            base_w = (w.to(a.dtype) - self.glora_Bu @ self.glora_Bd) / (1 + a)
            if self.has_bias:
                b = self.ref.bias
                base_b = (b.to(a.dtype) - base_w @ self.glora_C - self.glora_E) / (1 + self.glora_D)
                b.copy_(base_b.to(b.dtype))
            w.copy_(base_w.to(w.dtype))
        self.merged = False

    def changed_numel(self) -> int:
        w = self.ref.weight.numel()
        return w + (self.ref.bias.numel() if self.has_bias else 0)
