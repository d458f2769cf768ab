"""Merging teachers into a ZipperNet: `zip_models` (from teachers) and `deepen` (the chain step)."""
from __future__ import annotations

from typing import Mapping

from torch import nn

from .zipnet import SCOPES, ZipperNet, ZipperSpec, check_compatible, deepen, load, side_by_side

# How shared weights start. "average" is the paper's eq. 1; alignment inits permute the
# branches' channels to match the first task's before averaging (see merge/align.py).
INITS = ("average",)


def zip_models(teachers: Mapping[str, nn.Module], depth: int, *, scope: str = "block",
               init: str = "average") -> ZipperNet:
    """Zip same-arch teachers at `depth`: blocks[:depth] shared, initialised by `init`."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    return deepen(side_by_side(teachers, scope), depth)


__all__ = ["INITS", "SCOPES", "ZipperNet", "ZipperSpec", "deepen", "load", "side_by_side", "zip_models"]
