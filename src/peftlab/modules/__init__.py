"""The PEFT module zoo. Importing this package registers every kind in :data:`KINDS`."""

from peftlab.modules import (
    bottleneck,
    fusion,
    intrinsic,
    linear,
    lowrank,
    orthogonal,
    prefix,
    reparam,
    selective,
    side,
    sparse,
    whole,
)
from peftlab.modules.base import KINDS, BuildContext, Dims, PeftModule, Settings

__all__ = [
    "KINDS",
    "BuildContext",
    "Dims",
    "PeftModule",
    "Settings",
    "bottleneck",
    "fusion",
    "intrinsic",
    "linear",
    "lowrank",
    "orthogonal",
    "prefix",
    "reparam",
    "selective",
    "side",
    "sparse",
    "whole",
]
