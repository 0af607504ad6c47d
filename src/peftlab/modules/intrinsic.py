"""Intrinsic SAID (Aghajanyan et al. 2021): every weight matrix moves in one shared random d-dimensional subspace.

θ_i = θ0_i + λ_i·P_i(θ_{d−m}): one trained vector for the whole adapter, projected to each of its m weight matrices by
the matrix's own Fastfood transform P_i (Le et al. 2013), and one trained scalar λ_i per matrix (SAID, the
structure-aware variant): d trained numbers in all, the paper's θ_d = [θ_{d−m}, λ_1..λ_m]. The transforms are
random but fixed: drawn from ``seed`` and the matrix's place, never stored, so the adapter file holds the d numbers
only. Their cost is memory: every matrix keeps Fastfood buffers as long as the matrix (the survey's caveat).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import SpecError
from peftlab.modules.base import BuildContext, PeftModule, Settings, need_int, register
from peftlab.modules.linear import LinearModule
from peftlab.modules.reparam import _same


def fwht(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised fast Walsh–Hadamard transform over the last dimension (a power of two): H·x in
    O(n log n) by log2(n) butterfly passes, H the Sylvester-ordered Hadamard matrix."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


class Fastfood(nn.Module):
    """The Fastfood projection from R^d to R^D: V = (1 / (σ·sqrt(D))) · H·G·Π·H·B on θ_d zero-padded to L = 2^⌈log2 D⌉
    (B random signs, Π a permutation, G Gaussian, σ = ||G||, as Li et al.'s intrinsic-dimension code), cut to its
    first D entries: O(L log L) time, O(L) memory, the matrix never formed. Its tensors are buffers drawn from
    ``seed`` and not stored."""

    def __init__(self, d: int, out: int, seed: int, device: torch.device) -> None:
        super().__init__()
        length = 1 << max(0, math.ceil(math.log2(max(out, d))))
        self.d, self.out, self.length = d, out, length
        if device.type == "meta":  # counting a shape: no values
            signs, perm, gauss = (
                torch.empty(length, dtype=t, device=device) for t in (torch.int8, torch.int32, torch.float32)
            )
            self.divisor = 1.0
        else:
            g = torch.Generator().manual_seed(seed)
            signs = (torch.randint(0, 2, (length,), generator=g) * 2 - 1).to(torch.int8)
            perm = torch.randperm(length, generator=g).to(torch.int32)
            gauss = torch.randn(length, generator=g)
            # Aghajanyan et al.'s divisor sqrt(L·||G||²)·sqrt(D/L): each output's variance is about ||θ_d||² / D
            self.divisor = math.sqrt(length * float(gauss.pow(2).sum())) * math.sqrt(out / length)
        # compact dtypes: Intrinsic SAID's cost is these L-sized buffers for every matrix
        self.register_buffer("signs", signs.to(device), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("gauss", gauss.to(device), persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        x = F.pad(v.float(), (0, self.length - v.shape[-1])) * self.signs.float()
        x = fwht(x)[..., self.perm] * self.gauss
        return fwht(x)[..., : self.out] / self.divisor


class SubspaceVector(nn.Module):
    """θ_{d−m}, the adapter's one trained vector, shared by every matrix (zero at init: the model starts unchanged)."""

    def __init__(self, d: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))


@register
@dataclass
class IntrinsicSaidSettings(Settings):
    """Intrinsic SAID: θ_i = θ0_i + λ_i·Fastfood_i(θ_{d−m}) for the weight of each of the m linears it is placed on; the
    adapter trains ``d`` numbers, the projected vector (d − m) and one λ_i per matrix (starting at 1). ``seed`` draws
    the Fastfood transforms."""

    kind = "intrinsic-said"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 1e-2  # a few thousand numbers move every weight: the subspace trains at a high rate

    d: int = 1000
    seed: int = 0

    def check(self) -> None:
        need_int("d", self.d, 1, 1 << 24)
        need_int("seed", self.seed, 0, (1 << 31) - 1)

    @classmethod
    def plan(cls, placed: list[Settings]) -> None:
        _same(placed, ("d", "seed"), "they share one subspace vector")

    def build(self, ctx: BuildContext) -> PeftModule:
        matrices = len(ctx.placed) or 1
        if self.d <= matrices:
            raise SpecError(
                f"intrinsic-said d={self.d} must exceed the {matrices} weight matrices it is placed on "
                "(each takes one of the d trained numbers as its scale λ)"
            )
        size = self.d - matrices
        theta = ctx.share("said_theta", lambda: SubspaceVector(size, ctx.device, ctx.dtype), folds=True)
        return IntrinsicSAID(ctx, self, theta)


class IntrinsicSAID(LinearModule):
    """One weight matrix's share of the subspace: its Fastfood transform (seeded by ``seed`` and its site) and λ."""

    def __init__(self, ctx: BuildContext, s: IntrinsicSaidSettings, theta: SubspaceVector) -> None:
        super().__init__(ctx)
        ref = ctx.linear
        self._theta = (theta,)  # shared: not a submodule, stored and counted once
        layer = ctx.block.index if ctx.block is not None else -1
        place = zlib.crc32(f"{layer}-{ctx.site}".encode())
        self.shape = (ref.out_features, ref.in_features)
        seed = (s.seed * 1_000_003 + place) % (1 << 63)
        self.fastfood = Fastfood(theta.theta.numel(), ref.out_features * ref.in_features, seed, ctx.device)
        self.said_lambda = nn.Parameter(torch.ones(1, device=ctx.device, dtype=ctx.dtype))
        self._cached: tuple[tuple, torch.Tensor] | None = None

    def flops_per_token(self) -> float:
        """The input through the projected weight delta (full rank)."""
        return 2.0 * self.shape[0] * self.shape[1]

    def flops_per_step(self) -> float:
        """Two Walsh–Hadamard transforms of length L: L·log2(L) additions each, counted as FLOPs."""
        n = self.fastfood.length
        return 2.0 * n * math.log2(max(n, 2))

    def weight_delta(self) -> torch.Tensor:
        """λ·Fastfood(θ_d) as the matrix; without autograd (evaluation, generation) kept until θ_d or λ change."""
        theta = self._theta[0].theta
        if torch.is_grad_enabled():
            self._cached = None
            return self._delta(theta)
        key = (theta._version, id(theta), self.said_lambda._version, theta.device, theta.dtype)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._delta(theta))
        return self._cached[1]

    def _delta(self, theta: torch.Tensor) -> torch.Tensor:
        return (self.said_lambda.float() * self.fastfood(theta)).view(self.shape).to(theta.dtype)

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.weight_delta()
        return F.linear(x.to(delta.dtype), delta).to(y.dtype)
