"""Shared fixtures: tiny models and tiny class-conditional image tasks made on the fly."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny forwards gain nothing from threads; tests/kernel_paths.py sets 2 to change reduction splits.
torch.set_num_threads(int(os.environ.get("ZIPPER_TEST_THREADS", "1")))

TINY = dict(width=0.25, input_size=32)


def blob_task(num_classes: int, n: int, seed: int, size: int = 32, kind: str = "colour") -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a colour (kind="colour") or a stripe frequency (kind="stripes"), plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    if kind == "colour":
        palette = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(123)) * 2 - 1
        x = palette[y].expand(n, 3, size, size).clone()
    else:
        grid = torch.arange(size).float()
        freq = (y.float() + 1)[:, None, None] * 3.1416 / size
        x = torch.sin(grid[None, :, None] * freq).expand(n, size, size)[:, None].expand(n, 3, size, size).clone()
    return x + 0.6 * torch.randn(x.shape, generator=g), y


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0):
    """Endless shuffled (x, y) batches."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            j = idx[i:i + batch_size]
            yield x[j], y[j]


@pytest.fixture
def tiny_teachers():
    import zipper

    torch.manual_seed(0)
    return {"a": zipper.build_model("mobilenet_v1", 5, **TINY).eval(),
            "b": zipper.build_model("mobilenet_v1", 3, **TINY).eval()}
