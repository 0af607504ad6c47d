"""The saved adapters an AdapterFusion composes: read their folders, check that they can be fused (bottleneck
adapters of one base model, placed alike) and lay out the fusion spec over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.core.spec import Spec
from peftlab.errors import PeftlabError, SpecError
from peftlab.formats import native
from peftlab.modules.fusion import PLACEMENT, FuseSettings


def components(folders: list[str]) -> list[tuple[str, Any]]:
    """The specs of the adapter folders a fusion composes, refusing (one line each) fewer than two, anything but
    bottleneck adapters, different base models and different placements."""
    if isinstance(folders, str):  # the command line's adapters=DIR1,DIR2 (or [DIR1,DIR2] unquoted)
        folders = [f.strip() for f in folders.strip().strip("[]").split(",") if f.strip()]
    if not isinstance(folders, (list, tuple)) or len(folders) < 2 or not all(isinstance(f, str) for f in folders):
        raise SpecError(f"fuse needs adapters=[DIR, DIR, ...]: two or more saved adapter folders, got {folders!r}")
    if len(set(folders)) < len(folders):
        raise SpecError("fuse: the same adapter folder is listed twice")
    found = []
    for folder in folders:
        try:
            meta = native.read_meta(Path(folder))
            spec = Spec.from_dict(meta["spec"])
        except PeftlabError as e:
            raise SpecError(f"fuse: {e}") from None
        kinds = sorted({s.kind for s in spec.settings()} | set(spec.parts()) - {"head"})
        if kinds != ["adapter"] or spec.gates:
            raise SpecError(
                f"fuse composes bottleneck adapters (kind 'adapter'); '{folder}' holds {', '.join(kinds) or 'none'}"
                f"{' with gates' if spec.gates else ''}"
            )
        found.append((folder, meta, spec))
    first, meta0, spec0 = found[0]
    for folder, meta, spec in found[1:]:
        if meta["fingerprint"].get("config_sha256") != meta0["fingerprint"].get("config_sha256") or (
            meta["fingerprint"].get("weights_sha256") != meta0["fingerprint"].get("weights_sha256")
        ):
            raise SpecError(f"fuse: '{folder}' was trained on a different base model than '{first}'")
        if _layout(spec) != _layout(spec0):
            raise SpecError(
                f"fuse: '{folder}' places its adapters differently from '{first}' (layers and sites, "
                "original_ln_before / original_ln_after / residual_before_ln must match)"
            )
    return [(folder, spec) for folder, _, spec in found]


def _layout(spec: Any) -> dict[str, dict[str, tuple[bool, ...] | None]]:
    """Where a spec's adapters sit and how: per selector and site, the placement (None: removed there)."""
    return {
        key: {site: None if s is None else tuple(getattr(s, f) for f in PLACEMENT) for site, s in sites.items()}
        for key, sites in spec.layers.items()
    }


def fuse_layers(folders: list[str], temperature: float) -> dict[str, dict[str, FuseSettings | None]]:
    """The layers of a fusion spec over ``folders``: one fuse module wherever the components have adapters."""
    found = components(folders)
    spec0 = found[0][1]
    layers: dict[str, dict[str, FuseSettings | None]] = {}
    for key, sites in spec0.layers.items():
        layers[key] = {}
        for site, s in sites.items():
            if s is None:
                layers[key][site] = None
                continue
            parts = [spec.layers[key][site] for _, spec in found]
            fused = FuseSettings(
                adapters=[folder for folder, _ in found],
                sizes=[p.size for p in parts],
                activations=[p.activation for p in parts],
                scalings=[p.scaling for p in parts],
                temperature=temperature,
                **{f: getattr(s, f) for f in PLACEMENT},
            )
            fused.check_at()
            layers[key][site] = fused
    return layers
