"""Data sources: each turns a params.yaml `source` mapping into class names and (image, label) samples.

- `synthetic`:   {source, name: shapes|textures, n_train=3000, n_val=600, seed=0, size=32}
- `digits`:      {source, seed=0, val_fraction=0.2, size=32} scikit-learn's 8x8 handwritten digits (1797
                 images shipped inside scikit-learn), upscaled to `size` and stored as RGB.
- `imagefolder`: {source, root, train="train", val="val", image_size=None, seed=0} a user's
                 `root/train/<class>/*` and `root/val/<class>/*`, any format PIL reads.
- `torchvision`: {source, dataset, root, download=False, image_size=None, train_split=None,
                 val_split=None, seed=0} any `torchvision.datasets` class by name.
  `image_size`: store images resized (shorter side) and centre-cropped to this size; None keeps them
  as they are, and the pipeline's data stage fills in teachers.input_size (`at_input_size`).
- `webdataset`:  {source, train, val, classes, n_train=None, n_val=None, hflip=True} existing shards at
                 URLs (brace patterns or lists); not loaded here but streamed in place (see
                 `zipper.data.shards.write_url_manifest`). `classes`: a list, or a path / URL of a JSON
                 list or a text file. `n_*`: expected counts, checked when given.

Samples load lazily (`Sample.load() -> (PIL RGB image, label)`) so an unreadable file is found, and
named, while the shards are written. Every image is converted to 8-bit RGB (`to_rgb`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from ..preprocess import resize_center
from . import synthetic

SOURCES: tuple[str, ...] = ("synthetic", "digits", "imagefolder", "torchvision", "webdataset")
SPLITS: tuple[str, ...] = ("train", "val")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

# Keys each source accepts: name -> default (REQUIRED = must be given).
REQUIRED = object()
KEYS: dict[str, dict[str, Any]] = {
    "synthetic": {"name": REQUIRED, "n_train": 3000, "n_val": 600, "seed": 0, "size": 32},
    "digits": {"seed": 0, "val_fraction": 0.2, "size": 32},
    "imagefolder": {"root": REQUIRED, "train": "train", "val": "val", "image_size": None, "seed": 0},
    "torchvision": {
        "dataset": REQUIRED,
        "root": REQUIRED,
        "download": False,
        "image_size": None,
        "train_split": None,
        "val_split": None,
        "seed": 0,
    },
    "webdataset": {
        "train": REQUIRED,
        "val": REQUIRED,
        "classes": REQUIRED,
        "n_train": None,
        "n_val": None,
        "hflip": True,
    },
}


class BadSample(ValueError):
    """An input image that cannot be read; the message names the file."""


# The largest image accepted (a 12 KB PNG can declare 100 Mpx): a photo of 8000 x 6000 fits; anything
# bigger is a decompression bomb or a scan that would slow every training step that reads it.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 100 * 2**20


def check_image_size(img: Image.Image, nbytes: int, origin: str) -> None:
    """Refuse an opened (not yet decoded) image over MAX_IMAGE_PIXELS or a file over MAX_IMAGE_BYTES."""
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS or nbytes > MAX_IMAGE_BYTES:
        raise BadSample(
            f"image {origin} is too large: {w} x {h} px, {nbytes} bytes (at most {MAX_IMAGE_PIXELS} px "
            f"and {MAX_IMAGE_BYTES} bytes): resize it first"
        )


@dataclass(frozen=True)
class Sample:
    """One input sample: `load()` returns (RGB image, label) or raises BadSample naming `origin`."""

    load: Callable[[], tuple[Image.Image, int]]
    origin: str


@dataclass
class SourceData:
    """A task's classes and its samples per split, plus what the manifest records about the source."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    hflip: bool = True  # does a horizontal flip keep the label? (read by training augmentation)
    info: dict[str, Any] = field(default_factory=dict)


def resolve(source: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a source mapping and fill in defaults; errors name the key at fault."""
    if not isinstance(source, Mapping):
        raise ValueError(f"data source must be a mapping with a 'source' key, got {type(source).__name__}")
    if "source" not in source:
        raise ValueError(f"data source: missing key 'source' (one of {', '.join(SOURCES)})")
    kind = source["source"]
    if kind not in SOURCES:
        raise ValueError(f"data source: unknown source {kind!r} (key 'source'); expected one of {', '.join(SOURCES)}")
    allowed = KEYS[kind]
    unknown = sorted(set(source) - set(allowed) - {"source"})
    if unknown:
        raise ValueError(f"data source {kind!r}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    out: dict[str, Any] = {"source": kind}
    for key, default in allowed.items():
        if key in source:
            out[key] = source[key]
        elif default is REQUIRED:
            raise ValueError(f"data source {kind!r}: missing key {key!r}")
        else:
            out[key] = default
    return out


def at_input_size(source: Mapping[str, Any], input_size: int) -> dict[str, Any]:
    """A source of a user's images (image folder, torchvision data set) without its own `image_size`
    stores them at the size the nets read: shorter side resized, centre crop, what every stream does
    first anyway. A 24 Mpx photo is then decoded once, when sharding, not at every training step."""
    if source.get("source") in ("imagefolder", "torchvision") and source.get("image_size") is None:
        return {**source, "image_size": input_size}
    return dict(source)


def load_source(source: Mapping[str, Any]) -> SourceData:
    """Open the source described by `source` (see the module docstring for the keys)."""
    cfg = resolve(source)
    if cfg["source"] == "webdataset":
        raise ValueError(
            "data source 'webdataset' is streamed from its URLs, not loaded: write its manifest with write_shards"
        )
    return {"synthetic": _synthetic, "digits": _digits, "imagefolder": _imagefolder, "torchvision": _torchvision}[
        cfg["source"]
    ](cfg)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: grayscale, palette, 16-bit, CMYK; alpha is composited onto black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I") and a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


# --- sources ---------------------------------------------------------------------------------------


def _array_samples(images: np.ndarray, labels: np.ndarray, origin: str) -> list[Sample]:
    def one(i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(images[i], "RGB"), int(labels[i])

    return [Sample(partial(one, i), f"{origin}[{i}]") for i in range(len(labels))]


def _synthetic(cfg: dict[str, Any]) -> SourceData:
    name = cfg["name"]
    if name not in synthetic.TASKS:
        raise ValueError(
            f"data source 'synthetic': unknown name {name!r} (key 'name'); built-in: {', '.join(synthetic.TASKS)}"
        )
    for key in ("n_train", "n_val"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"data source 'synthetic': key {key!r} must be a positive integer, got {cfg[key]!r}")
    splits = {}
    for i, split in enumerate(SPLITS):
        # Distinct seeds per split: val images are never copies of train images.
        images, labels = synthetic.generate(name, cfg[f"n_{split}"], seed=cfg["seed"] * 2 + i, size=cfg["size"])
        splits[split] = _array_samples(images, labels, f"synthetic:{name}/{split}")
    return SourceData(list(synthetic.TASKS[name]), splits, hflip=synthetic.HFLIP[name], info=dict(cfg))


def _digits(cfg: dict[str, Any]) -> SourceData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    frac = cfg["val_fraction"]
    if not 0 < frac < 1:
        raise ValueError(f"data source 'digits': key 'val_fraction' must be in (0, 1), got {frac!r}")
    d = load_digits()
    gray = (d.images / 16.0 * 255 + 0.5).clip(0, 255).astype(np.uint8)  # (n, 8, 8), values 0..16
    idx = np.arange(len(gray))
    tr, va = train_test_split(idx, test_size=frac, random_state=cfg["seed"], stratify=d.target)
    size = cfg["size"]

    def one(i: int) -> tuple[Image.Image, int]:
        img = Image.fromarray(gray[i], "L").resize((size, size), Image.Resampling.BILINEAR)
        return img.convert("RGB"), int(d.target[i])

    splits = {
        "train": [Sample(partial(one, i), f"digits[{i}]") for i in tr],
        "val": [Sample(partial(one, i), f"digits[{i}]") for i in sorted(va)],
    }
    return SourceData([str(c) for c in range(10)], splits, hflip=False, info=dict(cfg))


def _open_image(path: Path, label: int, size: int | None = None) -> tuple[Image.Image, int]:
    try:
        with Image.open(path) as img:
            check_image_size(img, path.stat().st_size, str(path))
            img.load()  # decode now: truncated files fail here, not later
            rgb = to_rgb(img)
        return (resize_center(rgb, size) if size else rgb), label
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise BadSample(f"unreadable image {path}: {type(e).__name__}: {e}") from e


def _imagefolder(cfg: dict[str, Any]) -> SourceData:
    root = Path(cfg["root"])
    if not root.is_dir():
        raise ValueError(f"data source 'imagefolder': root {str(root)!r} (key 'root') is not a directory")
    found: dict[str, dict[str, list[Path]]] = {}
    ignored: list[str] = []
    for split in SPLITS:
        d = root / cfg[split]
        if not d.is_dir():
            raise ValueError(f"data source 'imagefolder': missing split folder {str(d)!r} (key {split!r})")
        classes = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(
                f"data source 'imagefolder': {str(d)!r} has no class folders (expected {d}/<class>/<image>)"
            )
        found[split] = {}
        for c in classes:
            files = []
            for p in sorted((d / c).rglob("*")):
                if p.is_file() and not p.name.startswith("."):
                    if p.suffix.lower() in IMAGE_EXTENSIONS:
                        files.append(p)
                    else:
                        ignored.append(str(p))
            if not files:
                raise ValueError(f"data source 'imagefolder': empty class folder {str(d / c)!r} (no images)")
            found[split][c] = files
    train_c, val_c = set(found["train"]), set(found["val"])
    if train_c != val_c:
        only_t, only_v = sorted(train_c - val_c), sorted(val_c - train_c)
        raise ValueError(
            f"data source 'imagefolder': train and val class folders differ under {str(root)!r}: "
            f"only in train: {only_t}, only in val: {only_v}"
        )
    classes = sorted(train_c)
    splits = {}
    for split in SPLITS:
        samples = [
            Sample(partial(_open_image, p, k, cfg["image_size"]), str(p))
            for k, c in enumerate(classes)
            for p in found[split][c]
        ]
        if split == "train":  # shards are read sequentially: mix the classes once, reproducibly
            order = np.random.default_rng(cfg["seed"]).permutation(len(samples))
            samples = [samples[i] for i in order]
        splits[split] = samples
    info = dict(cfg, root=str(root.resolve()), ignored_files=len(ignored))
    return SourceData(classes, splits, hflip=True, info=info)


def _dataset_class(name: str) -> Callable[..., Any]:
    import torchvision.datasets as tvd

    ctor = getattr(tvd, name, None)
    if not inspect.isclass(ctor):
        raise ValueError(f"data source 'torchvision': unknown dataset {name!r} (key 'dataset') in torchvision.datasets")
    return ctor


def _torchvision(cfg: dict[str, Any]) -> SourceData:
    name = cfg["dataset"]
    ctor = _dataset_class(name)
    params = inspect.signature(ctor).parameters
    datasets: dict[str, Any] = {}
    for split in SPLITS:
        kw: dict[str, Any] = {}
        if "download" in params:
            kw["download"] = bool(cfg["download"])
        chosen = cfg[f"{split}_split"]
        if "train" in params and chosen is None:
            kw["train"] = split == "train"
        elif "split" in params:
            kw["split"] = chosen if chosen is not None else ("train" if split == "train" else "test")
        else:
            raise ValueError(
                f"data source 'torchvision': {name} has no train/split argument, so train and val "
                "cannot be told apart (for a folder of images use source: imagefolder)"
            )
        try:
            datasets[split] = ctor(str(cfg["root"]), **kw)
        except Exception as e:  # missing files without download=True, bad split name...
            raise ValueError(f"data source 'torchvision': cannot open {name}(root={cfg['root']!r}, {kw}): {e}") from e
    classes = getattr(datasets["train"], "classes", None)
    if not classes:
        targets = getattr(datasets["train"], "targets", None)
        if targets is None:  # no metadata: read every label once
            targets = [datasets["train"][i][1] for i in range(len(datasets["train"]))]
        classes = [str(i) for i in range(1 + max(int(t) for t in targets))]
    size = cfg["image_size"]

    def one(ds: Any, i: int) -> tuple[Image.Image, int]:
        img, label = ds[i]
        if not isinstance(img, Image.Image):
            raise BadSample(
                f"{name}[{i}]: expected a PIL image (construct the dataset without transforms), "
                f"got {type(img).__name__}"
            )
        img = to_rgb(img)
        return (resize_center(img, size) if size else img), int(label)

    splits = {}
    for split, ds in datasets.items():
        order = np.random.default_rng(cfg["seed"]).permutation(len(ds)) if split == "train" else np.arange(len(ds))
        splits[split] = [Sample(partial(one, ds, int(i)), f"{name}/{split}[{i}]") for i in order]
    return SourceData([str(c) for c in classes], splits, hflip=True, info=dict(cfg, root=str(cfg["root"])))
