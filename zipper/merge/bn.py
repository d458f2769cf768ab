"""Re-estimate BatchNorm running statistics after merging (averaged stats describe no real stream)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def reset_bn_stats(
    model: nn.Module, batches: Iterable[object], forward: Callable[[Any], object] | None = None, max_batches: int = 20
) -> int:
    """Reset every BN's running stats and re-estimate them (cumulative average) on `batches`.

    `forward(batch)` runs the model on one batch (default: `model(batch)`). Returns the batch count.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    n = 0
    try:
        for n, batch in enumerate(batches, 1):
            (forward or model)(batch)
            if n >= max_batches:
                break
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
        model.train(was_training)
    return n
