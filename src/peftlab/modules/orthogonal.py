"""Multiplicative (orthogonal) modules at a linear site: OFT, BOFT and HRA.

Each turns the site's weight W into W·Mᵀ for a trained (near-)orthogonal matrix M acting on the *input*
side, as the ``peft`` library does (its layers rotate the input, ``x @ M``, before the frozen layer; merging
gives ``W @ Mᵀ``). BOFT also rescales every output (``boft_s``). Acting on the input keeps the rotation the
width of the hidden state, so a slice of a fused projection (GPT-2's ``c_attn``) can carry its own rotation.

They keep the :class:`~peftlab.modules.linear.LinearModule` contract: the frozen host runs as it is and a post
hook adds ``W·(M x − x)`` (and BOFT's rescaling), so other modules on the same host compose additively, and a
merged model equals the unmerged one. Merging reads W before it changes it; unmerging solves with the same M
(in float64), so the backbone comes back to float error even where M is only nearly orthogonal (OFT's
Cayley–Neumann series).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.errors import SpecError
from peftlab.modules.base import BuildContext, PeftModule, Settings, need_float, need_int, register
from peftlab.modules.linear import LinearModule


def _need_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{name} must be true or false, got {value!r}")


def _skew(vec: torch.Tensor, size: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric (n, size, size) matrices from their strict upper triangles (n, size·(size-1)/2)."""
    m = torch.zeros(vec.shape[0], size, size, device=vec.device, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def _block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p·n)`` random blocks of (n, b, b) become the identity (OFT/BOFT papers)."""
    n, b, _ = blocks.shape
    drop = int(p * n)
    if drop == 0 or n == 1:
        return blocks
    mask = torch.zeros(n, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(n, device=blocks.device)[:drop]] = 1
    mask = mask.view(n, 1, 1)
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


class OrthogonalModule(LinearModule):
    """Base of the multiplicative kinds: subclasses give the input rotation ``rotate(x) = x @ M`` and the matrix
    ``rotation() = M``; ``out_scale()`` is an optional per-output factor (BOFT)."""

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.rotation()

    def rotation(self) -> torch.Tensor:
        raise NotImplementedError

    def out_scale(self) -> torch.Tensor | None:
        return None

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def output_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self._param_dtype()
        xc = x if x.dtype == dtype else x.to(dtype)
        w = self.ref.weight.to(dtype)
        delta = F.linear(self.rotate(xc) - xc, w)
        s = self.out_scale()
        if s is not None:
            # s·W·M x − W x = s·W(M x − x) + (s − 1)·W x; W x: the host's output less its bias (as (IA)3 reads it).
            base = y if self.ref.out_slice is None else y[..., self.ref.out_slice]
            bias = self.ref.bias
            if bias is not None:
                base = base - bias
            delta = s * delta + (s - 1) * base.to(dtype)
        return delta if delta.dtype == y.dtype else delta.to(y.dtype)

    def _merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = s ⊙ (W·Mᵀ), in float64."""
        new = w.double() @ self.rotation().detach().double().T
        s = self.out_scale()
        return new if s is None else new * s.detach().double()[:, None]

    def _unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W from W' = s ⊙ (W·Mᵀ), solving with the same M (exact also where M is not quite orthogonal)."""
        s = self.out_scale()
        w = w.double() if s is None else w.double() / s.detach().double()[:, None]
        return torch.linalg.solve(self.rotation().detach().double().T, w, left=False)

    def weight_delta(self) -> torch.Tensor:
        """W' − W for the unmerged weight: what merging adds."""
        w = self.ref.weight
        return (self._merged_weight(w) - w.double()).to(w.dtype)

    def merge(self) -> None:
        with torch.no_grad():
            w = self.ref.weight
            w.copy_(self._merged_weight(w).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        with torch.no_grad():
            w = self.ref.weight
            w.copy_(self._unmerged_weight(w).to(w.dtype))
        self.merged = False

    def _extra_matmul_flops(self) -> float:
        """The output delta multiplies W once more (the host's own product is frozen and left alone). The cost model
        doubles every module FLOP for the backward; this product's frozen W needs only the input gradient, so the
        prediction is high by this much once per token."""
        return 2.0 * self.ref.in_features * self.ref.out_features


# -- OFT ----------------------------------------------------------------------------------------------------
@register
@dataclass
class OftSettings(Settings):
    """OFT (Qiu et al. 2023): a block-diagonal orthogonal matrix from the Cayley transform of skew-symmetric blocks,
    zero at init (the identity). Give exactly one of ``r`` (blocks) and ``block_size`` (r × block_size = the input
    width). ``coft``: constrained OFT, each block kept within ``eps`` of zero; ``block_share``: one block for all;
    ``cayley_neumann``: peft's default truncated series (``neumann_terms``) instead of the exact inverse."""

    kind = "oft"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4

    r: int = 0
    block_size: int = 32
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    cayley_neumann: bool = True
    neumann_terms: int = 5

    def check(self) -> None:
        need_int("r", self.r, 0)
        need_int("block_size", self.block_size, 0)
        if (self.r == 0) == (self.block_size == 0):
            raise SpecError(
                f"takes exactly one of r and block_size (r × block_size = the input width), got r={self.r}, "
                f"block_size={self.block_size}"
            )
        need_float("module_dropout", self.module_dropout, 0.0, 0.99)
        need_float("eps", self.eps, 0.0, low_open=True)
        need_int("neumann_terms", self.neumann_terms, 2, 64)  # one term is the identity: nothing to train
        for name in ("coft", "block_share", "cayley_neumann"):
            _need_bool(name, getattr(self, name))

    def blocks(self, width: int, site: str) -> tuple[int, int]:
        """(blocks, block size) for an input width; a size that does not divide it is refused."""
        given, what = (self.block_size, "block_size") if self.block_size else (self.r, "r")
        if given > width or width % given:
            raise SpecError(f"layer site {site}: oft {what}={given} must divide the input width {width}")
        return (width // given, given) if self.block_size else (given, width // given)

    def build(self, ctx: BuildContext) -> PeftModule:
        r, b = self.blocks(ctx.linear.in_features, ctx.site)
        if b < 2:
            raise SpecError(f"layer site {ctx.site}: oft blocks of size {b} have no rotation; use blocks of 2 or more")
        return OFT(ctx, self, r, b)


class OFT(OrthogonalModule):
    """r rotation blocks of size b; ``oft_R`` holds each block's strict upper triangle (peft's layout)."""

    def __init__(self, ctx: BuildContext, s: OftSettings, r: int, b: int) -> None:
        super().__init__(ctx)
        self.r, self.b, self.s = r, b, s
        stored = 1 if s.block_share else r
        self.oft_R = nn.Parameter(torch.zeros(stored, b * (b - 1) // 2, device=ctx.device, dtype=ctx.dtype))
        rows, cols = torch.triu_indices(b, b, 1, device=ctx.device)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def _project(self) -> None:
        """COFT: keep each block's skew matrix within eps/sqrt(blocks) of zero (peft's ``_project_batch``)."""
        with torch.no_grad():
            q = _skew(self.oft_R, self.b, self._rows, self._cols)
            eps = self.s.eps / math.sqrt(q.shape[0])
            norm = q.norm(dim=(1, 2), keepdim=True)
            out = torch.where(norm <= eps, q, eps * q / norm)
            self.oft_R.copy_(out[:, self._rows, self._cols])

    def blocks(self, drop: bool = False) -> torch.Tensor:
        """The (r, b, b) rotation blocks (peft's Cayley–Neumann series, or the exact Cayley transform); ``drop``:
        with multiplicative dropout (training only, never when merging)."""
        if self.s.coft:
            self._project()
        q = _skew(self.oft_R, self.b, self._rows, self._cols)
        eye = torch.eye(self.b, device=q.device, dtype=q.dtype).expand_as(q)
        terms = self.s.neumann_terms
        if self.s.cayley_neumann:
            # peft 0.21's series: I + 2Q + 2Q² + … + Q^(terms-1), the last term halved.
            rot = eye.clone()
            if terms > 1:
                rot = rot + 2 * q
                if terms > 2:
                    power = q @ q
                    rot = rot + 2 * power
                    for _ in range(3, terms - 1):
                        power = power @ q
                        rot = rot + 2 * power
                    rot = rot + power @ q
        else:
            rot = torch.linalg.solve(eye + q, eye - q, left=False)
        if self.s.block_share:
            rot = rot.expand(self.r, self.b, self.b)
        if drop and self.s.module_dropout > 0:
            rot = _block_dropout(rot, self.s.module_dropout)
        return rot

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        xr = x.reshape(*x.shape[:-1], self.r, self.b)
        return torch.einsum("...rk,rkc->...rc", xr, self.blocks(self.training)).reshape(x.shape)

    def rotation(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks())

    def _unmerged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Block by block: W = W'·R⁻ᵀ with each block's inverse (the series' blocks are not exactly orthogonal)."""
        blocks = self.blocks().detach().double()
        wr = w.double().reshape(w.shape[0], self.r, self.b)
        return torch.einsum("ork,rck->orc", wr, torch.linalg.inv(blocks)).reshape(w.shape)

    def _merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks().detach().double()
        wr = w.double().reshape(w.shape[0], self.r, self.b)
        # W' = W·Mᵀ: block k of W's columns times R_kᵀ.
        return torch.einsum("ork,rck->orc", wr, blocks).reshape(w.shape)

    def flops_per_token(self) -> float:
        return 2.0 * self.ref.in_features * self.b + self._extra_matmul_flops()

    def flops_per_step(self) -> float:
        """Forming the blocks: the series' products (or the solve, about as many) of b×b matrices."""
        products = max(self.s.neumann_terms - 2, 0) if self.s.cayley_neumann else 3
        return 2.0 * products * self.oft_R.shape[0] * self.b**3


# -- BOFT ---------------------------------------------------------------------------------------------------
def _butterfly_perm(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """peft's ``block_butterfly_perm``: the indices of the block butterfly permutation (identity for one factor)."""
    if factors == 0:
        return torch.arange(n)
    size = n // blocks
    step = size / half
    order = torch.empty(size, dtype=torch.long)
    seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(seq):
        order[int(i * half) : int(i * half + half)] = torch.arange(size)[int(pos * half) : int(pos * half + half)]
    indices = torch.arange(n)
    for start in range(0, n, size):
        indices[start : start + size] = indices[start : start + size][order]
    return indices


@register
@dataclass
class BoftSettings(Settings):
    """BOFT (Liu et al. 2024): the orthogonal matrix as a product of ``butterfly_factor`` block-diagonal factors, each
    permuted by a butterfly permutation, with (exact) Cayley blocks, and a trained scale per output. Give exactly
    one of ``block_size`` and ``block_num`` (their product is the input width); ``dropout``: multiplicative dropout
    of blocks while training."""

    kind = "boft"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4

    block_size: int = 4
    block_num: int = 0
    butterfly_factor: int = 1
    dropout: float = 0.0

    def check(self) -> None:
        need_int("block_size", self.block_size, 0)
        need_int("block_num", self.block_num, 0)
        if (self.block_size == 0) == (self.block_num == 0):
            raise SpecError(
                f"takes exactly one of block_size and block_num (their product is the input width), got "
                f"block_size={self.block_size}, block_num={self.block_num}"
            )
        need_int("butterfly_factor", self.butterfly_factor, 1, 32)
        need_float("dropout", self.dropout, 0.0, 0.99)

    def shape(self, width: int, site: str) -> tuple[int, int]:
        """(block_num, block_size) for an input width, with peft's checks as one-line errors."""
        f = self.butterfly_factor - 1
        where = f"layer site {site}: boft"
        if self.block_num:
            if width % self.block_num:
                raise SpecError(f"{where} block_num={self.block_num} must divide the input width {width}")
            if f and (f > int(math.log2(self.block_num)) or self.block_num % 2**f):
                raise SpecError(
                    f"{where} block_num={self.block_num} must be a multiple of 2^(butterfly_factor-1)="
                    f"{2**f} for butterfly_factor={self.butterfly_factor}"
                )
            num, size = self.block_num, width // self.block_num
        else:
            if width % self.block_size:
                raise SpecError(f"{where} block_size={self.block_size} must divide the input width {width}")
            if f and width % (self.block_size * 2**f):
                raise SpecError(
                    f"{where} block_size × 2^(butterfly_factor-1) = {self.block_size * 2**f} must divide the input "
                    f"width {width}"
                )
            num, size = width // self.block_size, self.block_size
        if f and (num % 2 or size % 2):
            raise SpecError(
                f"{where} with butterfly_factor > 1 needs an even block_num and block_size, got {num} and {size}"
            )
        if size < 2:
            raise SpecError(f"{where} blocks of size {size} have no rotation; use blocks of 2 or more")
        return num, size

    def build(self, ctx: BuildContext) -> PeftModule:
        num, size = self.shape(ctx.linear.in_features, ctx.site)
        return BOFT(ctx, self, num, size)


class BOFT(OrthogonalModule):
    """``boft_R`` (factors, blocks, b, b) and ``boft_s`` (out, 1), as peft stores them."""

    def __init__(self, ctx: BuildContext, s: BoftSettings, num: int, size: int) -> None:
        super().__init__(ctx)
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        m, width = s.butterfly_factor, ctx.linear.in_features
        self.dropout = s.dropout
        self.boft_R = nn.Parameter(torch.zeros(m, num, size, size, **kw))
        self.boft_s = nn.Parameter(torch.ones(ctx.linear.out_features, 1, **kw))
        # peft's factor i permutes by P_i (P_i[j, perm[j]] = 1): x @ P_i B P_iᵀ = blocks(x[inv])[perm].
        perms = torch.stack([_butterfly_perm(width, num // 2**i, size // 2, m - 1) for i in range(m)])
        self.register_buffer("_perm", perms.to(ctx.device), persistent=False)
        self.register_buffer("_inv", torch.argsort(perms, dim=1).to(ctx.device), persistent=False)

    def blocks(self, drop: bool = False) -> torch.Tensor:
        """(factors, blocks, b, b) orthogonal blocks: the exact Cayley transform of 0.5·(R − Rᵀ); ``drop``: with
        multiplicative dropout (training only)."""
        m, num, b, _ = self.boft_R.shape
        data = self.boft_R.reshape(m * num, b, b)
        skew = 0.5 * (data - data.transpose(1, 2))
        eye = torch.eye(b, device=data.device, dtype=data.dtype).expand_as(skew)
        rot = torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(m, num, b, b)
        if drop and self.dropout > 0:
            # as peft: the blocks of one random factor are dropped
            i = int(torch.randint(0, m, (1,)))
            rot = torch.cat([rot[:i], _block_dropout(rot[i], self.dropout)[None], rot[i + 1 :]])
        return rot

    def out_scale(self) -> torch.Tensor:
        return self.boft_s[:, 0]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self._butterfly(x, self.blocks(self.training))

    def _butterfly(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x @ M with M = F_{m-1}···F_0, each factor a permuted block diagonal: O(width·b) per token and factor."""
        m, num, b, _ = rot.shape
        for i in reversed(range(m)):
            z = x[..., self._inv[i]].reshape(*x.shape[:-1], num, b)
            z = torch.einsum("...nk,nkc->...nc", z, rot[i]).reshape(x.shape)
            x = z[..., self._perm[i]]
        return x

    def rotation(self) -> torch.Tensor:
        width = self._perm.shape[1]
        return self._butterfly(torch.eye(width, device=self.boft_R.device, dtype=self.boft_R.dtype), self.blocks())

    def flops_per_token(self) -> float:
        m, _, b, _ = self.boft_R.shape
        return 2.0 * m * self.ref.in_features * b + self._extra_matmul_flops()

    def flops_per_step(self) -> float:
        """The Cayley solves, about 3 b×b products per block."""
        return 6.0 * self.boft_R.numel() * self.boft_R.shape[-1]


# -- HRA ----------------------------------------------------------------------------------------------------
@register
@dataclass
class HraSettings(Settings):
    """HRA (Yuan et al. 2024): the product of r Householder reflections I − 2uuᵀ (columns of ``hra_u``). Starts as
    pairs of equal reflections, the identity (an odd r cannot, and starts random, as in peft). ``apply_gs``:
    Gram–Schmidt-orthogonalised reflections, H = I − 2UUᵀ (never the identity, so the model changes at init; its
    columns start independent, not paired as in peft, whose paired start orthogonalises round-off)."""

    kind = "hra"
    roles = frozenset({"linear"})
    mergeable = True
    default_lr = 5e-4

    r: int = 8
    apply_gs: bool = False

    def check(self) -> None:
        need_int("r", self.r, 1, 4096)
        _need_bool("apply_gs", self.apply_gs)

    def build(self, ctx: BuildContext) -> PeftModule:
        width = ctx.linear.in_features
        if self.r > width:
            raise SpecError(f"layer site {ctx.site}: hra r={self.r} must be at most the input width {width}")
        return HRA(ctx, self)


class HRA(OrthogonalModule):
    """``hra_u`` (width, r), peft's layout; the reflections act as H = H_0···H_{r-1} on the column input."""

    def __init__(self, ctx: BuildContext, s: HraSettings) -> None:
        super().__init__(ctx)
        self.apply_gs = s.apply_gs
        width, r = ctx.linear.in_features, s.r
        kw = {"device": ctx.device, "dtype": ctx.dtype}
        if ctx.device.type == "meta":
            u = torch.empty(width, r, **kw)
        elif r % 2 == 0 and not s.apply_gs:
            half = torch.zeros(width, r // 2, **kw)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)  # paired reflections: the identity
        else:
            # Gram–Schmidt of paired columns (peft's init) would normalise round-off: the model changes at init either
            # way (I − 2UUᵀ is never the identity), so GS starts from independent columns.
            if not s.apply_gs:
                warnings.warn(
                    f"hra r={r} is odd: reflections cannot pair up, so the model changes at init",
                    UserWarning,
                    stacklevel=2,
                )
            u = torch.empty(width, r, **kw)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u)

    def _vectors(self) -> torch.Tensor:
        """Unit reflection vectors (width, r); Gram–Schmidt-orthonormalised with ``apply_gs``."""
        u = self.hra_u
        if not self.apply_gs:
            return u / u.norm(dim=0)
        cols = [u[:, 0] / u[:, 0].norm()]
        for i in range(1, u.shape[1]):
            ui = u[:, i]
            for w in cols:
                ui = ui - (w @ ui) * w
            cols.append(ui / ui.norm())
        return torch.stack(cols, dim=1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """H x (as a row: x·Hᵀ): reflection r-1 first; with Gram–Schmidt x − 2(x·U)Uᵀ."""
        u = self._vectors()
        if self.apply_gs:
            return x - 2 * (x @ u) @ u.T
        for i in reversed(range(u.shape[1])):
            ui = u[:, i]
            x = x - 2 * (x @ ui)[..., None] * ui
        return x

    def rotation(self) -> torch.Tensor:
        width = self.hra_u.shape[0]
        return self.rotate(torch.eye(width, device=self.hra_u.device, dtype=self.hra_u.dtype))

    def flops_per_token(self) -> float:
        return 4.0 * self.hra_u.numel() + self._extra_matmul_flops()

    def flops_per_step(self) -> float:
        """Gram–Schmidt: r²/2 projections of width-long vectors."""
        width, r = self.hra_u.shape
        return 2.0 * width * r * r if self.apply_gs else 0.0
