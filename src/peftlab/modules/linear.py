"""Modules that reparameterise one weight matrix: LoRA / DoRA, (IA)3 and KronA.

They share one contract (:class:`LinearModule`): an output delta computed from the site input, padded
into the host output when the site is a slice of a fused projection, and a weight delta for merging.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.backbone import quant
from peftlab.backbone.anatomy import LinearRef
from peftlab.errors import SpecError
from peftlab.modules.base import (
    BuildContext,
    Gate,
    PeftModule,
    Settings,
    need_float,
    need_int,
    register,
)

#: LoRA initialisations: Hu et al.'s (A random, B zero), PiSSA's principal singular vectors (``pissa_niter_K``: by K
#: subspace iterations of a randomised SVD), OLoRA's QR factors, and EVA's principal components of the layer inputs
INITS = ("default", "pissa", "pissa_niter_K", "olora", "eva")
#: inits that start from a factorisation of W: the model is kept unchanged by a stored residual correction
RESIDUAL_INITS = ("pissa", "olora")
_NITER = re.compile(r"pissa_niter_(\d+)")


def _residual_init(init: str) -> bool:
    return init in RESIDUAL_INITS or bool(_NITER.fullmatch(init))


def factorise(weight: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with scaling·B0·A0 the part of W (out, in) that PiSSA or OLoRA hands to the adapter, computed in
    float32 as peft's ``pissa_init`` / ``olora_init`` do (so the factors are peft's)."""
    w = weight.detach().to(torch.float32)
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter:
        v, s, u = torch.svd_lowrank(w, r, niter=int(niter[1]))
        uh = u.t()
    else:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        v, s, uh = v[:, :r], s[:r], uh[:r]
    s = s / scaling
    return (torch.diag(torch.sqrt(s)) @ uh).contiguous(), (v @ torch.diag(torch.sqrt(s))).contiguous()


def pad_to_host(delta: torch.Tensor, ref: LinearRef) -> torch.Tensor:
    """Place a site-sized output delta into the (possibly fused) host output."""
    if ref.out_slice is None:
        return delta
    return F.pad(delta, (ref.out_slice.start, ref.total_out - ref.out_slice.stop))


class LinearModule(PeftModule):
    """Base of modules at a linear site. Subclasses define ``output_delta`` and ``weight_delta``."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        assert ctx.linear is not None
        self._ref = ctx.linear  # not a submodule: the host belongs to the backbone

    @property
    def ref(self) -> LinearRef:
        return self._ref

    def attach(self, ctx: BuildContext) -> None:
        ctx.hooks.add(self.ref.module, "post", self, self._post)

    def _post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + pad_to_host(self.output_delta(x, y), self.ref)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        """Not into a quantized weight (see :meth:`merge_refusal`): there the module runs unmerged for good, so
        what it changes is its own parameters."""
        return self.ref.quantized is None

    def merge_refusal(self) -> str | None:
        return None if self.ref.quantized is None else quant.merge_refusal(self.ref.module)

    def merge(self) -> None:
        with torch.no_grad():
            self.ref.weight.add_(self.weight_delta().to(self.ref.weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        with torch.no_grad():
            self.ref.weight.sub_(self.weight_delta().to(self.ref.weight.dtype))
        self.merged = False

    def changed_numel(self) -> int:
        return self.ref.weight.numel() if self.mergeable else self.stored_numel()


@register
@dataclass
class LoraSettings(Settings):
    """LoRA (Hu et al.): W + s·B·A with s = alpha/r (or alpha/sqrt(r) with rsLoRA); DoRA decouples magnitude."""

    kind = "lora"
    roles = frozenset({"linear"})
    mergeable = True
    gateable = True
    default_lr = 5e-4  # UniPELT's appendix B

    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    dora: bool = False
    #: how A and B start (:data:`INITS`); pissa/olora move a part of W into them and keep the model unchanged by a
    #: stored correction, eva sets A from the layer inputs' principal components (:mod:`peftlab.train.eva`, given
    #: data; without data it starts as ``default``)
    init: str = "default"
    #: EVA's rank redistribution: a site may take up to r·eva_rho components (1: none)
    eva_rho: float = 2.0
    #: gated (UniPELT): one gate per site, AdapterHub's layout, instead of the paper's one per layer shared by the
    #: updates that read the same input
    gate_per_site: bool = False

    def check(self) -> None:
        need_int("r", self.r, 1, 4096)
        need_float("alpha", self.alpha, 0.0, low_open=True)
        need_float("dropout", self.dropout, 0.0, 0.99)
        if not isinstance(self.rslora, bool) or not isinstance(self.dora, bool):
            raise SpecError("rslora and dora must be true or false")
        niter = _NITER.fullmatch(self.init) if isinstance(self.init, str) else None
        if not (self.init in ("default", "pissa", "olora", "eva") or (niter and int(niter[1]) >= 1)):
            raise SpecError(f"init must be one of {', '.join(INITS)} (K an integer >= 1), got {self.init!r}")
        need_float("eva_rho", self.eva_rho, 1.0, 1000.0)
        if not isinstance(self.gate_per_site, bool):
            raise SpecError("gate_per_site must be true or false")
        if self.dora and self.residual:
            raise SpecError(f"init {self.init} cannot be combined with dora (DoRA's magnitude starts from W)")

    @property
    def residual(self) -> bool:
        """Whether A and B start as a factorisation of W (PiSSA, OLoRA)."""
        return _residual_init(self.init)

    def to_dict(self) -> dict[str, Any]:
        """The settings without the initialisation fields at their defaults: specs written before them read (and
        hash) the same."""
        data = super().to_dict()
        for f in ("init", "eva_rho", "gate_per_site"):
            if data[f] == next(x.default for x in dataclasses.fields(self) if x.name == f):
                del data[f]
        return data

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def build(self, ctx: BuildContext) -> PeftModule:
        return LoRA(ctx, self)


#: LoRA sites that read one input (per layer): UniPELT's shared gate is a statistic of that input, so only these share
#: it; every other site (cross-attention's query, the output and FFN projections) has its own.
_GATE_INPUTS = {"q": "", "k": "", "v": "", "cross_k": "_cross_kv", "cross_v": "_cross_kv"}


def _gate_key(ctx: BuildContext, s: LoraSettings) -> str:
    """The shared-part key of a LoRA gate: per layer and input (UniPELT), or per site (``gate_per_site``)."""
    suffix = f"_{ctx.site}" if s.gate_per_site else _GATE_INPUTS.get(ctx.site, f"_{ctx.site}")
    return f"lora_gate_{ctx.block.index}{suffix}"


class LoRA(LinearModule):
    """Low-rank update; B starts at zero so the model is unchanged at init. With a gate (UniPELT) the
    fixed scaling is replaced by the gate's output, input-dependent, so a gated LoRA cannot merge.

    PiSSA and OLoRA start A, B as a factorisation (A0, B0) of W, and peft replaces W by the residual W - s·B0·A0.
    peftlab leaves the backbone as it is and keeps (A0, B0) as frozen buffers instead, the module adding
    s·(B·A - B0·A0): the same model at every step (identical gradients for A and B), unchanged at init, merging
    exactly, and its delta is the plain rank-2r LoRA ([B, -B0], [A; A0]) that peft's save with
    ``path_initial_model_for_weight_conversion`` writes. The saved adapter stores the buffers (they are counted as
    stored, not trainable)."""

    def __init__(self, ctx: BuildContext, s: LoraSettings) -> None:
        super().__init__(ctx)
        ref = ctx.linear
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.lora_A = nn.Parameter(torch.empty(s.r, ref.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(ref.out_features, s.r, **kw))
        self.init = s.init
        if s.residual and s.r > min(ref.in_features, ref.out_features):
            raise SpecError(
                f"init {s.init} needs r <= the weight's smaller side ({ref.out_features} x {ref.in_features}), "
                f"got r={s.r}"
            )
        # frozen, so buffers (stored, never trained); None when the start is not a factorisation of W
        self.register_buffer("lora_A0", torch.empty(s.r, ref.in_features, **kw) if s.residual else None)
        self.register_buffer("lora_B0", torch.empty(ref.out_features, s.r, **kw) if s.residual else None)
        if ctx.device.type != "meta":
            if s.residual:
                a0, b0 = factorise(ref.weight, s.r, s.scaling, s.init)
                with torch.no_grad():
                    for t, v in ((self.lora_A, a0), (self.lora_A0, a0), (self.lora_B, b0), (self.lora_B0, b0)):
                        t.copy_(v)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = s.scaling
        self.dropout = nn.Dropout(s.dropout) if s.dropout > 0 else None
        self._gate: tuple[Gate, ...] = ()
        if ctx.gated:
            view = ctx.sequence()
            gate = ctx.share(_gate_key(ctx, s), lambda: Gate(ref.in_features, ctx.device, ctx.dtype, view))
            self._gate = (gate,)
        self.magnitude = None
        if s.dora:
            w = ref.weight.detach()
            init = w.norm(dim=1) if ctx.device.type != "meta" else torch.empty(w.shape[0], device="meta")
            self.magnitude = nn.Parameter(init.to(**kw))

    @property
    def residual(self) -> bool:
        """Whether the module carries PiSSA's / OLoRA's correction -s·B0·A0."""
        return self.lora_A0 is not None

    def stored_numel(self) -> int:
        """A and B, and the frozen (A0, B0) of a PiSSA / OLoRA start."""
        extra = self.lora_A0.numel() + self.lora_B0.numel() if self.residual else 0
        return self.own_numel() + extra

    def flops_per_token(self) -> float:
        """x·Aᵀ then ·Bᵀ (twice with a residual correction), and the gate's projection where gated."""
        r, d_in = self.lora_A.shape
        gate = self._gate[0].flops_per_token() if self._gate else 0.0
        return 2.0 * r * (d_in + self.lora_B.shape[0]) * (2 if self.residual else 1) + gate

    def flops_per_step(self) -> float:
        """DoRA forms B·A once per pass for the weight norm."""
        return 2.0 * self.lora_B.shape[0] * self.lora_A.numel() if self.magnitude is not None else 0.0

    def _scale(self, x: torch.Tensor) -> torch.Tensor | float:
        return self._gate[0](x) if self._gate else self.scaling

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        h = self.dropout(x) if self.dropout is not None else x
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B)
        if self.residual:  # the part of W peft moves out of the base weight; no dropout on it, as on W there
            lora = lora - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        lora = lora * self._scale(x)
        if self.magnitude is None:
            return lora if lora.dtype == y.dtype else lora.to(y.dtype)
        # DoRA (Liu et al. 2024): m * (W + dW) / ||W + dW||, the norm detached as in the paper (sec. 4.3).
        weight = self.ref.weight
        norm = (weight + self.scaling * (self.lora_B @ self.lora_A)).norm(dim=1).detach()
        factor = self.magnitude / norm
        base = y if self.ref.out_slice is None else y[..., self.ref.out_slice]
        bias = self.ref.bias
        if bias is not None:
            base = base - bias
        return ((factor - 1) * base + factor * lora).to(y.dtype)

    @property
    def mergeable(self) -> bool:
        return not self._gate and super().mergeable

    def weight_delta(self) -> torch.Tensor:
        delta = self.lora_B @ self.lora_A
        if self.residual:
            delta = delta - self.lora_B0 @ self.lora_A0
        return self.scaling * delta

    def merge(self) -> None:
        if self.magnitude is None:
            return super().merge()
        with torch.no_grad():
            w = self.ref.weight
            merged = w + self.weight_delta()
            self._dora_norm = merged.norm(dim=1)
            w.copy_((merged * (self.magnitude / self._dora_norm)[:, None]).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if self.magnitude is None:
            return super().unmerge()
        with torch.no_grad():
            w = self.ref.weight
            factor = self.magnitude / self._dora_norm
            w.copy_((w / factor[:, None] - self.weight_delta()).to(w.dtype))
        self.merged = False


@register
@dataclass
class IA3Settings(Settings):
    """(IA)3 (Liu et al. 2022): a learned vector rescales the site's output (k, v) or, at ``ffn_out``,
    its input (the FFN's inner activations)."""

    kind = "ia3"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 3e-3  # T-Few

    def build(self, ctx: BuildContext) -> PeftModule:
        return IA3(ctx)


class IA3(LinearModule):
    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.on_input = ctx.site == "ffn_out"
        n = ctx.linear.in_features if self.on_input else ctx.linear.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=ctx.device, dtype=ctx.dtype))

    def flops_per_token(self) -> float:
        return 0.0  # an elementwise rescaling

    def attach(self, ctx: BuildContext) -> None:
        if self.on_input:
            ctx.hooks.add(self.ref.module, "pre", self, lambda x: x * self.ia3_l.to(x.dtype))
        else:
            ctx.hooks.add(self.ref.module, "post", self, self._post)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        base = y if self.ref.out_slice is None else y[..., self.ref.out_slice]
        return base * (self.ia3_l.to(y.dtype) - 1)

    def _post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y · l in one multiply (not y + y·(l − 1)): on a fused host, l padded with ones over the other slices."""
        scale = self.ia3_l.to(y.dtype)
        if self.ref.out_slice is not None:
            sl = self.ref.out_slice
            scale = F.pad(scale - 1, (sl.start, self.ref.total_out - sl.stop)) + 1
        return y * scale

    def _factor(self) -> torch.Tensor:
        return self.ia3_l[None, :] if self.on_input else self.ia3_l[:, None]

    def merge(self) -> None:
        with torch.no_grad():
            self.ref.weight.mul_(self._factor().to(self.ref.weight.dtype))
            if not self.on_input and self.ref.bias is not None:
                self.ref.bias.mul_(self.ia3_l.to(self.ref.bias.dtype))
        self.merged = True

    def unmerge(self) -> None:
        with torch.no_grad():
            self.ref.weight.div_(self._factor().to(self.ref.weight.dtype))
            if not self.on_input and self.ref.bias is not None:
                self.ref.bias.div_(self.ia3_l.to(self.ref.bias.dtype))
        self.merged = False


def _near_sqrt_divisor(n: int) -> int:
    """The largest divisor of n not above sqrt(n): balanced Kronecker factors."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            best = d
    return best


def kron_apply(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B)·x for every vector x along the last dim, without forming A ⊗ B: x viewed as (a_in, b_in), contracted
    with B and then with A, each as one plain matrix product over all tokens (on a CPU about a fifth faster, forward
    and backward, than einsum's many small batched products)."""
    a_out, a_in = a.shape
    b_out, b_in = b.shape
    lead, n = x.shape[:-1], x[..., 0].numel()
    y = F.linear(x.reshape(n * a_in, b_in), b).reshape(n, a_in, b_out)
    z = F.linear(y.transpose(1, 2).reshape(n * b_out, a_in), a).reshape(n, b_out, a_out)
    return z.transpose(1, 2).reshape(*lead, a_out * b_out)


@register
@dataclass
class KronaSettings(Settings):
    """KronA (Edalati et al. 2022): dW = s·(A ⊗ B), full rank for few parameters. ``a_out``/``a_in`` fix
    A's shape (0 picks balanced factors of the weight's sides)."""

    kind = "krona"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4  # as LoRA

    a_out: int = 0
    a_in: int = 0
    scale: float = 1.0

    def check(self) -> None:
        need_int("a_out", self.a_out, 0)
        need_int("a_in", self.a_in, 0)
        need_float("scale", self.scale, 0.0, low_open=True)

    def build(self, ctx: BuildContext) -> PeftModule:
        out_f, in_f = ctx.linear.out_features, ctx.linear.in_features
        a_out = self.a_out or _near_sqrt_divisor(out_f)
        a_in = self.a_in or _near_sqrt_divisor(in_f)
        if out_f % a_out or in_f % a_in:
            raise SpecError(f"krona a_out={a_out}, a_in={a_in} must divide the weight's shape ({out_f} x {in_f})")
        return KronA(ctx, a_out, a_in, self.scale)


class KronA(LinearModule):
    def __init__(self, ctx: BuildContext, a_out: int, a_in: int, scale: float) -> None:
        super().__init__(ctx)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        b_out, b_in = ctx.linear.out_features // a_out, ctx.linear.in_features // a_in
        self.krona_A = nn.Parameter(torch.empty(a_out, a_in, **kw))
        self.krona_B = nn.Parameter(torch.zeros(b_out, b_in, **kw))
        if ctx.device.type != "meta":
            nn.init.kaiming_uniform_(self.krona_A, a=math.sqrt(5))
        self.scale = scale

    def flops_per_token(self) -> float:
        """x (a_in × b_in) contracted with B, then with A."""
        a_out, a_in = self.krona_A.shape
        b_out, b_in = self.krona_B.shape
        return 2.0 * (a_in * b_in * b_out + a_out * a_in * b_out)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.scale * kron_apply(self.krona_A, self.krona_B, x.to(self.krona_A.dtype))).to(y.dtype)

    def weight_delta(self) -> torch.Tensor:
        return self.scale * torch.kron(self.krona_A, self.krona_B)
