"""Counting parameters the way the survey (Lialin et al.) asks: trainable, stored and changed, never one number.

- trainable: what the optimiser holds (reparameterisation MLPs and gates included);
- stored: what the saved adapter file holds (prefix key/values, not the MLP that produced them);
- changed: parameters of the final model that differ from the backbone: the base weights a merged module
  rewrites, or the parameters an unmergeable module adds.

Percentages are relative to the backbone (the pretrained body, without the new task head). Everything
works on a model built on the meta device, so a 7B shape is counted without its weights in memory.

On a quantized base the backbone is counted in values as the model uses them (a 4-bit weight packs two per
byte), and its size in bytes is reported beside the count: the packed weights with their scales, as stored.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from peftlab.backbone.anatomy import find_head
from peftlab.backbone.quant import logical_numel, model_quantize, storage_bytes

_FIELDS = ("trainable", "stored", "changed")


@dataclass
class Row:
    trainable: int = 0
    stored: int = 0
    changed: int = 0

    def add(self, trainable: int, stored: int, changed: int) -> None:
        self.trainable += trainable
        self.stored += stored
        self.changed += changed


@dataclass
class Counts:
    backbone_params: int
    total: Row = field(default_factory=Row)
    per_kind: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    per_layer: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    method: str | None = None
    #: bytes the backbone's tensors occupy as stored (quantized weights packed, with their scales)
    backbone_bytes: int = 0
    #: 'nf4' / 'int8' for a quantized base, None for full precision
    quantize: str | None = None

    def _add(self, kind: str, layer: str, trainable: int, stored: int, changed: int) -> None:
        self.total.add(trainable, stored, changed)
        self.per_kind[kind].add(trainable, stored, changed)
        self.per_layer[layer].add(trainable, stored, changed)

    @property
    def trainable_params(self) -> int:
        return self.total.trainable

    @property
    def stored_params(self) -> int:
        return self.total.stored

    @property
    def changed_params(self) -> int:
        return self.total.changed

    def pct(self, n: int) -> float:
        return 100.0 * n / self.backbone_params if self.backbone_params else 0.0

    def to_dict(self) -> dict:
        out: dict = {
            "method": self.method,
            "backbone_params": self.backbone_params,
            "backbone_bytes": self.backbone_bytes,
            "quantize": self.quantize,
        }
        for f in _FIELDS:
            n = getattr(self.total, f)
            out[f"{f}_params"] = n
            out[f"{f}_pct"] = round(self.pct(n), 6)
        out["per_kind"] = {k: asdict(v) for k, v in self.per_kind.items()}
        out["per_layer"] = {k: asdict(v) for k, v in self.per_layer.items()}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text table: per module kind, per layer, then the totals."""

        def line(name: str, r: Row) -> str:
            cells = "".join(f"{getattr(r, f):>14,} {self.pct(getattr(r, f)):>8.4f}%" for f in _FIELDS)
            return f"{name:<16}{cells}"

        head = f"{'':<16}" + "".join(f"{f:>14} {'%':>9}" for f in _FIELDS)
        rule = "-" * len(head)
        size = _size(self.backbone_bytes) + (f" ({self.quantize})" if self.quantize else "")
        top = f"method: {self.method or '(custom spec)'}   backbone params: {self.backbone_params:,}   size: {size}"
        lines = [top, head, rule]
        lines += [line(k, r) for k, r in sorted(self.per_kind.items())]
        lines.append(rule)
        lines += [line(f"layer {k}" if k.isdigit() else k, r) for k, r in _layer_order(self.per_layer)]
        lines.append(rule)
        lines.append(line("total", self.total))
        return "\n".join(lines)


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1 (KiB for tiny test models, GiB for 7B)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _layer_order(rows: dict[str, Row]) -> list[tuple[str, Row]]:
    return sorted(rows.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0, kv[0]))


def _numel(params) -> int:
    return sum(logical_numel(p) for p in params)


def count(pm, adapter_name: str) -> Counts:
    """The three counts of one adapter of a PeftModel, keyed by module kind and by layer."""
    model = pm.base_model
    head = find_head(model, pm.anatomy)
    head_ids = {id(p) for p in head[1].parameters()} if head else set()
    backbone = _numel(p for p in model.parameters() if id(p) not in head_ids)
    adapter = pm.adapters[adapter_name]
    c = Counts(
        backbone_params=backbone,
        method=adapter.spec.method,
        backbone_bytes=storage_bytes(model) - (storage_bytes(head[1]) if head else 0),
        quantize=model_quantize(model),
    )
    for key, module in adapter.all_modules():
        layer = key.partition("-")[0]
        c._add(module.kind, layer, module.own_numel(), module.stored_numel(), module.changed_numel())
    for part in adapter.shared.values():
        n = _numel(part.parameters())
        # e.g. the prefix MLP is discarded on save; VeRA's frozen projections (buffers) are kept, not trained
        kept = _numel(part.state_dict().values()) if part.peftlab_stored else 0
        changed = 0 if getattr(part, "peftlab_folds", False) else kept
        if hasattr(part, "changed_numel"):  # e.g. a sparse mask: stores values and indices, changes the values
            changed = part.changed_numel()
        c._add(part.peftlab_kind, "shared", n, kept, changed)
    return c
