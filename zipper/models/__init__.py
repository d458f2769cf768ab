"""Architecture registry: name -> builder(num_classes, *, width, input_size) -> Backbone."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .base import Backbone, capture, pointwise_pairs
from .mobilenet_v1 import mobilenet_v1
from .torchvision_nets import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small, torchvision_key

ARCHS: dict[str, Callable[..., Backbone]] = {
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
}


def build_model(arch: str, num_classes: int, *, width: float = 1.0, input_size: int = 224) -> Backbone:
    """Build a randomly initialised registered architecture."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; registered: {', '.join(sorted(ARCHS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return ARCHS[arch](num_classes, width=width, input_size=input_size)


__all__ = ["ARCHS", "Backbone", "build_model", "capture", "pointwise_pairs", "torchvision_key", "nn"]
