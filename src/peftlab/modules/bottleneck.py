"""Bottleneck modules: the adapter (Houlsby / Pfeiffer / parallel), Compacter and AdaMix.

All three are a down projection, a non-linearity and an up projection that starts at zero, so the model
is unchanged at init. At ``beside_ffn`` they act in parallel with the FFN (y_ffn + s·f(x_ffn), He et al. 2022).
At ``after_attn`` / ``after_ffn`` they act in series on a sub-layer, and three settings place them there, named
and meant as AdapterHub's ``BnConfig`` (h: the sub-layer's output, r: its residual input, LN: its LayerNorm):

- ``original_ln_before`` false, ``original_ln_after`` true (Houlsby et al. 2019, the default): the adapter reads h
  before the residual and the LayerNorm; out = LN(h + f(h) + r).
- ``original_ln_before``, ``original_ln_after`` and ``residual_before_ln`` true (Pfeiffer et al. 2021, UniPELT's
  h_FN): the adapter reads LN(h + r), the sub-layer's usual output, its own residual is h, and the LayerNorm is
  applied again after it; out = LN(h + r + f(LN(h + r))).
- ``original_ln_before`` true, ``original_ln_after`` and ``residual_before_ln`` false: the adapter reads the
  sub-layer's usual output and adds back to it; out = LN(h + r) + f(LN(h + r)).

The other combinations AdapterHub accepts do not start as the identity (the sub-layer loses its residual or its
LayerNorm, or normalises twice), and are refused. In pre-norm families (GPT-2, Llama, T5) no LayerNorm follows the
residual, so both placements with ``original_ln_before`` read the residual stream after the sub-layer, h + r, and
add back to it (AdapterHub's reading too: there ``layer_norm`` is None). The module writes through hooks: into the
sub-layer's output projection (Houlsby, and pre-norm families, which add f(h + r) to h, r captured at the sub-layer's
norm) or onto the LayerNorm after the residual (post-norm families).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import SpecError
from peftlab.modules.base import (
    Batches,
    BuildContext,
    Gate,
    PeftModule,
    Settings,
    need_choice,
    need_float,
    need_int,
    register,
)
from peftlab.modules.linear import _near_sqrt_divisor, kron_apply
from peftlab.modules.saliency import gradient_sums

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclass
class Placement:
    """Where a serial bottleneck reads and writes (AdapterHub's ``BnConfig`` fields; see the module docstring)."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True

    def check(self) -> None:
        for name in ("original_ln_before", "original_ln_after", "residual_before_ln"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name} must be true or false, got {getattr(self, name)!r}")
        before, after, residual = self.original_ln_before, self.original_ln_after, self.residual_before_ln
        if not before and not after:
            raise SpecError(
                "original_ln_before and original_ln_after cannot both be false: the sub-layer would lose its "
                "residual and LayerNorm"
            )
        if before and after and not residual:
            raise SpecError(
                "original_ln_before and original_ln_after need residual_before_ln true: the adapter's residual "
                "would be normalised twice and the model would not start unchanged"
            )
        if before and not after and residual:
            raise SpecError(
                "original_ln_before without original_ln_after needs residual_before_ln false: the sub-layer "
                "would lose its residual and LayerNorm"
            )

    @property
    def houlsby(self) -> bool:
        """Reads the sub-layer's output before its residual (the default)."""
        return not self.original_ln_before


#: The placements of the papers' adapters.
HOULSBY = Placement()
PFEIFFER = Placement(original_ln_before=True, original_ln_after=True, residual_before_ln=True)


class BottleneckModule(PeftModule):
    """Placement and gating shared by every bottleneck kind; subclasses define ``transform``."""

    def __init__(self, ctx: BuildContext, scaling: float, placement: Placement) -> None:
        super().__init__(ctx)
        self.parallel = ctx.site == "beside_ffn"
        if self.parallel and placement != HOULSBY:
            raise SpecError(
                "original_ln_before / original_ln_after / residual_before_ln place serial adapters "
                "(after_attn, after_ffn); a parallel adapter reads the FFN input and adds to its output"
            )
        self.placement = placement
        self.hidden = ctx.dims.hidden
        self.scaling = scaling
        self.gate = Gate(ctx.dims.hidden, ctx.device, ctx.dtype, ctx.sequence()) if ctx.gated else None
        self._captured: torch.Tensor | None = None
        self._norm: tuple[nn.Module, ...] = ()
        self._inside = False  # the norm is being called from this module's own hook

    def attach(self, ctx: BuildContext) -> None:
        block = ctx.block
        stack = block.stack
        out_host = block.sub(stack.serial["after_ffn" if self.parallel else ctx.site])
        if self.parallel:
            ctx.hooks.add(block.sub(stack.ffn), "pre", self, self._capture)
            ctx.hooks.add(out_host, "post", self, self._beside)
        elif self.placement.houlsby:
            ctx.hooks.add(out_host, "post", self, self._after_output)
        elif stack.post_norm:
            norm = block.sub(stack.serial_norms[ctx.site])
            self._norm = (norm,)  # a tuple: the norm belongs to the backbone
            if self.placement.original_ln_after:
                ctx.hooks.add(norm, "pre", self, self._before_norm)
            else:
                ctx.hooks.add(norm, "post", self, self._after_norm)
        else:  # pre-norm: the sub-layer's norm reads the residual stream r; the adapter reads h + r
            ctx.hooks.add(block.sub(stack.serial_norms[ctx.site]), "pre", self, self._capture)
            ctx.hooks.add(out_host, "post", self, self._after_residual)

    def _capture(self, x: torch.Tensor) -> torch.Tensor:
        self._captured = x
        return x

    def _delta(self, inp: torch.Tensor) -> torch.Tensor:
        """The (scaled, gated) adapter output for its input."""
        out = self.transform(inp) * self.scaling
        if self.gate is not None:
            out = out * self.gate(inp)
        return out

    def _beside(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        inp, self._captured = self._captured, None
        return y + self._delta(inp).to(y.dtype)

    def _after_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Houlsby: y = h, the sub-layer output before its residual; h + f(h)."""
        return y + self._delta(y).to(y.dtype)

    def _before_norm(self, z: torch.Tensor) -> torch.Tensor:
        """Post-norm families, LayerNorm after the adapter: the norm's input z = h + r becomes z + f(LN(z)). LN(z) is
        the norm's whole output, other modules' hooks on it included (LayerNorm tuning, BitFit), got by calling it
        once more with this hook passing through."""
        if self._inside:
            return z
        self._inside = True
        try:
            y = self._norm[0](z)
        finally:
            self._inside = False
        return z + self._delta(y).to(z.dtype)

    def _after_norm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Post-norm families, no LayerNorm after the adapter: x = h + r, y = LN(h + r); y + f(y)."""
        return y + self._delta(y).to(y.dtype)

    def _after_residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pre-norm families: y = h; the stream after the sub-layer becomes r + h + f(r + h)."""
        r, self._captured = self._captured, None
        return y + self._delta(r + y).to(y.dtype)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bottleneck(self) -> int:
        """The width of the down projection."""
        raise NotImplementedError

    def flops_per_token(self) -> float:
        """The down and up projections (hidden × size each way), and the gate's projection where gated."""
        gate = self.gate.flops_per_token() if self.gate is not None else 0.0
        return 4.0 * self.hidden * self.bottleneck() + gate


def _check_bottleneck(s: AdapterSettings | CompacterSettings | AdaMixSettings) -> None:
    need_int("size", s.size, 1, 65536)
    need_choice("activation", s.activation, tuple(ACTIVATIONS))
    need_float("scaling", s.scaling, 0.0, low_open=True)
    _placement(s).check()


def _placement(s: AdapterSettings | CompacterSettings | AdaMixSettings) -> Placement:
    return Placement(s.original_ln_before, s.original_ln_after, s.residual_before_ln)


@register
@dataclass
class AdapterSettings(Settings):
    """A bottleneck adapter (Houlsby et al. 2019); ``scaling`` is the scaled parallel adapter's s; the last three
    settings place a serial adapter (see the module docstring)."""

    kind = "adapter"
    roles = frozenset({"serial", "parallel"})
    gateable = True
    default_lr = 1e-4  # UniPELT's appendix B

    size: int = 48
    activation: str = "relu"
    scaling: float = 1.0
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True

    def check(self) -> None:
        _check_bottleneck(self)

    def build(self, ctx: BuildContext) -> PeftModule:
        return Adapter(ctx, self)


class Adapter(BottleneckModule):
    def __init__(self, ctx: BuildContext, s: AdapterSettings) -> None:
        super().__init__(ctx, s.scaling, _placement(s))
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.down = nn.Linear(ctx.dims.hidden, s.size, **kw)
        self.up = nn.Linear(s.size, ctx.dims.hidden, **kw)
        self.act = ACTIVATIONS[s.activation]
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def bottleneck(self) -> int:
        return self.down.out_features

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.weight.dtype)
        return self.up(self.act(self.down(x)))


@register
@dataclass
class CompacterSettings(Settings):
    """Compacter (Karimi Mahabadi et al. 2021): adapter weights as sums of Kronecker products
    A_i ⊗ (s_i t_i^T); the n×n rules A_i are shared by all layers of one adapter."""

    kind = "compacter"
    roles = frozenset({"serial", "parallel"})
    default_lr = 1e-3  # Karimi Mahabadi et al.

    size: int = 48
    n: int = 4
    rank: int = 1
    activation: str = "relu"
    scaling: float = 1.0
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True

    def check(self) -> None:
        _check_bottleneck(self)
        need_int("n", self.n, 1, 64)
        need_int("rank", self.rank, 1)
        if self.size % self.n:
            raise SpecError(f"size ({self.size}) must be divisible by n ({self.n})")

    def build(self, ctx: BuildContext) -> PeftModule:
        if ctx.dims.hidden % self.n:
            raise SpecError(f"compacter n={self.n} must divide the hidden size {ctx.dims.hidden}")
        return Compacter(ctx, self)


class PHMRule(nn.Module):
    """The shared n×n×n Kronecker rules of one adapter (counted once)."""

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.rule = nn.Parameter(torch.empty(n, n, n, device=device, dtype=dtype))
        if device.type != "meta":
            nn.init.normal_(self.rule, std=1.0 / n)


class PHMLinear(nn.Module):
    """A low-rank parameterised hypercomplex multiplication layer (LPHM)."""

    def __init__(self, rule: PHMRule, n: int, d_in: int, d_out: int, rank: int, zero: bool, kw: dict) -> None:
        super().__init__()
        self._rule = (rule,)  # shared: not a submodule, so it is stored and counted once
        self.s = nn.Parameter(torch.empty(n, d_in // n, rank, **kw))
        self.t = nn.Parameter(torch.empty(n, rank, d_out // n, **kw))
        self.bias = nn.Parameter(torch.zeros(d_out, **kw))
        if kw["device"].type != "meta":
            std = math.sqrt(2.0 / (d_in + d_out))
            nn.init.normal_(self.s, std=std)
            nn.init.normal_(self.t, std=0.0 if zero else std)

    def weight(self) -> torch.Tensor:
        a = self._rule[0].rule  # (n, n, n)
        b = self.s @ self.t  # (n, d_in/n, d_out/n)
        n, c, d = b.shape
        return torch.einsum("iab,icd->acbd", a, b).reshape(n * c, n * d)

    def weight_flops(self) -> float:
        """Matmul FLOPs of :meth:`weight`: s·t (n of them), then n Kronecker products summed."""
        n, c, rank = self.s.shape
        d = self.t.shape[2]
        return 2.0 * n * c * rank * d + 2.0 * n * (n * c) * (n * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias


class Compacter(BottleneckModule):
    def __init__(self, ctx: BuildContext, s: CompacterSettings) -> None:
        super().__init__(ctx, s.scaling, _placement(s))
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        rules = [
            ctx.share(f"phm_{part}_n{s.n}", lambda: PHMRule(s.n, ctx.device, ctx.dtype)) for part in ("down", "up")
        ]
        self.down = PHMLinear(rules[0], s.n, ctx.dims.hidden, s.size, s.rank, zero=False, kw=kw)
        self.up = PHMLinear(rules[1], s.n, s.size, ctx.dims.hidden, s.rank, zero=True, kw=kw)
        self.act = ACTIVATIONS[s.activation]

    def bottleneck(self) -> int:
        return self.down.bias.numel()

    def flops_per_step(self) -> float:
        """Each pass forms both weights from their factors: s·t, then the sum of n Kronecker products."""
        return self.down.weight_flops() + self.up.weight_flops()

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down.s.dtype)
        return self.up(self.act(self.down(x)))


def consistency_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """AdaMix's consistency term between two passes' logits: the symmetrised KL divergence of their
    distributions (the mean of KL(p||q) and KL(q||p)); a regression head's single output compares by squared
    difference; text-to-text logits (batch, tokens, vocabulary) count only the tokens with a label."""
    a, b = a.float(), b.float()
    if a.shape[-1] == 1:
        return F.mse_loss(a, b)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))
    if kl.dim() > 1 and labels is not None and labels.shape == kl.shape:
        return kl[labels != -100].mean()
    return kl.mean()


class ConsistencyLoss:
    """AdaMix's training objective: a second pass (which draws its own experts), the mean of both passes' losses
    plus ``weight`` times their consistency term."""

    default_weight = 1.0

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], out, weight: float) -> torch.Tensor:
        again = model(**batch)
        term = consistency_loss(out.logits, again.logits, batch.get("labels"))
        return (out.loss + again.loss) / 2 + weight * term


@register
@dataclass
class AdaMixSettings(Settings):
    """AdaMix (Wang et al. 2022): a mixture of adapter experts; training routes each forward pass through
    a random down and a random up expert, inference uses the experts' averaged weights."""

    kind = "adamix"
    roles = frozenset({"serial", "parallel"})
    default_lr = 1e-4  # as the adapters it mixes
    training_loss = ConsistencyLoss()

    size: int = 16
    experts: int = 4
    activation: str = "relu"
    scaling: float = 1.0
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True

    def check(self) -> None:
        _check_bottleneck(self)
        need_int("experts", self.experts, 1, 64)

    def build(self, ctx: BuildContext) -> PeftModule:
        return AdaMix(ctx, self)


class AdaMix(BottleneckModule):
    def __init__(self, ctx: BuildContext, s: AdaMixSettings) -> None:
        super().__init__(ctx, s.scaling, _placement(s))
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        h = ctx.dims.hidden
        self.down_w = nn.Parameter(torch.empty(s.experts, s.size, h, **kw))
        self.down_b = nn.Parameter(torch.zeros(s.experts, s.size, **kw))
        self.up_w = nn.Parameter(torch.zeros(s.experts, h, s.size, **kw))
        self.up_b = nn.Parameter(torch.zeros(s.experts, h, **kw))
        if ctx.device.type != "meta":
            for e in range(s.experts):
                nn.init.kaiming_uniform_(self.down_w[e], a=math.sqrt(5))
        self.act = ACTIVATIONS[s.activation]

    def bottleneck(self) -> int:
        return self.down_w.shape[1]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down_w.dtype)
        if self.training:
            experts = self.down_w.shape[0]
            i = int(torch.randint(experts, ()).item())
            j = int(torch.randint(experts, ()).item())
            dw, db, uw, ub = self.down_w[i], self.down_b[i], self.up_w[j], self.up_b[j]
        else:
            dw, db = self.down_w.mean(0), self.down_b.mean(0)
            uw, ub = self.up_w.mean(0), self.up_b.mean(0)
        return F.linear(self.act(F.linear(x, dw, db)), uw, ub)


@register
@dataclass
class SparseAdapterSettings(Settings):
    """SparseAdapter (He et al. 2022): a bottleneck adapter whose projection weights are pruned at initialisation to
    ``sparsity`` (the fraction of entries removed; the paper's "Large-Sparse" setting: a wider adapter, 40% pruned),
    with the mask fixed during training. ``prune``: 'snip' (the paper's choice: keep the entries whose removal would
    change the loss most, |w·∂L/∂w| summed over ``samples`` training examples before the first step, the model in
    eval mode), 'random' scores, or 'magnitude' of the initial weights (the zero-initialised up projection has none
    to rank, so it is pruned at random). Each weight matrix keeps the same share (the paper's code can also rank
    all of them together; per matrix fixes a saved file's shapes). SNIP needs a non-zero up projection to score, so
    under 'snip' both projections start as the paper's code initialises them (normal, σ 0.02; the model changes
    slightly at init) and the file holds the chosen positions too; otherwise the mask is drawn from ``seed`` and
    loading rebuilds it. Without training data (counting, ``show``) the SNIP mask is the seed's random one."""

    kind = "sparse-adapter"
    roles = frozenset({"serial", "parallel"})
    default_lr = 1e-4  # as the adapters it prunes

    size: int = 64
    sparsity: float = 0.4
    prune: str = "snip"
    samples: int = 320  # the paper's code: 10 × 32 examples
    seed: int = 0
    activation: str = "relu"
    scaling: float = 1.0
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True

    def check(self) -> None:
        _check_bottleneck(self)
        need_float("sparsity", self.sparsity, 0.0, 1.0)
        if self.sparsity >= 1.0:
            raise SpecError(f"sparsity must be below 1 (some entries must stay), got {self.sparsity!r}")
        need_choice("prune", self.prune, ("snip", "random", "magnitude"))
        need_int("samples", self.samples, 1)
        need_int("seed", self.seed, 0)

    def build(self, ctx: BuildContext) -> PeftModule:
        return SparseAdapter(ctx, self)

    @classmethod
    def prepare(cls, model: nn.Module, modules: list[PeftModule], batches: Batches) -> None:
        """SNIP: score every weight entry of the 'snip' modules by |w·g| over the first ``samples`` training
        examples, with every entry in place, and keep each matrix's top share."""
        snip = [m for m in modules if isinstance(m, SparseAdapter) and m.settings.prune == "snip"]
        if not snip:
            return
        for m in snip:
            m.densify()
        weights = [w for m in snip for w in (m.down_weight, m.up_weight)]
        grads = gradient_sums(model, weights, batches(), snip[0].settings.samples, squared=False)
        for i, m in enumerate(snip):
            (dw, uw), (dg, ug) = weights[2 * i : 2 * i + 2], grads[2 * i : 2 * i + 2]
            m.choose(_top_mask((dw.detach().float() * dg).abs().cpu(), m.keep[0]),
                     _top_mask((uw.detach().float() * ug).abs().cpu(), m.keep[1]))  # fmt: skip


def _kept(numel: int, sparsity: float) -> int:
    """Entries a matrix of ``numel`` keeps at ``sparsity`` (at least one)."""
    return max(1, numel - round(sparsity * numel))


def _top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The mask of the ``keep`` highest scores (exactly ``keep`` entries, ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().topk(keep).indices] = True
    return mask.view_as(scores)


class _KeptEntries:
    """A load target for the kept entries of a pruned weight: what the adapter file holds (a 1-D tensor), written
    back into the weight's unmasked positions. Under SNIP the file also holds the positions (:class:`_KeptAt`), in
    either order: the values are kept and written again once the positions arrive."""

    def __init__(self, weight: nn.Parameter, mask: torch.Tensor) -> None:
        self.weight, self.mask = weight, mask
        self.shape = torch.Size([int(mask.sum())])
        self.dtype = weight.dtype
        self.values: torch.Tensor | None = None

    def copy_(self, values: torch.Tensor) -> None:
        self.values = values.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[self.mask] = self.values


class _KeptAt:
    """A load target for the positions of a SNIP-pruned weight's kept entries (flat, sorted): sets the mask."""

    def __init__(self, entries: _KeptEntries) -> None:
        self.entries = entries
        self.shape = entries.shape
        self.dtype = torch.int64

    def copy_(self, positions: torch.Tensor) -> None:
        mask = self.entries.mask
        mask.zero_()
        mask.view(-1)[positions.to(mask.device, torch.int64)] = True
        if self.entries.values is not None:
            self.entries.copy_(self.entries.values)


class SparseAdapter(BottleneckModule):
    """A bottleneck adapter computing with masked weights (W ⊙ M): pruned entries stay zero and get no gradient."""

    def __init__(self, ctx: BuildContext, s: SparseAdapterSettings) -> None:
        super().__init__(ctx, s.scaling, _placement(s))
        self.settings = s
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        h = ctx.dims.hidden
        g = torch.Generator().manual_seed(s.seed)
        bound = 1.0 / math.sqrt(h)  # nn.Linear's default initialisation, drawn from the seed
        down = (torch.rand(s.size, h, generator=g) * 2 - 1) * bound
        scores = down.abs() if s.prune == "magnitude" else torch.rand(s.size, h, generator=g)
        up_scores = torch.rand(h, s.size, generator=g)
        up = torch.zeros(h, s.size)
        if s.prune == "snip":  # the paper's code's initialisation: SNIP scores nothing next to a zero projection
            down, up = torch.randn(s.size, h, generator=g) * 0.02, torch.randn(h, s.size, generator=g) * 0.02
        self._dense = (down, up) if s.prune == "snip" else None
        self.down_weight = nn.Parameter(down.to(**kw))
        self.down_bias = nn.Parameter(torch.zeros(s.size, **kw))
        self.up_weight = nn.Parameter(up.to(**kw))
        self.up_bias = nn.Parameter(torch.zeros(h, **kw))
        self.keep = (_kept(down.numel(), s.sparsity), _kept(up_scores.numel(), s.sparsity))
        self.register_buffer("down_mask", _top_mask(scores, self.keep[0]).to(ctx.device), persistent=False)
        self.register_buffer("up_mask", _top_mask(up_scores, self.keep[1]).to(ctx.device), persistent=False)
        self._apply_masks()
        self.act = ACTIVATIONS[s.activation]

    def _apply_masks(self) -> None:
        if self.down_weight.device.type != "meta":
            with torch.no_grad():
                self.down_weight.mul_(self.down_mask)
                self.up_weight.mul_(self.up_mask)

    def densify(self) -> None:
        """Every entry in place at its initial value (SNIP scores the dense adapter)."""
        assert self._dense is not None, "only a SNIP adapter keeps its dense initialisation"
        with torch.no_grad():
            self.down_weight.copy_(self._dense[0])
            self.up_weight.copy_(self._dense[1])
        self.down_mask.fill_(True)
        self.up_mask.fill_(True)

    def choose(self, down_mask: torch.Tensor, up_mask: torch.Tensor) -> None:
        """Make these the masks and prune the weights to them."""
        self.down_mask.copy_(down_mask)
        self.up_mask.copy_(up_mask)
        self._apply_masks()

    def bottleneck(self) -> int:
        return self.down_bias.numel()

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.down_weight.dtype)
        down = self.down_weight * self.down_mask
        up = self.up_weight * self.up_mask
        return F.linear(self.act(F.linear(x, down, self.down_bias)), up, self.up_bias)

    def own_numel(self) -> int:
        """The kept weight entries and the biases: what the optimiser updates (pruned entries never change)."""
        return sum(self.keep) + self.down_bias.numel() + self.up_bias.numel()

    def stored_numel(self) -> int:
        """The trained entries, and under SNIP their positions (a data-chosen mask cannot be rebuilt from the seed)."""
        return self.own_numel() + (sum(self.keep) if self._dense is not None else 0)

    def changed_numel(self) -> int:
        return self.own_numel()

    def stored_state(self) -> dict[str, torch.Tensor]:
        state = {"down_bias": self.down_bias.detach(), "up_bias": self.up_bias.detach()}
        state["down_weight"] = self.down_weight.detach()[self.down_mask]
        state["up_weight"] = self.up_weight.detach()[self.up_mask]
        if self._dense is not None:
            state["down_kept_at"] = self.down_mask.flatten().nonzero().flatten()
            state["up_kept_at"] = self.up_mask.flatten().nonzero().flatten()
        return state

    def load_targets(self) -> dict[str, Any]:
        down, up = _KeptEntries(self.down_weight, self.down_mask), _KeptEntries(self.up_weight, self.up_mask)
        targets = {"down_bias": self.down_bias, "up_bias": self.up_bias, "down_weight": down, "up_weight": up}
        if self._dense is not None:
            targets |= {"down_kept_at": _KeptAt(down), "up_kept_at": _KeptAt(up)}
        return targets


@register
@dataclass
class KronaResSettings(Settings):
    """KronA^B_res (Edalati et al. 2022): a Kronecker adapter in parallel with the FFN, with a residual connection and
    a scale: FFN(x) + ``scale``·x(A ⊗ B) + x, x the FFN's input (``residual`` false leaves the + x out, so the model
    starts unchanged). ``a_out``/``a_in`` fix A's shape (0: balanced factors of the hidden size); B starts at zero."""

    kind = "krona-res"
    roles = frozenset({"parallel"})
    default_lr = 1e-3  # Edalati et al. (GLUE, KronA^B_res)

    a_out: int = 0
    a_in: int = 0
    scale: float = 1.0
    residual: bool = True

    def check(self) -> None:
        need_int("a_out", self.a_out, 0)
        need_int("a_in", self.a_in, 0)
        need_float("scale", self.scale, 0.0, low_open=True)
        if not isinstance(self.residual, bool):
            raise SpecError(f"residual must be true or false, got {self.residual!r}")

    def build(self, ctx: BuildContext) -> PeftModule:
        h = ctx.dims.hidden
        a_out, a_in = self.a_out or _near_sqrt_divisor(h), self.a_in or _near_sqrt_divisor(h)
        if h % a_out or h % a_in:
            raise SpecError(f"krona-res a_out={a_out}, a_in={a_in} must divide the hidden size {h}")
        return KronaRes(ctx, self, a_out, a_in)


class KronaRes(BottleneckModule):
    """The Kronecker adapter beside the FFN: reads the FFN's input, adds to its output (the parallel bottleneck's
    placement), computing x(A ⊗ B) without forming the product."""

    def __init__(self, ctx: BuildContext, s: KronaResSettings, a_out: int, a_in: int) -> None:
        super().__init__(ctx, 1.0, HOULSBY)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        h = ctx.dims.hidden
        self.krona_A = nn.Parameter(torch.empty(a_out, a_in, **kw))
        self.krona_B = nn.Parameter(torch.zeros(h // a_out, h // a_in, **kw))
        if ctx.device.type != "meta":
            nn.init.kaiming_uniform_(self.krona_A, a=math.sqrt(5))
        self.scale, self.residual = s.scale, s.residual

    def bottleneck(self) -> int:
        return 0

    def flops_per_token(self) -> float:
        """x (a_in × b_in) contracted with B, then with A (the residual is elementwise)."""
        a_out, a_in = self.krona_A.shape
        b_out, b_in = self.krona_B.shape
        return 2.0 * (a_in * b_in * b_out + a_out * a_in * b_out)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.krona_A.dtype)
        out = kron_apply(self.krona_A, self.krona_B, x)
        return self.scale * out + x if self.residual else self.scale * out
