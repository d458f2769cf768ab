"""Measuring a model: per-task accuracy (and, below, size, MACs, latency and memory)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in [0, 1] of `predict(x) -> logits` over (x, y) batches."""
    correct = total = 0
    for x, y in batches:
        correct += (predict(x).argmax(1) == y).sum().item()
        total += len(y)
    if total == 0:
        raise ValueError("accuracy over an empty set of batches")
    return correct / total
