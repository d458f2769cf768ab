"""torchvision's MobileNetV2/V3 seen as stem / blocks / head (the inverted-residual blocks are zipper's blocks)."""

from __future__ import annotations

from typing import Callable, cast

from torch import nn

from .base import SMALL_INPUT, Backbone


def _adapt(arch: str, net: nn.Module, num_classes: int, width: float, input_size: int) -> Backbone:
    # torchvision: features[0] is the stem conv, features[-1] the last 1x1 conv; in between the blocks.
    features = list(cast(nn.Sequential, net.features))
    if input_size < SMALL_INPUT:
        cast(nn.Conv2d, cast(nn.Sequential, features[0])[0]).stride = (1, 1)
    head = nn.Sequential(features[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(1), cast(nn.Module, net.classifier))
    return Backbone(
        arch, features[0], features[1:-1], head, num_classes=num_classes, width=width, input_size=input_size
    )


def _builder(arch: str) -> Callable[..., Backbone]:
    def build(num_classes: int, *, width: float = 1.0, input_size: int = 224) -> Backbone:
        # Imported here: torchvision's import costs seconds (it loads torch._dynamo), paid only by these archs.
        from torchvision import models as tvm

        ctor = getattr(tvm, arch)
        return _adapt(arch, ctor(num_classes=num_classes, width_mult=width), num_classes, width, input_size)

    build.__name__ = arch
    build.__doc__ = f"torchvision's {arch} (random init) as a zipper Backbone."
    return build


mobilenet_v2 = _builder("mobilenet_v2")
mobilenet_v3_small = _builder("mobilenet_v3_small")
mobilenet_v3_large = _builder("mobilenet_v3_large")


def torchvision_key(arch: str, key: str, num_blocks: int) -> str:
    """Map a torchvision state_dict key (`features.3.conv.0.0.weight`) to the Backbone's name for it."""
    parts = key.split(".")
    if parts[0] == "features":
        i, rest = int(parts[1]), ".".join(parts[2:])
        if i == 0:
            return f"stem.{rest}"
        if i <= num_blocks:
            return f"blocks.{i - 1}.{rest}"
        return f"head.0.{rest}"
    if parts[0] == "classifier":
        return "head.3." + ".".join(parts[1:])
    raise KeyError(f"{arch}: unexpected torchvision key {key!r}")
