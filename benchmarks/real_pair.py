"""A pair of real-image tasks from what ships in PyPI packages, for the sweeps (`sweep_archs.py`).

- `digits`: scikit-learn's 1797 handwritten digits (8x8 scans, the pipeline's `digits` source).
- `photos`: which of ten photographs shipped with scikit-image a 32 px patch comes from (a cat, a
  rocket, bricks, gravel, a retina, ...). Each photo is cut into a 4 x 4 grid; four cells per photo
  (drawn by the seed) give the val patches, the other twelve the train patches, and every patch lies
  inside one cell, so no val pixel is ever seen in training. A patch is a random square of half to
  all of its cell's shorter side, resized to 32 px.

    .venv/bin/pip install scikit-image
    .venv/bin/python benchmarks/real_pair.py [--root /tmp/zipper-real] [--params params.yaml]
    .venv/bin/python benchmarks/sweep_archs.py --params /tmp/zipper-real/params.yaml ...

Writes `<root>/photos/{train,val}/<photo>/<i>.png` and `<root>/params.yaml` (the given params with
these two tasks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from zipper.data.shards import atomic_dir
from zipper.io import write_text

PHOTOS = (
    "astronaut",
    "brick",
    "chelsea",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "moon",
    "retina",
    "rocket",
)
GRID = 4
VAL_CELLS = 4
SIZE = 32


def cells(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The GRID x GRID cells of an image as (top, left, height, width)."""
    h, w = image.shape[0] // GRID, image.shape[1] // GRID
    return [(r * h, c * w, h, w) for r in range(GRID) for c in range(GRID)]


def patch(image: np.ndarray, cell: tuple[int, int, int, int], rng: np.random.Generator) -> Image.Image:
    top, left, h, w = cell
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = top + int(rng.integers(0, h - side + 1)), left + int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(image[y : y + side, x : x + side]).convert("RGB")
    return crop.resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def write_photos(root: Path, n_train: int, n_val: int, seed: int) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        image = getattr(data, name)()
        grid = cells(image)
        val = set(rng.choice(len(grid), VAL_CELLS, replace=False).tolist())
        for split, count in (("train", n_train), ("val", n_val)):
            pool = [c for i, c in enumerate(grid) if (i in val) == (split == "val")]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                patch(image, pool[int(rng.integers(len(pool)))], rng).save(folder / f"{i:04d}.png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/zipper-real")
    ap.add_argument("--params", default="params.yaml", help="the recipe; its data.tasks are replaced")
    ap.add_argument("--n-train", type=int, default=300, help="patches per photo")
    ap.add_argument("--n-val", type=int, default=60, help="patches per photo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    photos = root / "photos"
    if not photos.exists():
        with atomic_dir(photos, formats=()) as tmp:  # whole or not at all: a killed run is redone, not reused
            write_photos(tmp, args.n_train, args.n_val, args.seed)
    params = yaml.safe_load(Path(args.params).read_text())
    params["data"]["tasks"] = {
        "digits": {"source": "digits", "seed": args.seed},
        "photos": {"source": "imagefolder", "root": str(photos), "seed": args.seed},
    }
    write_text(root / "params.yaml", yaml.safe_dump(params, sort_keys=False))
    print(root / "params.yaml")


if __name__ == "__main__":
    main()
