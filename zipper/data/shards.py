"""WebDataset shards per task and split, their manifest, and the train / val streams read from them.

Layout of a shard directory (one task):

    train-000000.tar ...   samples `<key>.png` (lossless RGB) + `<key>.cls` (class index as text)
    val-000000.tar ...
    manifest.json          task, classes, per split: counts (total and per class), shards with
                           sha256, image size, skipped inputs

A directory is written to a temp folder beside it and renamed into place, so a killed run leaves
either the previous directory or the complete new one, never a mix.

Streams: training draws shards with replacement (`ResampledShards`, seeded, deterministic per
rank/worker), shuffles samples in a buffer and cuts epochs with `with_epoch`, so it never runs dry
on any number of nodes or workers; validation reads every shard once in manifest order, split over
nodes (`split_by_node`) and DataLoader workers (`split_by_worker`).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from ..io import sha256_file, write_json
from .sources import BadSample, SPLITS, load_source, resize_center

log = logging.getLogger(__name__)

FORMAT = "zipper.Shards/1"
MANIFEST = "manifest.json"
# ImageNet statistics: what torchvision's pretrained weights expect, so imported teachers see their inputs.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
ON_BAD_SAMPLE = ("error", "skip")
PNG_LEVEL = 3  # zlib level: lossless at any level; 3 is a good speed/size trade for small images
TAR_MTIME = 0  # fixed member times: byte-identical shards for the same samples (an int: a float adds a PAX header)
SHUFFLE_BUFFER = 2000  # samples held for shuffling (raw bytes, before decoding)
EPOCH_PASSES = 10  # a resampled stream restarts every EPOCH_PASSES x (split size) samples


# --- writing -------------------------------------------------------------------------------------

def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> uint8 array (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, formats: tuple[str, ...]) -> Iterator[Path]:
    """Yield an empty temp dir beside `out_dir`; on success it replaces `out_dir` (by rename).

    An existing `out_dir` is only replaced when it is empty or holds a manifest of one of
    `formats` (something we wrote): a user's unrelated folder is never deleted.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"output {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()):
            fmt = None
            try:
                fmt = json.loads((out_dir / MANIFEST).read_text()).get("format")
            except (OSError, ValueError, AttributeError):
                pass
            if fmt not in formats:
                raise ValueError(f"output {out_dir} exists and is not a {' / '.join(formats)} directory; "
                                 "refusing to replace it (remove it or choose another path)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardSink:
    """Write samples to `<dir>/<prefix>-%06d.tar`, at most `maxcount` per shard; never an empty shard."""

    def __init__(self, directory: Path, prefix: str, maxcount: int) -> None:
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.directory, self.prefix, self.maxcount = directory, prefix, maxcount
        self.shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None or self._count >= self.maxcount:
            self._close_current()
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._writer = wds.TarWriter(str(self.directory / name), encoder=False, mtime=TAR_MTIME)
            self.shards.append({"name": name, "count": 0})
            self._count = 0
        self._writer.write(sample)
        self._count += 1
        self.shards[-1]["count"] += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            entry = self.shards[-1]
            path = self.directory / entry["name"]
            entry["bytes"] = path.stat().st_size
            entry["sha256"] = sha256_file(path)

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards


def write_shards(source: Mapping[str, Any], task: str, out_dir: str | os.PathLike, *, maxcount: int = 1000,
                 on_bad_sample: str = "error") -> Path:
    """Materialise `task`'s train and val splits from `source` as WebDataset shards + manifest.json.

    `source` is the params.yaml mapping (see `zipper.data.sources`). `on_bad_sample`: "error" raises
    ValueError naming an unreadable image; "skip" leaves it out and counts it in the manifest.
    Atomic: a killed run leaves the previous `out_dir` (or nothing), never a partial one.
    Returns the manifest path.
    """
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
    if not task or "/" in task:
        raise ValueError(f"task name must be a non-empty name without '/', got {task!r}")
    data = load_source(source)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, (FORMAT,)) as tmp:
        splits = {split: _write_split(data.splits[split], data.classes, split, tmp, task, maxcount, on_bad_sample)
                  for split in SPLITS}
        manifest = {"format": FORMAT, "task": task, "classes": data.classes, "hflip": data.hflip,
                    "source": _jsonable(data.info), "splits": splits}
        write_json(tmp / MANIFEST, manifest)
    log.info("%s: wrote %s", task, ", ".join(f"{s} {v['count']} in {len(v['shards'])} shards" for s, v in splits.items()))
    return out_dir / MANIFEST


def _write_split(samples: list, classes: list[str], split: str, tmp: Path, task: str, maxcount: int,
                 on_bad_sample: str) -> dict[str, Any]:
    sink = ShardSink(tmp, split, maxcount)
    counts = [0] * len(classes)
    skipped: list[str] = []
    sizes: set[tuple[int, int]] = set()
    for sample in tqdm(samples, desc=f"shards {task}/{split}", unit="img", leave=False, mininterval=2):
        try:
            img, label = sample.load()
        except BadSample as e:
            if on_bad_sample == "skip":
                log.warning("skipping %s", e)
                skipped.append(sample.origin)
                continue
            raise ValueError(f"{e} (set on_bad_sample: skip to leave such files out)") from e
        if not 0 <= label < len(classes):
            raise ValueError(f"{sample.origin}: label {label} outside the {len(classes)} classes")
        if img.mode != "RGB":
            raise ValueError(f"{sample.origin}: source gave mode {img.mode}, expected RGB")
        key = f"{split}_{sum(counts):07d}"  # keys must not contain dots (WebDataset splits on the first dot)
        sink.write({"__key__": key, "png": encode_png(img), "cls": str(label).encode()})
        counts[label] += 1
        sizes.add((img.height, img.width))
    shards = sink.close()
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise ValueError(f"{task}/{split}: class {empty[0]!r} has no readable images" +
                         (f" ({len(skipped)} skipped as unreadable)" if skipped else ""))
    return {
        "classes": classes,
        "count": sum(counts),
        "counts": dict(zip(classes, counts)),
        "image_size": list(next(iter(sizes))) if len(sizes) == 1 else None,  # [H, W]; None: sizes vary
        "shards": shards,
        "skipped": {"count": len(skipped), "files": skipped[:100]},
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --- reading -------------------------------------------------------------------------------------

def load_manifest(path: Path, fmt: str, keys: tuple[str, ...], *, missing: str) -> dict[str, Any]:
    """Read a manifest JSON of format `fmt` holding `keys`; every error names the file."""
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: {missing}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    for key in keys:
        if key not in m:
            raise ValueError(f"{path}: missing key {key!r}")
    return m


def read_manifest(shard_dir: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Load and validate `shard_dir/manifest.json`; every shard must exist (and match its sha256
    when `verify`). Errors name the file at fault."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    m = load_manifest(path, FORMAT, ("task", "classes", "splits"), missing="manifest not found (write the shards first)")
    for split, info in m["splits"].items():
        for key in ("count", "counts", "shards", "classes"):
            if key not in info:
                raise ValueError(f"{path}: split {split!r} is missing key {key!r}")
        if info["classes"] != m["classes"]:
            raise ValueError(f"{path}: split {split!r} classes differ from the task's classes")
        if not info["shards"]:
            raise ValueError(f"{path}: split {split!r} has no shards")
        for shard in info["shards"]:
            if not isinstance(shard, dict) or not {"name", "sha256", "count"} <= shard.keys():
                raise ValueError(f"{path}: split {split!r} has a shard entry without name / sha256 / count: {shard!r}")
            _check_file(shard_dir, shard, verify)
    return m


def _check_file(directory: Path, entry: Mapping[str, Any], verify: bool) -> None:
    f = directory / entry["name"]
    if not f.is_file():
        raise ValueError(f"shard {f} is missing (listed in {directory / MANIFEST})")
    if "bytes" in entry and f.stat().st_size != entry["bytes"]:
        raise ValueError(f"shard {f} has {f.stat().st_size} bytes, manifest says {entry['bytes']}: corrupt or replaced")
    if verify and sha256_file(f) != entry["sha256"]:
        raise ValueError(f"shard {f} sha256 differs from the manifest: corrupt or replaced")


def split_info(manifest: Mapping[str, Any], split: str) -> Mapping[str, Any]:
    if split not in manifest["splits"]:
        raise ValueError(f"task {manifest['task']!r} has no split {split!r}; has {sorted(manifest['splits'])}")
    return manifest["splits"][split]


def shard_urls(shard_dir: str | os.PathLike, manifest: Mapping[str, Any], split: str) -> list[str]:
    return [str(Path(shard_dir) / s["name"]) for s in split_info(manifest, split)["shards"]]


class Prepare:
    """Sample dict -> (uint8 HWC image at input_size, label); random pad-crop / flip when `augment`.

    A class (not a closure) so DataLoader workers can pickle it; its RNG is seeded per
    (seed, rank, worker) on first use so workers do not repeat each other's augmentations.
    """

    def __init__(self, input_size: int, *, augment: bool = False, hflip: bool = True, seed: int = 0) -> None:
        self.input_size, self.augment, self.hflip, self.seed = input_size, augment, hflip, seed
        self.pad = max(1, round(input_size / 8))  # 4 px at 32 px (the CIFAR recipe)
        self._rng: np.random.Generator | None = None

    def __call__(self, sample: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        img = decode_png(sample["png"])
        s = self.input_size
        if img.shape[:2] != (s, s):
            img = np.asarray(resize_center(Image.fromarray(img), s))
        if self.augment:
            img = self._augment(img)
        return img, int(sample["cls"])

    def _augment(self, img: np.ndarray) -> np.ndarray:
        if self._rng is None:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            self._rng = np.random.default_rng([self.seed, rank, worker])
        p, s = self.pad, self.input_size
        padded = np.pad(img, ((p, p), (p, p), (0, 0)))
        dy, dx = self._rng.integers(0, 2 * p + 1, 2)
        img = padded[dy:dy + s, dx:dx + s]
        if self.hflip and self._rng.random() < 0.5:
            img = img[:, ::-1]
        return img


_MEAN255 = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
_STD255 = torch.tensor(STD).view(1, 3, 1, 1) * 255


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalised with MEAN / STD."""
    t = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return ((t - _MEAN255) / _STD255).contiguous()


def collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return normalise(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _loader(pipeline: wds.DataPipeline, num_workers: int) -> Iterable:
    if num_workers <= 0:
        return pipeline
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=True)


def resampled_pipeline(urls: list[str], stages: list, *, seed: int, batch_size: int, count: int,
                       collation_fn: Any, num_workers: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER) -> Iterator:
    """Endless batches from `count` samples in `urls`: shards drawn with replacement (seeded per rank
    and worker), buffer-shuffled, mapped by `stages`, batched.

    The pipeline restarts (`with_epoch`) every EPOCH_PASSES x `count` samples per process; a restart
    drops the shuffle buffer, so epochs are kept long relative to it.
    """
    bufsize = max(1, min(shuffle_buffer, count))
    pipeline = wds.DataPipeline(
        # Each rank/worker seeds from (rank * 1000 + worker, epoch, seed): streams differ across
        # DDP ranks and workers without split_by_node / split_by_worker, which resampling replaces.
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(bufsize, initial=max(1, bufsize // 4), rng=random.Random(seed)),
        *stages,
        wds.batched(batch_size, collation_fn=collation_fn, partial=False),
    )
    nbatches = max(1, math.ceil(EPOCH_PASSES * count / batch_size / max(1, num_workers)))
    loader = _loader(pipeline.with_epoch(nbatches=nbatches), num_workers)

    def endless() -> Iterator:
        while True:
            yield from loader

    return endless()


def train_batches(shard_dir: str | os.PathLike, *, input_size: int, batch_size: int, augment: bool, seed: int,
                  split: str = "train", num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled stream of (x float32 (N, 3, S, S) normalised, y int64 (N,)) from `split`.

    Resampled (`ResampledShards` + `with_epoch`), so it never ends and scales to any number of
    DDP ranks / DataLoader workers; deterministic given `seed` (and the rank / worker layout).
    `augment`: random crop with padding, plus horizontal flip when the task allows it.
    """
    m = read_manifest(shard_dir)
    info = split_info(m, split)
    prep = Prepare(input_size, augment=augment, hflip=bool(m.get("hflip", True)), seed=seed)
    return resampled_pipeline(shard_urls(shard_dir, m, split), [wds.map(prep)], seed=seed, batch_size=batch_size,
                              count=info["count"], collation_fn=collate, num_workers=num_workers)


class ValBatches:
    """Finite, re-iterable (x, y) batches of one split in manifest order with fixed preprocessing."""

    def __init__(self, shard_dir: str | os.PathLike, *, input_size: int, batch_size: int, split: str = "val",
                 limit: int | None = None, num_workers: int = 0) -> None:
        self.manifest = read_manifest(shard_dir)
        self.urls = shard_urls(shard_dir, self.manifest, split)
        self.classes: list[str] = list(self.manifest["classes"])
        count = split_info(self.manifest, split)["count"]
        self.num_samples = count if limit is None else min(count, limit)
        self.input_size, self.batch_size, self.limit, self.num_workers = input_size, batch_size, limit, num_workers

    def __len__(self) -> int:
        """Batches per pass (single process)."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker,
                  wds.tarfile_to_samples(), wds.map(Prepare(self.input_size))]
        if self.limit is not None:
            stages.append(wds.slice(self.limit))
        stages.append(wds.batched(self.batch_size, collation_fn=collate, partial=True))
        loader = _loader(wds.DataPipeline(*stages), self.num_workers)
        return iter(loader)


def val_batches(shard_dir: str | os.PathLike, *, input_size: int, batch_size: int, split: str = "val",
                limit: int | None = None, num_workers: int = 0) -> ValBatches:
    """Finite, deterministic (x, y) batches of `split` (first `limit` samples); a fresh pass per iteration.

    Shards are divided over DDP ranks (`split_by_node`) and DataLoader workers (`split_by_worker`).
    """
    return ValBatches(shard_dir, input_size=input_size, batch_size=batch_size, split=split, limit=limit,
                      num_workers=num_workers)


def iter_samples(shard_dir: str | os.PathLike, split: str, *, manifest: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__`, `png` bytes, `cls` bytes, ...) of one split in manifest order."""
    m = manifest if manifest is not None else read_manifest(shard_dir)
    yield from wds.DataPipeline(wds.SimpleShardList(shard_urls(shard_dir, m, split)), wds.tarfile_to_samples())
