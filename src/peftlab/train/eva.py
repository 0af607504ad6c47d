"""EVA (Paischer et al. 2024, "One Initialization to Rule them All"): LoRA's A from the principal components of each
site's inputs, with the rank budget redistributed to the components that explain the most variance.

It needs data, so it runs where the data is: :class:`~peftlab.train.loop.Run` calls :func:`initialize_eva` on the first
training batches before the first step (``TrainConfig.init_batches``); a spec applied without data starts its EVA
sites as plain LoRA. Like peft's ``initialize_lora_eva_weights`` it centres the inputs (peft's incremental PCA does),
gives every site up to ``r·rho`` components, hands out ``r`` per site in all to the components with the highest
explained-variance ratio, drops sites left with none, and scales alpha with the rank (peft's
``adjust_scaling_factors``), so a site's scaling stays alpha/r. Unlike peft it reads every given batch (no early stop
on converged components: the batches are few) and computes the components exactly, from the inputs' covariance.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from peftlab.backbone.anatomy import stack_names
from peftlab.core.peft_model import PeftModel
from peftlab.errors import PeftlabError
from peftlab.formats.keys import module_key
from peftlab.modules.linear import LoraSettings

_Site = tuple[int, str, LoraSettings, nn.Module]


def eva_sites(pm: PeftModel, adapter_name: str | None = None) -> list[_Site]:
    """(layer, site, settings, module) of every LoRA module of the adapter whose init is EVA."""
    adapter = pm.adapters[adapter_name or pm.active_adapter]
    per_layer = adapter.spec.resolve(len(pm.blocks), stack_names(pm.blocks))
    return [
        (i, site, s, adapter.layers[module_key(i, site)])
        for i, sites in per_layer.items()
        for site, s in sites.items()
        if isinstance(s, LoraSettings) and s.init == "eva" and module_key(i, site) in adapter.layers
    ]


class _Moments:
    """Running sums of a host's inputs over the real tokens: enough for their mean and covariance."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, dtype=torch.float64)
        self.outer = torch.zeros(features, features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self.n += x.shape[0]

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The principal directions (rows, by decreasing variance) and their explained-variance ratios."""
        mean = self.sum / self.n
        cov = self.outer / self.n - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(cov)
        values = values.flip(0).clamp_min(0)
        return vectors.flip(1).T.to(torch.float32), (values / values.sum().clamp_min(1e-30)).to(torch.float32)


def _mask_for(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor | None:
    """The batch's mask of real positions shaped like the input's positions (encoder or decoder), if any."""
    return next((m for m in masks if m.shape == x.shape[:-1]), None)


def rank_distribution(sites: list[_Site], ratios: dict[int, torch.Tensor]) -> list[int]:
    """peft's redistribution: the budget (r per site) goes to the components with the highest explained-variance
    ratio across sites, each site offering at most round(r·rho) of them (and no more than its input width)."""
    offered = []
    for k, (_, _, s, m) in enumerate(sites):
        most = min(round(s.r * s.eva_rho), m.ref.in_features)
        offered += [(float(v), k) for v in ratios[k][:most]]
    budget = sum(s.r for _, _, s, _ in sites)
    chosen = Counter(k for _, k in sorted(offered, key=lambda t: -t[0])[:budget])
    return [chosen.get(k, 0) for k in range(len(sites))]


def initialize_eva(
    pm: PeftModel, batches: Iterable[dict[str, torch.Tensor]], adapter_name: str | None = None
) -> dict[str, int]:
    """Set the EVA sites of the adapter from ``batches`` (model inputs, on the model's device): rebuilds the adapter
    with the redistributed ranks (its spec then names them per layer, so it saves and loads as it is) and sets each
    A to its site's principal components, B staying zero (the model is unchanged). Returns the rank per site
    (``<layer>-<site>``; 0: dropped)."""
    name = adapter_name or pm.active_adapter
    sites = eva_sites(pm, name)
    if not sites:
        return {}
    if any(m.merged for _, m in pm.adapters[name].all_modules()):
        raise PeftlabError(f"adapter '{name}' is merged; EVA initialises an unmerged adapter")
    hosts = {id(m.ref.module): m.ref.module for *_, m in sites}
    moments: dict[int, _Moments] = {}
    masks: list[torch.Tensor] = []

    def watch(module: nn.Module, args: tuple) -> None:
        x = args[0]
        mask = _mask_for(x, masks)
        rows = x.reshape(-1, x.shape[-1])
        if mask is not None:
            rows = rows[mask.reshape(-1).bool()]
        moments.setdefault(id(module), _Moments(x.shape[-1])).add(rows)

    handles = [h.register_forward_pre_hook(watch) for h in hosts.values()]
    training = pm.training
    pm.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                labels = batch.get("labels")
                masks[:] = [batch[k] for k in ("attention_mask", "decoder_attention_mask") if k in batch]
                if labels is not None and labels.dim() == 2:
                    masks.append(labels != -100)  # a decoder's real target positions (peft's label mask)
                pm(**batch)
    finally:
        for h in handles:
            h.remove()
        pm.train(training)
    if any(moments.get(id(m.ref.module)) is None or moments[id(m.ref.module)].n < 2 for *_, m in sites):
        raise PeftlabError("EVA needs inputs at every site it initialises: give it batches with real tokens")
    found = {h: moments[h].components() for h in hosts}
    ratios = {k: found[id(m.ref.module)][1] for k, (*_, m) in enumerate(sites)}
    ranks = rank_distribution(sites, ratios)

    spec = pm.adapters[name].spec
    layers = {key: dict(sites_) for key, sites_ in spec.layers.items()}
    for (i, site, s, _), r in zip(sites, ranks, strict=True):
        new = dataclasses.replace(s, r=r, alpha=s.alpha * r / s.r) if r else None
        layers.setdefault(str(i), {})[site] = new
    active = pm.active_adapter == name
    pm.delete_adapter(name)
    pm.add_adapter(name, dataclasses.replace(spec, layers=layers))
    if active:
        pm.set_adapter(name)
    rebuilt = pm.adapters[name].layers
    with torch.no_grad():
        for (i, site, _, old), r in zip(sites, ranks, strict=True):
            if r:
                a = rebuilt[module_key(i, site)].lora_A
                a.copy_(found[id(old.ref.module)][0][:r].to(a.device, a.dtype))
    return {module_key(i, site): r for (i, site, _, _), r in zip(sites, ranks, strict=True)}
