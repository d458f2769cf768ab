"""MobileNetV1 (Howard et al. 2017) as in the zippering paper: 13 depthwise-separable blocks."""

from __future__ import annotations

from torch import nn

from .base import SMALL_INPUT, Backbone

# (output channels, stride) of the 13 blocks at width 1.0.
V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
STEM_CHANNELS = 32


def conv_bn_relu(cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) - BatchNorm - ReLU, with the module names of torchvision's
    Conv2dNormActivation (0, 1, 2), so checkpoints of either load into the other."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def divisible_channels(c: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never below 90% of `c` (the MobileNet papers' rule)."""
    rounded = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * c else rounded


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv-BN-ReLU, then 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = conv_bn_relu(cin, cin, 3, stride=stride, groups=cin)
        self.pw = conv_bn_relu(cin, cout, 1)


def mobilenet_v1(num_classes: int, *, width: float = 1.0, input_size: int = 224) -> Backbone:
    channels = lambda c: divisible_channels(c * width)
    cin = channels(STEM_CHANNELS)
    stem = conv_bn_relu(3, cin, 3, stride=1 if input_size < SMALL_INPUT else 2)
    blocks = []
    for cout, stride in V1_BLOCKS:
        blocks.append(DepthwiseSeparable(cin, channels(cout), stride))
        cin = channels(cout)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))
    model = Backbone("mobilenet_v1", stem, blocks, head, num_classes=num_classes, width=width, input_size=input_size)
    _init_weights(model)
    return model


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
