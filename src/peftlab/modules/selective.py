"""Selective tuning of existing parameters: BitFit (biases) and LayerNorm tuning.

Rather than unfreezing backbone tensors, each module trains a zero-initialised *delta* and adds it in
a hook. The result is the same function, but the backbone stays intact, several adapters can coexist,
and merging is just adding the delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.backbone.anatomy import find_head, find_suffix
from peftlab.errors import SpecError
from peftlab.modules.base import BuildContext, PeftModule, Settings, register


def _key(name: str) -> str:
    return name.replace(".", "-") or "self"


def model_norms(ctx: BuildContext) -> list[tuple[str, nn.Module]]:
    """The norms of a model-level site (``embed_norm``, ``final_norm``) that this family has."""
    paths = [ctx.anatomy.embed_norm] if ctx.site == "embed_norm" else list(ctx.anatomy.final_norms)
    return [(p, m) for p in paths if p and (m := find_suffix(ctx.model, p)) is not None]


def model_biases(ctx: BuildContext) -> list[tuple[str, nn.Module]]:
    """Biased modules outside the transformer blocks and the task head (embeddings, poolers, final norms)."""
    inside = {id(m) for b in ctx.blocks for m in b.module.modules()}
    found = find_head(ctx.model, ctx.anatomy)
    inside |= {id(m) for m in found[1].modules()} if found else set()
    return [
        (n, m)
        for n, m in ctx.model.named_modules()
        if id(m) not in inside and isinstance(getattr(m, "bias", None), nn.Parameter)
    ]


class DeltaModule(PeftModule):
    """Zero-initialised deltas for named backbone tensors, added by post-hooks and merged by addition."""

    def __init__(self, ctx: BuildContext, hosts: list[tuple[str, nn.Module]]) -> None:
        super().__init__(ctx)
        self._hosts = dict((_key(n), m) for n, m in hosts)
        self.deltas = nn.ParameterDict()

    def _add_delta(self, name: str, tensor: torch.Tensor) -> None:
        self.deltas[name] = nn.Parameter(torch.zeros_like(tensor))

    @property
    def mergeable(self) -> bool:
        return True

    def flops_per_token(self) -> float:
        return 0.0  # elementwise additions (and a norm recomputed): no matmul

    def _targets(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        """(backbone tensor, its delta) pairs."""
        raise NotImplementedError

    def merge(self) -> None:
        with torch.no_grad():
            for target, delta in self._targets():
                target.add_(delta.to(target.dtype))
        self.merged = True

    def unmerge(self) -> None:
        with torch.no_grad():
            for target, delta in self._targets():
                target.sub_(delta.to(target.dtype))
        self.merged = False

    def changed_numel(self) -> int:
        return sum(t.numel() for t, _ in self._targets())


@register
@dataclass
class BitFitSettings(Settings):
    """BitFit (Ben Zaken et al. 2021): train every bias of the block (linear and LayerNorm biases)."""

    kind = "bitfit"
    roles = frozenset({"bias"})
    mergeable = True
    default_lr = 1e-4  # UniPELT's appendix B

    def build(self, ctx: BuildContext) -> PeftModule | None:
        if ctx.block is None:
            hosts = model_biases(ctx)
            return BitFit(ctx, hosts) if hosts else None
        hosts = ctx.block.biases()
        if not hosts:
            raise SpecError(
                f"layer {ctx.block.index}: bitfit needs bias terms, and this backbone's blocks have none "
                "(Llama and T5 are bias-free); choose another method for this model"
            )
        return BitFit(ctx, hosts)


class BitFit(DeltaModule):
    def __init__(self, ctx: BuildContext, hosts: list[tuple[str, nn.Module]]) -> None:
        super().__init__(ctx, hosts)
        for key, m in self._hosts.items():
            self._add_delta(key, m.bias)

    def attach(self, ctx: BuildContext) -> None:
        for key, m in self._hosts.items():
            ctx.hooks.add(m, "post", self, self._adder(key))

    def _adder(self, key: str):
        def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return y + self.deltas[key].to(y.dtype)

        return add

    def _targets(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        return [(m.bias, self.deltas[k]) for k, m in self._hosts.items()]


@register
@dataclass
class LNSettings(Settings):
    """LayerNorm tuning (Zhao et al. 2023): train the gains (and biases) of the norms at the site."""

    kind = "ln"
    roles = frozenset({"norm"})
    mergeable = True
    default_lr = 1e-3

    def build(self, ctx: BuildContext) -> PeftModule | None:
        if ctx.block is None:
            hosts = model_norms(ctx)
            return LNTune(ctx, hosts) if hosts else None  # e.g. Llama has no embedding norm
        return LNTune(ctx, ctx.block.norms())


def normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's output before its affine part (LayerNorm or RMSNorm)."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LNTune(DeltaModule):
    def __init__(self, ctx: BuildContext, hosts: list[tuple[str, nn.Module]]) -> None:
        super().__init__(ctx, hosts)
        for key, m in self._hosts.items():
            self._add_delta(f"{key}-weight", m.weight)
            if getattr(m, "bias", None) is not None:
                self._add_delta(f"{key}-bias", m.bias)

    def attach(self, ctx: BuildContext) -> None:
        for key, m in self._hosts.items():
            ctx.hooks.add(m, "post", self, self._adder(key, m))

    def _adder(self, key: str, norm: nn.Module):
        bias_key = f"{key}-bias"

        def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            delta = self.deltas[f"{key}-weight"].to(y.dtype)
            if isinstance(norm, nn.LayerNorm):  # one fused norm with the tuned affine: y's graph is dropped
                weight = norm.weight.to(y.dtype) + delta
                bias = norm.bias.to(y.dtype) if norm.bias is not None else None
                if bias_key in self.deltas:
                    bias = self.deltas[bias_key].to(y.dtype) + (bias if bias is not None else 0)
                return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
            out = y + normalize(norm, x) * delta
            if bias_key in self.deltas:
                out = out + self.deltas[bias_key].to(y.dtype)
            return out

        return add

    def _targets(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        pairs = []
        for key, m in self._hosts.items():
            pairs.append((m.weight, self.deltas[f"{key}-weight"]))
            if f"{key}-bias" in self.deltas:
                pairs.append((m.bias, self.deltas[f"{key}-bias"]))
        return pairs
