"""The seam every zipper architecture offers: a stem, an ordered list of blocks, and a head.

Zippering counts `blocks`; merging and distillation need to see inside them, so a backbone
also names its pointwise taps: the BatchNorm right after every 1x1, non-grouped conv of a
block (what the paper's per-layer L1 loss compares).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

# Below this input size the stem keeps the resolution (CIFAR-style): at 32 px a stride-2 stem leaves the
# torchvision nets 1x1 maps from their middle blocks on, and MobileNetV2 teachers do not train
# (docs/sweep.md). Strides hold no weights: checkpoints load at any input size.
SMALL_INPUT = 96


class Backbone(nn.Module):
    """`stem -> blocks[0..L-1] -> head`. Shared positions may be `nn.Identity` (see ZipperNet)."""

    def __init__(
        self,
        arch: str,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        *,
        num_classes: int,
        width: float,
        input_size: int,
    ) -> None:
        super().__init__()
        self.arch, self.num_classes, self.width, self.input_size = arch, num_classes, width, input_size
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def forward_features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run the stem (when `start == 0`) and blocks[start:stop]."""
        if start == 0:
            x = self.stem(x)
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (N, C, H, W) -> (N, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def pointwise_taps(self) -> list[str]:
        """Names (relative to this module) of the BN after each pointwise conv inside the blocks."""
        return [f"blocks.{i}.{bn}" for i, block in enumerate(self.blocks) for _conv, bn in pointwise_pairs(block)]

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and, by name, every block's output (`blocks.i`) and every pointwise tap."""
        feats: dict[str, torch.Tensor] = {}
        with capture(self, self.pointwise_taps(), feats):
            x = self.stem(x)
            for i, block in enumerate(self.blocks):
                x = block(x)
                feats[f"blocks.{i}"] = x
            logits = self.forward_head(x)
        return logits, feats


def pointwise_pairs(block: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names of each 1x1, groups=1 conv directly followed by a BatchNorm (SE convs have none)."""
    pairs, conv = [], None
    for name, module in block.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = name if module.kernel_size == (1, 1) and module.groups == 1 else None
        elif isinstance(module, nn.BatchNorm2d):
            if conv is not None:
                pairs.append((conv, name))
            conv = None
    return pairs


@contextmanager
def capture(model: nn.Module, names: list[str], into: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules into `into` while the context is open."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"{type(model).__name__} has no layer {missing[0]!r}")
    handles = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: into.__setitem__(n, out)) for n in names]
    try:
        yield into
    finally:
        for h in handles:
            h.remove()
