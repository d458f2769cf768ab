"""Data layer: sources -> WebDataset shards (written here, or existing ones at URLs) + manifest -> train / val
streams (DataLoader workers, per-rank slices of a global batch); teacher feature cache."""

from ..preprocess import MEAN, STD, normalise
from .features import cache_matches, cached_batches, iter_cache, read_cache_manifest, write_feature_cache
from .shards import (
    ValBatches,
    atomic_dir,
    epoch_stream,
    iter_samples,
    read_manifest,
    read_shard,
    train_batches,
    val_batches,
    write_shards,
)
from .sources import SOURCES, load_source, to_rgb
from .synthetic import TASKS as SYNTHETIC_TASKS

__all__ = [
    "MEAN",
    "STD",
    "SOURCES",
    "SYNTHETIC_TASKS",
    "ValBatches",
    "atomic_dir",
    "cache_matches",
    "cached_batches",
    "epoch_stream",
    "iter_cache",
    "iter_samples",
    "load_source",
    "normalise",
    "read_cache_manifest",
    "read_manifest",
    "read_shard",
    "to_rgb",
    "train_batches",
    "val_batches",
    "write_feature_cache",
    "write_shards",
]
