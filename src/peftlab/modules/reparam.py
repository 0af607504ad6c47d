"""More reparameterisations of one weight matrix, after the peft library: VeRA, FourierFT, LoHa and LoKr.

Each is a :class:`~peftlab.modules.linear.LinearModule` (an output delta from the site input, a weight delta for
merging) whose parameters, initialisation and delta follow peft 0.21 exactly, so an adapter moves between the
two libraries with the same outputs (:mod:`peftlab.formats.interop`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import SpecError
from peftlab.modules.base import (
    BuildContext,
    PeftModule,
    Settings,
    need_choice,
    need_float,
    need_int,
    register,
)
from peftlab.modules.linear import LinearModule


def _kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (fan in, gain sqrt 2) drawn from ``generator``: peft's ``vera.model._kaiming_init``, so the
    same seed gives the same projections in both libraries."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def _same(placed: Sequence[Settings], fields: tuple[str, ...], why: str) -> None:
    """Refuse placements of one adapter that differ in settings they must share."""
    if len({tuple(getattr(s, f) for f in fields) for s in placed}) > 1:
        raise SpecError(f"all {placed[0].kind} sites of one adapter must share {', '.join(fields)} ({why})")


# -- VeRA ------------------------------------------------------------------------------------------------
@register
@dataclass
class VeraSettings(Settings):
    """VeRA (Kopiczko et al. 2024): dW = diag(b)·B·diag(d)·A with A (r × in) and B (out × r) frozen, random and
    shared by every site of the adapter (sized to the largest site); only d and b train. ``seed`` is peft's
    ``projection_prng_key``; ``save_projection`` keeps A and B in the saved adapter (peft's default), otherwise
    they are drawn again from the seed on load."""

    kind = "vera"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 4e-3  # VeRA's instruction-tuning runs (Llama 2): its vectors train at a rate well above LoRA's

    r: int = 256
    d_initial: float = 0.1
    seed: int = 0
    save_projection: bool = True

    def check(self) -> None:
        need_int("r", self.r, 1, 65536)
        need_float("d_initial", self.d_initial, 0.0)
        need_int("seed", self.seed, 0)
        if not isinstance(self.save_projection, bool):
            raise SpecError(f"save_projection must be true or false, got {self.save_projection!r}")

    @classmethod
    def plan(cls, placed: list[Settings]) -> None:
        _same(placed, ("r", "seed", "save_projection"), "they use one pair of projections")

    def build(self, ctx: BuildContext) -> PeftModule:
        refs = [block.linear(site) for block, site in ctx.placed] or [ctx.linear]
        max_in = max(ref.in_features for ref in refs)
        max_out = max(ref.out_features for ref in refs)
        proj = ctx.share(
            "vera_projections",
            lambda: VeraProjections(self.r, max_in, max_out, self.seed, ctx.device, ctx.dtype),
            stored=self.save_projection,
            folds=True,
        )
        return VeRA(ctx, self, proj)


class VeraProjections(nn.Module):
    """The frozen pair (A, B) of one adapter: buffers, so they are saved (where asked) but never trained."""

    def __init__(self, r: int, in_features: int, out_features: int, seed: int, device, dtype) -> None:
        super().__init__()
        if torch.device(device).type == "meta":
            a, b = torch.empty(r, in_features, device="meta"), torch.empty(out_features, r, device="meta")
        else:  # A first, then B, from one generator: peft's order
            generator = torch.Generator(device="cpu").manual_seed(seed)
            a = _kaiming((r, in_features), generator)
            b = _kaiming((out_features, r), generator)
        self.register_buffer("vera_A", a.to(device=device, dtype=dtype))
        self.register_buffer("vera_B", b.to(device=device, dtype=dtype))


class VeRA(LinearModule):
    """Scaling vectors over the adapter's shared projections, sliced to this site (as peft does)."""

    def __init__(self, ctx: BuildContext, s: VeraSettings, proj: VeraProjections) -> None:
        super().__init__(ctx)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        self.vera_lambda_d = nn.Parameter(torch.full((s.r,), float(s.d_initial), **kw))
        self.vera_lambda_b = nn.Parameter(torch.zeros(ctx.linear.out_features, **kw))
        self._proj = (proj,)  # shared: not a submodule, so it is stored and counted once

    def _ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self._proj[0]
        return proj.vera_A[:, : self.ref.in_features], proj.vera_B[: self.ref.out_features]

    def flops_per_token(self) -> float:
        return 2.0 * self.vera_lambda_d.numel() * (self.ref.in_features + self.ref.out_features)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self._ab()
        x = x.to(self.vera_lambda_d.dtype)
        out = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)
        return out.to(y.dtype)

    def weight_delta(self) -> torch.Tensor:
        a, b = self._ab()
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)


# -- FourierFT -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _frequencies(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """The (2, n) rows and columns of the trained spectral entries: peft's draw (one permutation of every entry,
    seeded), so every site of one shape uses the same entries. Cached: a 7B shape has few distinct shapes."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


@register
@dataclass
class FourierFTSettings(Settings):
    """FourierFT (Gao et al. 2024): dW = scaling · Re(IDFT2(F)), F zero except ``n_frequency`` trained entries at
    positions drawn from ``seed`` (peft's ``random_loc_seed``). ``init``: 'zeros' (peft's ``init_weights=True``)
    starts from the unchanged model, as peftlab's other kinds do, and trains all the same (dW is linear in the
    coefficients); 'normal' draws them from a standard normal as the paper's algorithm and peft's default do,
    which moves every weight by about scaling·sqrt(n)/(out·in) before training, more than the weights themselves
    on small matrices."""

    kind = "fourierft"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-2  # the paper's GLUE runs (RoBERTa-base)

    n_frequency: int = 1000
    scaling: float = 150.0
    seed: int = 777
    init: str = "zeros"

    def check(self) -> None:
        need_int("n_frequency", self.n_frequency, 1)
        need_float("scaling", self.scaling, 0.0, low_open=True)
        need_int("seed", self.seed, 0)
        need_choice("init", self.init, ("normal", "zeros"))

    def build(self, ctx: BuildContext) -> PeftModule:
        out_f, in_f = ctx.linear.out_features, ctx.linear.in_features
        if self.n_frequency > out_f * in_f:
            raise SpecError(
                f"fourierft n_frequency={self.n_frequency} is more than the "
                f"{out_f * in_f} spectral entries of its {out_f} x {in_f} weight"
            )
        return FourierFT(ctx, self)


class FourierFT(LinearModule):
    """Trained spectral coefficients; the weight delta is formed once per pass (in float32: no half-precision FFT)."""

    def __init__(self, ctx: BuildContext, s: FourierFTSettings) -> None:
        super().__init__(ctx)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(s.n_frequency, device=ctx.device, dtype=ctx.dtype))
        if s.init == "normal" and ctx.device.type != "meta":
            with torch.no_grad():
                self.fourierft_spectrum.normal_()
        self.scaling = s.scaling
        where = _frequencies(ctx.linear.out_features, ctx.linear.in_features, s.n_frequency, s.seed)
        self.register_buffer("indices", where.to(ctx.device), persistent=False)  # drawn again from the seed

    def flops_per_token(self) -> float:
        return 2.0 * self.ref.in_features * self.ref.out_features

    def flops_per_step(self) -> float:
        """The inverse 2-D FFT that forms the delta: about 5·N·log2(N) for N entries."""
        n = self.ref.in_features * self.ref.out_features
        return 5.0 * n * math.log2(n) if n > 1 else 0.0

    def weight_delta(self) -> torch.Tensor:
        spectrum = self.fourierft_spectrum
        dense = torch.zeros(self.ref.out_features, self.ref.in_features, device=spectrum.device)
        dense[self.indices[0], self.indices[1]] = spectrum.float()
        return (torch.fft.ifft2(dense).real * self.scaling).to(spectrum.dtype)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.weight_delta()
        return F.linear(x.to(delta.dtype), delta).to(y.dtype)


# -- LoHa ------------------------------------------------------------------------------------------------
@register
@dataclass
class LohaSettings(Settings):
    """LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): dW = (alpha/r)·(B1·A1) ⊙ (B2·A2), rank up to r² for the
    parameters of a rank-2r LoRA. peft's defaults and initialisation (B2's partner A2 at zero)."""

    kind = "loha"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4  # as LoRA: neither FedPara nor LyCORIS tunes a language model's rate

    r: int = 8
    alpha: float = 8.0

    def check(self) -> None:
        need_int("r", self.r, 1, 4096)
        need_float("alpha", self.alpha, 0.0, low_open=True)

    def build(self, ctx: BuildContext) -> PeftModule:
        return LoHa(ctx, self)


class LoHa(LinearModule):
    """peft's names: ``hada_w{1,2}_a`` (out × r) and ``hada_w{1,2}_b`` (r × in). The output delta uses the
    Hadamard product's r²-rank factorisation where that is cheaper than forming dW (small r)."""

    def __init__(self, ctx: BuildContext, s: LohaSettings) -> None:
        super().__init__(ctx)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        out_f, in_f = ctx.linear.out_features, ctx.linear.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, s.r, **kw))
        self.hada_w1_b = nn.Parameter(torch.empty(s.r, in_f, **kw))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, s.r, **kw))
        self.hada_w2_b = nn.Parameter(torch.zeros(s.r, in_f, **kw))
        if ctx.device.type != "meta":
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        self.scaling = s.alpha / s.r
        self.factored = s.r * s.r * (in_f + out_f) < in_f * out_f

    def flops_per_token(self) -> float:
        r, (out_f, in_f) = self.hada_w1_b.shape[0], (self.ref.out_features, self.ref.in_features)
        return 2.0 * r * r * (in_f + out_f) if self.factored else 2.0 * in_f * out_f

    def flops_per_step(self) -> float:
        """Forming dW (two rank-r products) where the delta is not factored."""
        return 0.0 if self.factored else 4.0 * self.hada_w1_b.shape[0] * self.ref.in_features * self.ref.out_features

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.hada_w1_a.dtype)
        if not self.factored:
            return F.linear(x, self.weight_delta()).to(y.dtype)
        r = self.hada_w1_b.shape[0]
        # dW[k, j] = sum over (i, l) of w1a[k, i]·w2a[k, l] · w1b[i, j]·w2b[l, j]
        a = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(r * r, -1)
        b = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(-1, r * r)
        return (F.linear(F.linear(x, a), b) * self.scaling).to(y.dtype)

    def weight_delta(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling


# -- LoKr -------------------------------------------------------------------------------------------------
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (LyCORIS's) split of ``dimension`` into m ≤ n with m·n = dimension: ``factor`` itself when it divides,
    else the divisors nearest the square root that do not exceed ``factor`` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@register
@dataclass
class LokrSettings(Settings):
    """LoKr (LyCORIS, Yeh et al. 2024): dW = (alpha/r)·(W1 ⊗ W2), W1 (a × c) small and W2 (b × d) large from
    peft's factorisation of the weight's sides; W2 is low rank (r) where r is under half its larger side, W1
    too with ``decompose_both``. peft's defaults and initialisation (W1 at zero)."""

    kind = "lokr"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4  # as LoRA and KronA: LyCORIS tunes image models only

    r: int = 8
    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1

    def check(self) -> None:
        need_int("r", self.r, 1, 4096)
        need_float("alpha", self.alpha, 0.0, low_open=True)
        if not isinstance(self.decompose_both, bool):
            raise SpecError(f"decompose_both must be true or false, got {self.decompose_both!r}")
        if self.decompose_factor != -1:
            need_int("decompose_factor (or -1)", self.decompose_factor, 1)

    def build(self, ctx: BuildContext) -> PeftModule:
        return LoKr(ctx, self)


class LoKr(LinearModule):
    """peft's names: ``lokr_w1`` or ``lokr_w1_a``·``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a``·``lokr_w2_b``. The
    output delta contracts the input, viewed as (c × d), with W2 then W1 (never forming dW)."""

    def __init__(self, ctx: BuildContext, s: LokrSettings) -> None:
        super().__init__(ctx)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        out_l, out_k = factorization(ctx.linear.out_features, s.decompose_factor)
        in_m, in_n = factorization(ctx.linear.in_features, s.decompose_factor)
        self.sides = (out_l, in_m, out_k, in_n)
        init = ctx.device.type != "meta"
        # peft's order: W1 (zero, or zero A · kaiming B), then W2 (kaiming)
        if s.decompose_both and s.r < max(out_l, in_m) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(out_l, s.r, **kw))
            self.lokr_w1_b = nn.Parameter(self._kaiming((s.r, in_m), kw, init))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(out_l, in_m, **kw))
        if s.r < max(out_k, in_n) / 2:
            self.lokr_w2_a = nn.Parameter(self._kaiming((out_k, s.r), kw, init))
            self.lokr_w2_b = nn.Parameter(self._kaiming((s.r, in_n), kw, init))
        else:
            self.lokr_w2 = nn.Parameter(self._kaiming((out_k, in_n), kw, init))
        self.scaling = s.alpha / s.r

    @staticmethod
    def _kaiming(shape: tuple[int, int], kw: dict, init: bool) -> torch.Tensor:
        t = torch.empty(shape, **kw)
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5)) if init else t

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if hasattr(self, "lokr_w2") else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def flops_per_token(self) -> float:
        out_l, in_m, out_k, in_n = self.sides
        return 2.0 * (in_m * in_n * out_k + out_l * in_m * out_k)

    def flops_per_step(self) -> float:
        """Forming the low-rank factors."""
        out_l, in_m, out_k, in_n = self.sides
        flops = 0.0
        if not hasattr(self, "lokr_w1"):
            flops += 2.0 * out_l * self.lokr_w1_a.shape[1] * in_m
        if not hasattr(self, "lokr_w2"):
            flops += 2.0 * out_k * self.lokr_w2_a.shape[1] * in_n
        return flops

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out_l, in_m, out_k, in_n = self.sides
        w1, w2 = self._factors()
        xr = x.to(w1.dtype).reshape(*x.shape[:-1], in_m, in_n)
        out = torch.einsum("ac,...cb->...ab", w1, xr @ w2.T)  # (W1 ⊗ W2)·vec(X) = vec(W1·X·W2ᵀ)
        return (self.scaling * out.reshape(*x.shape[:-1], out_l * out_k)).to(y.dtype)

    def weight_delta(self) -> torch.Tensor:
        w1, w2 = self._factors()
        return torch.kron(w1, w2) * self.scaling
