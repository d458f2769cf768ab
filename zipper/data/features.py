"""Teacher feature cache: a frozen teacher's outputs on every calibration sample, computed once.

Per sample (WebDataset tars beside a manifest.json):

    <key>.png          the very image bytes of the shard (so the cached x is the x the teacher saw;
                       JPEG / WebP bytes for a webdataset source that has them)
    <key>.cls          class index
    <key>.logits.npy   teacher logits, float32 (tiny; kept exact for logit distillation)
    <key>.taps.npy     every one of `teacher.pointwise_taps()` (C, H, W) as float16, flattened and
                       concatenated in manifest order (`taps`, `tap_shapes`, `tap_offsets`)

One taps file per sample, not one per tap: reading a tar member costs far more in Python than its
bytes do, and 13 members per sample made the cache slower than running the teacher.

Preprocessing is fixed (resize to input_size, normalise, no augmentation): augmented calibration
needs online targets. The manifest records the teacher checkpoint's sha256, the shards' manifest
sha256, input size, tap names / shapes and total bytes; `cache_matches` compares them.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from ..io import sha256_file, write_json
from ..models import Backbone
from ..runtime import CPU, Runtime
from .shards import (
    MANIFEST,
    SHUFFLE_BUFFER,
    Prepare,
    ShardSink,
    _check_file,
    _named_path,
    atomic_dir,
    epoch_stream,
    iter_samples,
    load_manifest,
    normalise,
    read_manifest,
    split_info,
)

log = logging.getLogger(__name__)

FORMAT = "zipper.FeatureCache/1"
BUDGET_SETTING = "features.budget_mb"
TAR_BLOCK = 512
NPY_HEADER = 128  # numpy's .npy v1 header for these small-rank arrays
SHUFFLE_MEMORY = 256 * 2**20  # bytes of raw cache samples a stream may hold for shuffling


class OverBudget(ValueError):
    """The cache would exceed `features.budget_mb` (nothing was written)."""


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    """An .npy member's array. Every sample's members share a few headers (one per array shape), and
    numpy parses a header with `ast` (slow next to the copy): each distinct header is parsed once."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY" or data[6] != 1:
        return np.load(io.BytesIO(data), allow_pickle=False)  # other versions, or numpy's own error
    end = 10 + int.from_bytes(data[8:10], "little")
    dtype, shape = _npy_header(data[:end])
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=end)
    return array.reshape(shape).copy()  # writable, as np.load gives it


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    stream = io.BytesIO(header)
    np.lib.format.read_magic(stream)
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    if fortran_order or dtype.hasobject:
        raise ValueError("feature cache arrays are C-ordered plain numbers")
    return dtype, tuple(shape)


def _tar_bytes(size: int) -> int:
    """Bytes a tar member of `size` bytes takes (header + data padded to the block size)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


@torch.no_grad()
def write_feature_cache(
    teacher: Backbone,
    shard_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    input_size: int,
    batch_size: int,
    budget_mb: float,
    teacher_sha256: str,
    maxcount: int = 1000,
    split: str = "train",
    runtime: Runtime = CPU,
) -> Path:
    """Run the frozen `teacher` (eval mode, fixed preprocessing) once over `split` of `shard_dir` and
    store per sample its image, label, logits and every pointwise tap (fp16) under `out_dir`.

    Prints the size first and raises `OverBudget` (a ValueError) when it exceeds `budget_mb`
    (setting `features.budget_mb`). The teacher runs on `runtime`'s device. Atomic like the shards.
    Returns the cache manifest path.
    """
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    m = read_manifest(shard_dir)
    info = split_info(m, split)
    if teacher.num_classes != len(m["classes"]):
        raise ValueError(f"teacher has {teacher.num_classes} classes, task {m['task']!r} has {len(m['classes'])}")
    taps = teacher.pointwise_taps()
    was_training = teacher.training
    runtime.module(teacher).eval()
    try:
        logits, feats = teacher.forward_intermediates(runtime.tensor(torch.zeros(1, 3, input_size, input_size)))
        shapes = {t: list(feats[t].shape[1:]) for t in taps}
        png_bytes = sum(s["bytes"] for s in info["shards"]) / info["count"]  # includes the shard's tar overhead
        sizes = [int(np.prod(s)) for s in shapes.values()]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        per_sample = (
            png_bytes
            + _tar_bytes(1)
            + _tar_bytes(NPY_HEADER + 4 * logits.shape[1])
            + _tar_bytes(NPY_HEADER + 2 * offsets[-1])
        )
        total_mb = per_sample * info["count"] / 2**20
        msg = (
            f"feature cache {m['task']}: {info['count']} samples x {per_sample / 1024:.1f} KiB = {total_mb:.1f} MiB "
            f"({len(taps)} taps, fp16) into {out_dir}; budget {BUDGET_SETTING} = {budget_mb:g} MiB"
        )
        print(msg, flush=True)
        log.info(msg)
        if total_mb > budget_mb:
            raise OverBudget(
                f"feature cache for {m['task']!r} needs {total_mb:.1f} MiB, "
                f"over the budget of {budget_mb:g} MiB; "
                f"raise {BUDGET_SETTING} (or calibrate with online teacher targets)"
            )
        with atomic_dir(out_dir, (FORMAT,)) as tmp:
            sink = ShardSink(tmp, split, maxcount)
            prep = Prepare(input_size)
            pending: list[dict[str, Any]] = []

            def flush() -> None:
                x = runtime.tensor(normalise(np.stack([prep(s)[0] for s in pending])))
                with runtime.autocast():
                    out, f = teacher.forward_intermediates(x)
                flat = torch.cat([f[t].flatten(1) for t in taps], dim=1).to(torch.float16).cpu().numpy()
                if not np.isfinite(flat).all():
                    bad = next(t for t in taps if not torch.isfinite(f[t].half()).all())
                    raise ValueError(f"teacher tap {bad!r} overflows float16 in the batch from {pending[0]['__key__']}")
                lg = out.float().cpu().numpy()
                for i, s in enumerate(pending):
                    sink.write(
                        {
                            "__key__": s["__key__"],
                            "png": s["png"],
                            "cls": s["cls"],
                            "logits.npy": _npy(lg[i]),
                            "taps.npy": _npy(flat[i]),
                        }
                    )
                pending.clear()

            for sample in tqdm(
                iter_samples(shard_dir, split, manifest=m),
                total=info["count"],
                desc=f"features {m['task']}",
                unit="img",
                mininterval=5,
            ):
                pending.append(sample)
                if len(pending) == batch_size:
                    flush()
            if pending:
                flush()
            shards = sink.close()
            manifest = {
                "format": FORMAT,
                "task": m["task"],
                "classes": m["classes"],
                "split": split,
                "teacher_sha256": teacher_sha256,
                "shards_manifest_sha256": sha256_file(shard_dir / MANIFEST),
                "input_size": int(input_size),
                "num_classes": int(teacher.num_classes),
                "taps": taps,
                "tap_shapes": shapes,
                "tap_offsets": offsets[:-1],
                "count": sum(s["count"] for s in shards),
                "total_bytes": sum(s["bytes"] for s in shards),
                "shards": shards,
            }
            write_json(tmp / MANIFEST, manifest)
    finally:
        teacher.train(was_training)
    return out_dir / MANIFEST


def read_cache_manifest(cache_dir: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """Load and validate a feature cache manifest; every shard must exist with its recorded size
    (and sha256 when `verify`). Errors name the file."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    m = load_manifest(
        path,
        FORMAT,
        ("teacher_sha256", "input_size", "taps", "tap_shapes", "tap_offsets", "shards", "count"),
        missing="feature cache manifest not found",
    )
    if not m["shards"]:
        raise ValueError(f"{path}: no shards")
    for shard in m["shards"]:
        _check_file(cache_dir, shard, verify)
    return m


def cache_matches(
    cache_dir: str | os.PathLike,
    teacher_sha256: str,
    *,
    shard_dir: str | os.PathLike | None = None,
    input_size: int | None = None,
) -> bool:
    """True when `cache_dir` holds a complete cache made by the teacher with this checkpoint sha256
    (and, when given, from these shards and at this input size)."""
    try:
        m = read_cache_manifest(cache_dir)
    except ValueError:
        return False
    if m["teacher_sha256"] != teacher_sha256:
        return False
    if input_size is not None and m["input_size"] != input_size:
        return False
    if shard_dir is not None:
        f = Path(shard_dir) / MANIFEST
        if not f.is_file() or sha256_file(f) != m.get("shards_manifest_sha256"):
            return False
    return True


class _Decode:
    """Cache sample -> (uint8 image, label, float32 logits, flat fp16 taps)."""

    def __init__(self, input_size: int) -> None:
        self.prep = Prepare(input_size)

    def __call__(self, sample: Mapping[str, Any]) -> tuple:
        img, label = self.prep(sample)
        return img, label, _load_npy(sample["logits.npy"]), _load_npy(sample["taps.npy"])


class _Collate:
    """Stack a batch; split the flat taps into float32 (N, C, H, W) views, one per tap name."""

    def __init__(self, taps: list[str], shapes: Mapping[str, list[int]], offsets: list[int]) -> None:
        self.layout = [(t, off, list(shapes[t])) for t, off in zip(taps, offsets)]

    def __call__(
        self, samples: list[tuple]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        imgs, labels, logits, flat = zip(*samples)
        n = len(samples)
        taps = torch.from_numpy(np.stack(flat)).float()  # (N, sum of C*H*W)
        feats = {t: taps[:, off : off + int(np.prod(shape))].view(n, *shape) for t, off, shape in self.layout}
        return (
            normalise(np.stack(imgs)),
            torch.tensor(labels, dtype=torch.int64),
            torch.from_numpy(np.stack(logits)).float(),
            feats,
        )


def split_taps(flat: np.ndarray, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One sample's flat taps array -> {tap name: (C, H, W) array} using the cache manifest's layout."""
    return {
        t: flat[off : off + int(np.prod(manifest["tap_shapes"][t]))].reshape(manifest["tap_shapes"][t])
        for t, off in zip(manifest["taps"], manifest["tap_offsets"])
    }


def cached_batches(
    cache_dir: str | os.PathLike,
    *,
    batch_size: int,
    seed: int,
    input_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """Endless shuffled stream of (x, y, teacher logits, {tap: teacher feature}) from a cache.

    The same stream as `train_batches` (`shards.EpochStream`): epochs of the cache dealt to
    `num_workers` DataLoader workers, `batch_size` the global batch of which this `rank` of
    `world_size` gets its rows (the ranks' batches concatenate to the world_size=1 batch).
    Fixed preprocessing (that of the cache); taps come back as float32. `skip(key)`: leave that sample out.
    """
    m = read_cache_manifest(cache_dir)
    if m["input_size"] != input_size:
        raise ValueError(
            f"{Path(cache_dir) / MANIFEST}: cache made at input_size {m['input_size']}, asked for {input_size}"
        )
    urls = [str(_named_path(Path(cache_dir), s)) for s in m["shards"]]
    # The shuffle buffers (one per worker) hold raw samples (image + every tap): bound their memory,
    # not just their length.
    per_sample = m["total_bytes"] / m["count"]
    buffer = int(min(SHUFFLE_BUFFER, max(64, SHUFFLE_MEMORY / max(1, num_workers) / per_sample)))
    return epoch_stream(
        urls,
        _Decode(input_size),
        _Collate(m["taps"], m["tap_shapes"], m["tap_offsets"]),
        seed=seed,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        shuffle_buffer=buffer,
        skip=skip,
    )


def iter_cache(cache_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Cache samples in stored order, decoded: key, image (uint8 HWC), label, logits, taps {name: fp16 array}."""
    m = read_cache_manifest(cache_dir)
    urls = [str(Path(cache_dir) / s["name"]) for s in m["shards"]]
    prep = Prepare(m["input_size"])
    for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        img, label = prep(s)
        yield {
            "key": s["__key__"],
            "image": img,
            "label": label,
            "logits": _load_npy(s["logits.npy"]),
            "taps": split_taps(_load_npy(s["taps.npy"]), m),
        }
