"""The held-out calibration split: a fixed fraction of each task's train samples, chosen by key.

Neither the teachers nor calibration train on these samples (`data.holdout`), so calibration with a
stopping rule (`calibrate.until`) measures student and teachers alike on unseen data, and the val
split stays unread until evaluation reports it. Membership depends on the sample key alone (a hash),
not on shard layout, stream order, rank or worker: every process and every rerun agrees on it, and
the training stream can drop the samples wherever it reads them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any, Iterator

import torch

from .shards import Prepare, fixed_batches, iter_samples, read_manifest


class HeldOut:
    """`held_out(key)`: whether a sample belongs to the held-out split. A class so DataLoader workers
    can pickle it."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"held-out fraction must be in (0, 1), got {fraction!r}")
        self.fraction = fraction

    def __call__(self, key: str) -> bool:
        digest = hashlib.sha256(f"zipper-holdout:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.fraction * 2**64


def holdout_batches(
    shard_dir: str | os.PathLike, held_out: HeldOut, *, input_size: int, batch_size: int, limit: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """The first `limit` held-out train samples in manifest order, as fixed-preprocessing (x, y)
    batches, and their keys. Reads the train split only."""
    keys: list[str] = []

    def held_out_samples() -> Iterator[dict[str, Any]]:
        for sample in iter_samples(shard_dir, "train", manifest=read_manifest(shard_dir)):
            if held_out(sample["__key__"]):
                keys.append(sample["__key__"])
                yield sample

    batches = list(fixed_batches(itertools.islice(held_out_samples(), limit), Prepare(input_size), batch_size))
    if not keys:
        raise ValueError(
            f"{shard_dir}: no train sample falls in the held-out split (fraction "
            f"{held_out.fraction}); raise data.holdout"
        )
    return batches, keys
