"""Merging teachers into a ZipperNet: `zip_models` (from teachers) and `deepen` (the chain step)."""

from __future__ import annotations

from typing import Iterable, Mapping

from ..models import Backbone
from .align import align_models, deepen_aligned
from .zipnet import SCOPES, ZipperNet, ZipperSpec, deepen, export_onnx, load, side_by_side

# How shared weights start. "average" is the paper's eq. 1; alignment inits permute the
# branches' channels to match the first task's before averaging (see merge/align.py).
INITS = ("average", "weights", "activations")


def zip_models(
    teachers: Mapping[str, Backbone],
    depth: int,
    *,
    scope: str = "block",
    init: str = "average",
    batches: Iterable[object] | None = None,
) -> ZipperNet:
    """Zip same-arch teachers at `depth`: blocks[:depth] shared, initialised by `init`.

    init "weights" / "activations" first permute every teacher's channels to match the first
    teacher's (merge/align.py); "activations" reads calibration `batches` (tensors or (x, y)).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    return deepen_aligned(side_by_side(teachers, scope), depth, init, batches=batches)


__all__ = [
    "INITS",
    "SCOPES",
    "export_onnx",
    "ZipperNet",
    "ZipperSpec",
    "align_models",
    "deepen",
    "deepen_aligned",
    "load",
    "side_by_side",
    "zip_models",
]
