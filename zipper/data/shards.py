"""WebDataset shards per task and split, their manifest, and the train / val streams read from them.

Layout of a shard directory (one task):

    train-000000.tar ...   samples `<key>.png` (lossless RGB) + `<key>.cls` (class index as text)
    val-000000.tar ...
    manifest.json          task, classes, per split: counts (total and per class), shards with
                           sha256, image size, skipped inputs

A directory is written to a temp folder beside it and renamed into place, so a killed run leaves
either the previous directory or the complete new one, never a mix.

A `webdataset` source (existing shards at URLs: http(s)://, s3://, gs://, pipe:..., local paths) is
not re-sharded: its directory holds only the manifest, whose shard entries carry a `url` (with the
sha256 / bytes / count measured by streaming each shard once) instead of a local `name`; every
reader streams from those URLs. A sample needs an image member (png / jpg / jpeg / webp) and a class
member (cls / class / label, integer text). Readers verify local shards (sha256) as for written
ones; remote ones are not re-downloaded to verify. A `name` must be a file inside the directory.

Streams:
- training (`epoch_stream`, used by `train_batches` and the feature cache's `cached_batches`):
  endless epochs; per epoch the shard list is permuted with (seed, epoch) and dealt to the
  DataLoader workers (at most one per shard), each worker buffer-shuffles its share (seeded by
  seed, epoch, worker), so every sample is read exactly once per epoch whatever the number of
  workers. A worker cuts its samples into GLOBAL batches (which may span an epoch boundary); each
  DDP rank reads them all but decodes only its rows, so the ranks' batches concatenate to the
  single-process batch. Augmentation is seeded per sample from (seed, epoch, shard, position in
  the shard), never from rank or worker. Same seed, num_workers and world_size: the same stream.
- validation (`val_batches`): every shard once in manifest order, divided over ranks and workers.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm
from webdataset.gopen import gopen

from ..io import sha256_file, write_json
from ..preprocess import normalise, resize_center
from .sources import SPLITS, BadSample, check_image_size, load_source, resolve

log = logging.getLogger(__name__)

FORMAT = "zipper.Shards/1"
MANIFEST = "manifest.json"
ON_BAD_SAMPLE = ("error", "skip")
PNG_LEVEL = 3  # zlib level: lossless at any level; 3 is a good speed/size trade for small images
TAR_MTIME = 0  # fixed member times: byte-identical shards for the same samples (an int: a float adds a PAX header)
SHUFFLE_BUFFER = 2000  # samples held for shuffling per worker (raw bytes, before decoding)
# Members of a webdataset sample: the first image member present is the image, the first label member
# the class index (integer text, as WebDataset writes `.cls`).
IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")
LABEL_MEMBERS = ("cls", "class", "label")
URL_TIMEOUT = 60.0  # seconds without data before an http(s) read fails
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule: key = path up to the first dot of the basename


# --- writing -------------------------------------------------------------------------------------


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes, origin: str = "image bytes") -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> uint8 array (H, W, 3); `origin` names them in errors."""
    with Image.open(io.BytesIO(data)) as img:
        check_image_size(img, len(data), origin)
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
                raise ValueError(
                    f"output {out_dir} exists and is not a {' / '.join(formats)} directory; "
                    "refusing to replace it (remove it or choose another path)"
                )
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


def write_shards(
    source: Mapping[str, Any],
    task: str,
    out_dir: str | os.PathLike,
    *,
    maxcount: int = 1000,
    on_bad_sample: str = "error",
) -> Path:
    """Materialise `task`'s train and val splits from `source` as WebDataset shards + manifest.json.

    `source` is the params.yaml mapping (see `zipper.data.sources`). `on_bad_sample`: "error" raises
    ValueError naming an unreadable image; "skip" leaves it out and counts it in the manifest.
    A `webdataset` source is not re-sharded: only its manifest is written (see `write_url_manifest`;
    `maxcount` and `on_bad_sample` do not apply, a bad sample there is always an error).
    Atomic: a killed run leaves the previous `out_dir` (or nothing), never a partial one.
    Returns the manifest path.
    """
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
    if not task or "/" in task:
        raise ValueError(f"task name must be a non-empty name without '/', got {task!r}")
    if resolve(source)["source"] == "webdataset":
        return write_url_manifest(source, task, out_dir)
    data = load_source(source)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, (FORMAT,)) as tmp:
        splits = {
            split: _write_split(data.splits[split], data.classes, split, tmp, task, maxcount, on_bad_sample)
            for split in SPLITS
        }
        manifest = {
            "format": FORMAT,
            "task": task,
            "classes": data.classes,
            "hflip": data.hflip,
            "source": _jsonable(data.info),
            "splits": splits,
        }
        write_json(tmp / MANIFEST, manifest)
    log.info(
        "%s: wrote %s", task, ", ".join(f"{s} {v['count']} in {len(v['shards'])} shards" for s, v in splits.items())
    )
    return out_dir / MANIFEST


def _write_split(
    samples: list, classes: list[str], split: str, tmp: Path, task: str, maxcount: int, on_bad_sample: str
) -> dict[str, Any]:
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
        raise ValueError(
            f"{task}/{split}: class {empty[0]!r} has no readable images"
            + (f" ({len(skipped)} skipped as unreadable)" if skipped else "")
        )
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


# --- webdataset source: existing shards at URLs --------------------------------------------------


def write_url_manifest(source: Mapping[str, Any], task: str, out_dir: str | os.PathLike) -> Path:
    """Write the manifest of a `webdataset` source (no re-sharding): per split its brace-expanded shard
    URLs (local paths made absolute) with the sample count, bytes and sha256 of each, measured by
    streaming every shard once. That pass also checks every sample: an image member, a class member,
    a class index within the classes; errors name the URL. Atomic; returns the manifest path.
    """
    cfg = resolve(source)
    if not isinstance(cfg["hflip"], bool):
        raise ValueError(f"data source 'webdataset': key 'hflip' must be true or false, got {cfg['hflip']!r}")
    classes = load_classes(cfg["classes"])
    splits = {split: _scan_split(cfg, split, classes, task) for split in SPLITS}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, (FORMAT,)) as tmp:
        write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT,
                "task": task,
                "classes": classes,
                "hflip": cfg["hflip"],
                "source": _jsonable(cfg),
                "splits": splits,
            },
        )
    log.info(
        "%s: %s", task, ", ".join(f"{s} {v['count']} in {len(v['shards'])} shards at URLs" for s, v in splits.items())
    )
    return out_dir / MANIFEST


def expand_urls(spec: str | Sequence[str], key: str) -> list[str]:
    """Shard URLs from a pattern or a list of them, brace-expanded as WebDataset does
    (`train-{000000..000003}.tar`); local paths are made absolute."""
    patterns = [spec] if isinstance(spec, str) else spec
    if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"data source 'webdataset': key {key!r} must be a shard URL pattern or a list of them, got {spec!r}"
        )
    return [_absolute(url) for p in patterns for url in wds.shardlists.expand_urls(p)]


def load_classes(spec: Any) -> list[str]:
    """Class names: a list, or the path / URL of a JSON list or a text file with one name per line."""
    where = "key 'classes'"
    if isinstance(spec, str):
        url = _absolute(spec)
        with open_url(url, "classes file") as f:
            text = f.read().decode("utf-8")
        where = f"classes file {url}"
        if url.endswith(".json") or text.lstrip().startswith("["):
            try:
                spec = json.loads(text)
            except ValueError as e:
                raise ValueError(f"data source 'webdataset': {where}: not valid JSON ({e})") from e
        else:
            spec = [line.strip() for line in text.splitlines() if line.strip()]
    if (
        not isinstance(spec, list)
        or not spec
        or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in spec)
    ):
        raise ValueError(f"data source 'webdataset': {where}: expected a non-empty list of class names, got {spec!r}")
    names = [str(c) for c in spec]  # YAML reads `classes: [0, 1]` as ints
    dup = next((c for c in names if names.count(c) > 1), None)
    if dup is not None:
        raise ValueError(f"data source 'webdataset': {where}: class {dup!r} is listed twice")
    return names


def _scan_split(cfg: Mapping[str, Any], split: str, classes: list[str], task: str) -> dict[str, Any]:
    counts = [0] * len(classes)
    shards = []
    for url in tqdm(
        expand_urls(cfg[split], split), desc=f"scan {task}/{split}", unit="shard", leave=False, mininterval=2
    ):
        entry, labels = _scan_shard(url, len(classes))
        shards.append(entry)
        for label in labels:
            counts[label] += 1
    total, expected = sum(counts), cfg[f"n_{split}"]
    if expected is not None and expected != total:
        raise ValueError(
            f"data source 'webdataset': key 'n_{split}' says {expected} samples, "
            f"the {split} shards {cfg[split]!r} hold {total}"
        )
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        log.warning("%s/%s: %d classes have no samples (e.g. %r)", task, split, len(empty), empty[0])
    return {
        "classes": classes,
        "count": total,
        "counts": dict(zip(classes, counts)),
        "image_size": None,  # images are not decoded here; the streams resize them to input_size
        "shards": shards,
        "skipped": {"count": 0, "files": []},
    }


def _scan_shard(url: str, num_classes: int) -> tuple[dict[str, Any], list[int]]:
    """Stream one shard: its manifest entry (url, sha256, bytes, count) and its labels."""
    with open_url(url) as f:
        hashed = _Hashing(f)
        labels = [int(s["cls"]) for s in _tar_samples(hashed, url, num_classes)]
        hashed.drain()  # the tar end padding belongs to the file's sha256 too
    if not labels:
        raise ValueError(f"shard {url} holds no samples")
    return {"url": url, "sha256": hashed.sha.hexdigest(), "bytes": hashed.bytes, "count": len(labels)}, labels


class _Hashing:
    """Read-only stream wrapper that hashes and counts the bytes read through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


# --- shards at URLs --------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # one letter: a Windows drive, not a scheme


def _local_path(url: str) -> Path | None:
    """The file a local path or file:// URL names; None for a remote URL or pipe:."""
    scheme = _scheme(url)
    if scheme == "":
        return Path(url)
    if scheme == "file":
        return Path(urllib.request.url2pathname(urlparse(url).path))
    return None


def _absolute(url: str) -> str:
    return str(Path(url).resolve()) if _scheme(url) == "" else url


def _open(url: str) -> IO[bytes]:
    local = _local_path(url)
    if local is not None:
        return open(local, "rb")
    scheme = _scheme(url)
    if scheme in ("http", "https"):  # the standard library: no curl needed, HTTP errors come back named
        return urllib.request.urlopen(url, timeout=URL_TIMEOUT)
    if scheme == "pipe":
        return gopen(url, "rb")  # WebDataset's: a shell command, its exit status checked at close
    import fsspec  # s3://, gs://, ...: needs the matching fsspec backend (s3fs, gcsfs) installed

    return fsspec.open(url, "rb").open()


@contextmanager
def open_url(url: str, what: str = "shard") -> Iterator[IO[bytes]]:
    """Open `url` for streaming reads (local path, file://, http(s)://, pipe:..., or any fsspec URL);
    failures, including a pipe command's exit status at close, raise ValueError naming the URL."""
    try:
        f = _open(url)
    except Exception as e:  # FileNotFoundError, HTTPError, URLError, ImportError for a missing fsspec backend...
        raise ValueError(f"cannot open {what} {url}: {type(e).__name__}: {e}") from e
    try:
        yield f
    except BaseException:
        try:
            f.close()
        except Exception:  # the error being raised says more than the close's
            pass
        raise
    try:
        f.close()
    except Exception as e:
        raise ValueError(f"reading {what} {url} failed: {type(e).__name__}: {e}") from e


def read_shard(url: str, *, num_classes: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of the tar at `url` in stored order: `__key__`, `__url__`, `png` (the image bytes, whatever
    their format: PIL reads them by content), `cls` (class index as ASCII bytes) and any other members.

    A sample's image is its first png / jpg / jpeg / webp member, its class its first cls / class /
    label member (integer text). Errors name the URL (and the sample key).
    """
    with open_url(url) as f:
        yield from _tar_samples(f, url, num_classes)


def _tar_samples(f: Any, url: str, num_classes: int | None) -> Iterator[dict[str, Any]]:
    try:
        for sample in _group(_tar_members(f), url):
            yield _canonical(sample, url, num_classes)
    except (tarfile.TarError, OSError, EOFError, http.client.HTTPException) as e:
        raise ValueError(f"shard {url}: unreadable as a tar archive ({type(e).__name__}: {e})") from e


def _tar_members(f: Any) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=f, mode="r|*") as tar:  # streaming: never seeks, so it reads any URL
        for info in tar:
            member = tar.extractfile(info) if info.isreg() else None
            if member is not None:
                yield info.name, member.read()
            # A stream has no use for past headers: do not keep them all (typeshed omits the attribute).
            tar.members = []  # type: ignore[attr-defined]


def _group(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive members with the same key -> one sample {__key__, __url__, ext: bytes, ...}."""
    sample: dict[str, Any] | None = None
    for name, data in members:
        m = _KEY.match(name)
        if m is None or os.path.basename(name).startswith("__") or m.group(2).startswith("__"):
            continue  # no extension, or WebDataset metadata
        key, ext = m.group(1), m.group(2).lower()
        if Path(key).is_absolute() or ".." in Path(key).parts:
            raise ValueError(
                f"shard {url}: member name {name!r} is absolute or contains '..' (a sample key must "
                "stay inside the shard)"
            )
        if sample is not None and key != sample["__key__"]:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"shard {url}: sample {key!r} has member {ext!r} twice")
        sample[ext] = data
    if sample is not None:
        yield sample


def _canonical(sample: dict[str, Any], url: str, num_classes: int | None) -> dict[str, Any]:
    """Image bytes under `png`, class index as ASCII bytes under `cls`, checked against `num_classes`."""
    key = sample["__key__"]
    image = next((k for k in IMAGE_MEMBERS if k in sample), None)
    label = next((k for k in LABEL_MEMBERS if k in sample), None)
    if image is None or label is None:
        what, names = ("image", IMAGE_MEMBERS) if image is None else ("class", LABEL_MEMBERS)
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"shard {url}: sample {key!r} has no {what} member ({' / '.join(names)}); it has {members}")
    try:
        index = int(sample[label])
    except ValueError:
        raise ValueError(
            f"shard {url}: sample {key!r}: {label} {sample[label][:20]!r} is not an integer class index"
        ) from None
    if num_classes is not None and not 0 <= index < num_classes:
        raise ValueError(f"shard {url}: sample {key!r} has class index {index}, outside the {num_classes} classes")
    sample["png"] = sample.pop(image)
    sample.pop(label)
    sample["cls"] = str(index).encode()
    return sample


# --- manifests -----------------------------------------------------------------------------------


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
    """Load and validate `shard_dir/manifest.json`. Errors name the file at fault.

    Every local shard (a `name` inside `shard_dir`, or a `url` that is a local path) must exist with
    its recorded size and, when `verify`, sha256. Shards at remote URLs are not checked here (that
    would download them): their sha256 was measured when the manifest was written, and a reader
    fails naming the URL when one is unreachable or malformed.
    """
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    m = load_manifest(
        path, FORMAT, ("task", "classes", "splits"), missing="manifest not found (write the shards first)"
    )
    for split, info in m["splits"].items():
        for key in ("count", "counts", "shards", "classes"):
            if key not in info:
                raise ValueError(f"{path}: split {split!r} is missing key {key!r}")
        if info["classes"] != m["classes"]:
            raise ValueError(f"{path}: split {split!r} classes differ from the task's classes")
        if not info["shards"]:
            raise ValueError(f"{path}: split {split!r} has no shards")
        for shard in info["shards"]:
            _check_entry(shard_dir, split, shard, verify)
    return m


def _check_entry(shard_dir: Path, split: str, shard: Any, verify: bool) -> None:
    if (
        not isinstance(shard, dict)
        or not {"sha256", "count"} <= shard.keys()
        or ("name" in shard) == ("url" in shard)
        or not isinstance(shard.get("name", shard.get("url")), str)
    ):
        raise ValueError(
            f"{shard_dir / MANIFEST}: split {split!r} has a shard entry without sha256 / count or "
            f"without exactly one name / url: {shard!r}"
        )
    if "name" in shard:
        _check_file(shard_dir, shard, verify)
        return
    local = _local_path(shard["url"])
    if local is not None:
        _check_local(local, shard, verify, shard_dir / MANIFEST)


def _named_path(directory: Path, entry: Mapping[str, Any]) -> Path:
    """`directory / entry["name"]`, refusing a name that leads out of the directory (absolute, or with
    '..'): a manifest must never make a reader open an arbitrary local file."""
    name = entry.get("name")
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(
            f"{Path(directory) / MANIFEST}: shard entry name {name!r} must be a file name inside "
            f"{directory} (absolute paths and '..' are refused; shards elsewhere belong in a 'url')"
        )
    return Path(directory) / name


def _check_file(directory: Path, entry: Mapping[str, Any], verify: bool) -> None:
    _check_local(_named_path(directory, entry), entry, verify, Path(directory) / MANIFEST)


def _check_local(f: Path, entry: Mapping[str, Any], verify: bool, manifest: Path) -> None:
    if not f.is_file():
        raise ValueError(f"shard {f} is missing (listed in {manifest})")
    if "bytes" in entry and f.stat().st_size != entry["bytes"]:
        raise ValueError(f"shard {f} has {f.stat().st_size} bytes, manifest says {entry['bytes']}: corrupt or replaced")
    if verify and sha256_file(f) != entry["sha256"]:
        raise ValueError(f"shard {f} sha256 differs from the manifest: corrupt or replaced")


def split_info(manifest: Mapping[str, Any], split: str) -> Mapping[str, Any]:
    if split not in manifest["splits"]:
        raise ValueError(f"task {manifest['task']!r} has no split {split!r}; has {sorted(manifest['splits'])}")
    return manifest["splits"][split]


def shard_urls(shard_dir: str | os.PathLike, manifest: Mapping[str, Any], split: str) -> list[str]:
    """Where each shard of `split` is read from: its `url`, or its `name` inside `shard_dir`."""
    return [
        s["url"] if "url" in s else str(_named_path(Path(shard_dir), s)) for s in split_info(manifest, split)["shards"]
    ]


# --- decoding ------------------------------------------------------------------------------------

_PERMUTE, _SHUFFLE, _AUGMENT = 0, 1, 2  # RNG purposes: independent streams from one seed


def _rng(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (any sign)."""
    return np.random.default_rng([int(p) % 2**64 for p in parts])


def _sample_random(*parts: int) -> random.Random:
    """A small RNG seeded by a hash of a tuple of integers: ~10x cheaper to make than a numpy
    Generator, which matters when one is made per sample."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}Q", *(int(p) % 2**64 for p in parts)), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "little"))


class Prepare:
    """Sample dict -> (uint8 HWC image at input_size, label); random pad-crop / flip when `augment`.

    A class (not a closure) so DataLoader workers can pickle it. Its RNG is seeded per sample from
    (seed, epoch, shard, position in the shard), tags the training stream adds (else from the sample
    key), so a sample is augmented alike on every rank and in every worker layout.
    """

    def __init__(self, input_size: int, *, augment: bool = False, hflip: bool = True, seed: int = 0) -> None:
        self.input_size, self.augment, self.hflip, self.seed = input_size, augment, hflip, seed
        self.pad = max(1, round(input_size / 8))  # 4 px at 32 px (the CIFAR recipe)

    def __call__(self, sample: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        try:
            img = decode_png(sample["png"], f"{sample.get('__key__')!r}")
        except Exception as e:  # PIL raises many types for bad bytes
            raise ValueError(
                f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r}: unreadable image "
                f"({type(e).__name__}: {e})"
            ) from e
        s = self.input_size
        if img.shape[:2] != (s, s):
            img = np.asarray(resize_center(Image.fromarray(img), s))
        if self.augment:
            img = self._augment(img, self._sample_rng(sample))
        return img, int(sample["cls"])

    def _sample_rng(self, sample: Mapping[str, Any]) -> random.Random:
        if "__index__" in sample:
            return _sample_random(self.seed, _AUGMENT, sample["__epoch__"], sample["__shard__"], sample["__index__"])
        return _sample_random(self.seed, _AUGMENT, zlib.crc32(str(sample.get("__key__", "")).encode()))

    def _augment(self, img: np.ndarray, rng: random.Random) -> np.ndarray:
        p, s = self.pad, self.input_size
        padded = np.pad(img, ((p, p), (p, p), (0, 0)))
        dy, dx = rng.randrange(2 * p + 1), rng.randrange(2 * p + 1)
        img = padded[dy : dy + s, dx : dx + s]
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        return img


def collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return normalise(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def fixed_batches(
    samples: Iterable[dict[str, Any]], prep: Prepare, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of `samples` in order, fixed preprocessing; the last one may be partial."""
    batch = []
    for sample in samples:
        batch.append(prep(sample))
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


# --- streams -------------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) outside a worker."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _loader(
    dataset: torch.utils.data.IterableDataset, *, num_workers: int, pin_memory: bool, seed: int = 0
) -> Iterable:
    """`dataset` itself, or a DataLoader running it in `num_workers` processes and / or pinning its
    batches (only where CUDA is available: pinning is useless without it, and torch warns)."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    pin = pin_memory and torch.cuda.is_available()
    if num_workers == 0 and not pin:
        return dataset
    # batch_size=None: the dataset yields whole batches. An own generator: the DataLoader draws its
    # workers' base seed from it, not from (and so advancing) torch's global RNG.
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin, generator=torch.Generator().manual_seed(seed)
    )


def check_ranks(batch_size: int, rank: int, world_size: int) -> None:
    """`batch_size` is the global batch: it must split evenly over `world_size` ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of world_size {world_size} "
            f"(batch_size is the global batch; each rank gets batch_size // world_size rows)"
        )


def _buffer_shuffle(samples: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle through a buffer of `size` items; the buffer is drained (shuffled) when `samples` ends."""
    buf: list[Any] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class EpochStream(torch.utils.data.IterableDataset):
    """Endless batches over the shards at `urls`, epoch after epoch (see the module docstring).

    Per epoch e the shards are permuted with (seed, e) and dealt round-robin to the DataLoader
    workers; a worker reads its share, shuffles it in a buffer seeded by (seed, e, worker), so each
    sample comes once per epoch, and the epoch ends with the buffer drained. Samples are tagged
    `__epoch__`, `__shard__` (index in `urls`) and `__index__` (position in the shard). A worker cuts
    its samples into global batches of `batch_size`, running on across epochs, keeps rows
    [rank * b, (rank + 1) * b), b = batch_size // world_size, and only then `decode`s them.
    Samples whose key `skip` accepts are left out (the held-out split, `zipper.data.holdout`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        decode: Callable[[dict[str, Any]], Any],
        collation_fn: Callable[[list], Any],
        *,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = SHUFFLE_BUFFER,
        num_classes: int | None = None,
        skip: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__()
        check_ranks(batch_size, rank, world_size)
        if not urls:
            raise ValueError("no shards to stream")
        self.urls, self.decode, self.collation_fn = list(urls), decode, collation_fn
        self.seed, self.batch_size, self.rank, self.world_size = seed, batch_size, rank, world_size
        self.shuffle_buffer, self.num_classes, self.skip = max(1, shuffle_buffer), num_classes, skip

    def __iter__(self) -> Iterator[Any]:
        samples = self.samples(*_worker())
        rows = self.batch_size // self.world_size
        first = self.rank * rows
        while True:
            batch = list(itertools.islice(samples, self.batch_size))
            yield self.collation_fn([self.decode(s) for s in batch[first : first + rows]])

    def samples(self, worker: int = 0, workers: int = 1) -> Iterator[dict[str, Any]]:
        """One worker's endless raw, tagged samples."""
        for epoch in itertools.count():
            share = [int(i) for i in _rng(self.seed, _PERMUTE, epoch).permutation(len(self.urls))[worker::workers]]
            rng = _rng(self.seed, _SHUFFLE, epoch, worker, workers)
            n = 0
            for sample in _buffer_shuffle(self._read(share, epoch), self.shuffle_buffer, rng):
                n += 1
                yield sample
            if n == 0:  # without this guard an all-empty share would spin forever
                raise ValueError(f"shards {[self.urls[i] for i in share]} hold no samples")

    def _read(self, share: list[int], epoch: int) -> Iterator[dict[str, Any]]:
        for i in share:
            for j, sample in enumerate(read_shard(self.urls[i], num_classes=self.num_classes)):
                if self.skip is not None and self.skip(sample["__key__"]):
                    continue
                sample.update(__epoch__=epoch, __shard__=i, __index__=j)
                yield sample


def epoch_stream(
    urls: Sequence[str],
    decode: Callable[[dict[str, Any]], Any],
    collation_fn: Callable[[list], Any],
    *,
    seed: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    shuffle_buffer: int = SHUFFLE_BUFFER,
    num_classes: int | None = None,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[Any]:
    """Endless batches of an `EpochStream`, in `num_workers` DataLoader workers (at most one per
    shard: a worker without shards would have nothing to read). Deterministic given `seed`,
    `num_workers` and `world_size`; errors on arguments are raised here, not at the first batch."""
    dataset = EpochStream(
        urls,
        decode,
        collation_fn,
        seed=seed,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        num_classes=num_classes,
        skip=skip,
    )
    return _endless(_loader(dataset, num_workers=min(num_workers, len(urls)), pin_memory=pin_memory, seed=seed))


def _endless(loader: Iterable) -> Iterator[Any]:
    yield from loader  # a generator: workers start at the first batch asked for, not before


def train_batches(
    shard_dir: str | os.PathLike,
    *,
    input_size: int,
    batch_size: int,
    augment: bool,
    seed: int,
    split: str = "train",
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled stream of (x float32 (N, 3, S, S) normalised, y int64 (N,)) from `split`.

    Epoch after epoch, every sample once per epoch (`EpochStream`); deterministic given `seed`,
    `num_workers` and `world_size`. `batch_size` is the global batch: this rank gets its
    N = batch_size // world_size rows, and the ranks' batches concatenated in rank order are the
    world_size=1 batch, bit for bit. `augment`: random crop with padding, plus horizontal flip when
    the task allows it. `pin_memory`: pinned batches where CUDA is available. `skip(key)`: leave
    that sample out.
    """
    m = read_manifest(shard_dir)
    prep = Prepare(input_size, augment=augment, hflip=bool(m.get("hflip", True)), seed=seed)
    return epoch_stream(
        shard_urls(shard_dir, m, split),
        prep,
        collate,
        seed=seed,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        num_classes=len(m["classes"]),
        skip=skip,
    )


class _ShardBatches(torch.utils.data.IterableDataset):
    """Batches of (url, cap) shards in order, the first `cap` samples of each; a DataLoader worker
    takes every num_workers-th shard and ends with its own partial batch."""

    def __init__(self, shards: list[tuple[str, int]], prep: Prepare, batch_size: int, num_classes: int) -> None:
        super().__init__()
        self.shards, self.prep, self.batch_size, self.num_classes = shards, prep, batch_size, num_classes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        samples = itertools.chain.from_iterable(
            itertools.islice(read_shard(url, num_classes=self.num_classes), cap)
            for url, cap in self.shards[worker::workers]
        )
        yield from fixed_batches(samples, self.prep, self.batch_size)


class ValBatches:
    """Finite, re-iterable (x, y) batches of one split in manifest order with fixed preprocessing."""

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        *,
        input_size: int,
        batch_size: int,
        split: str = "val",
        limit: int | None = None,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.manifest = read_manifest(shard_dir)
        self.urls = shard_urls(shard_dir, self.manifest, split)
        self.classes: list[str] = list(self.manifest["classes"])
        info = split_info(self.manifest, split)
        self.num_samples = info["count"] if limit is None else min(info["count"], limit)
        # how many of each shard's samples fall within the first num_samples of the split
        starts = np.cumsum([0] + [s["count"] for s in info["shards"]])[:-1]
        self.caps = [int(max(0, min(s["count"], self.num_samples - a))) for s, a in zip(info["shards"], starts)]
        self.input_size, self.batch_size, self.limit, self.num_workers = input_size, batch_size, limit, num_workers
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        if world_size is not None and not 0 <= (rank or 0) < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")

    def __len__(self) -> int:
        """Batches per pass (single process)."""
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # No explicit world_size: the ranks of torch.distributed (or RANK / WORLD_SIZE), as WebDataset does.
        rank, world = (
            (self.rank or 0, self.world_size) if self.world_size is not None else wds.utils.pytorch_worker_info()[:2]
        )
        shards = [(u, c) for u, c in zip(self.urls, self.caps) if c > 0][rank::world]
        dataset = _ShardBatches(shards, Prepare(self.input_size), self.batch_size, len(self.classes))
        return iter(_loader(dataset, num_workers=min(self.num_workers, len(shards)), pin_memory=self.pin_memory))


def val_batches(
    shard_dir: str | os.PathLike,
    *,
    input_size: int,
    batch_size: int,
    split: str = "val",
    limit: int | None = None,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
) -> ValBatches:
    """Finite, deterministic (x, y) batches of `split` (first `limit` samples); a fresh pass per iteration.

    Shards are divided over ranks (`rank` of `world_size`; by default those of torch.distributed or
    RANK / WORLD_SIZE) and DataLoader workers. One process reads in manifest order; workers yield
    the same samples, their batches interleaved.
    """
    return ValBatches(
        shard_dir,
        input_size=input_size,
        batch_size=batch_size,
        split=split,
        limit=limit,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )


def iter_samples(
    shard_dir: str | os.PathLike, split: str, *, manifest: Mapping[str, Any] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples of one split in manifest order (local files or URLs), as `read_shard` gives them:
    `__key__`, `png` (image bytes, whatever their format), `cls` bytes, ..."""
    m = manifest if manifest is not None else read_manifest(shard_dir)
    for url in shard_urls(shard_dir, m, split):
        yield from read_shard(url, num_classes=len(m["classes"]))
