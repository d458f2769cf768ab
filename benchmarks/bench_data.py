"""Data-layer benchmark, side by side in one run:

1. images/s reading the same images from WebDataset shards and from an image folder (both PNG,
   both decoded, converted and normalised into float batches of the same size, one process);
2. calibration-style steps/s with teacher targets from the feature cache vs computed online
   (a step = student forward_intermediates + teacher targets + CE + L1 over every pointwise tap +
   backward + SGD step; student and teacher are the same arch).

    .venv/bin/python benchmarks/bench_data.py [--n 2000] [--steps 30] [--batch 64] [--threads 1]
                                              [--n-cal 1000] [--widths 0.25 1.0]

Both readers run from a warm page cache (the files were just written): this measures decoding and
pipeline overhead, not disk speed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from zipper import build_model
from zipper.data import (
    MEAN,
    STD,
    cached_batches,
    synthetic,
    train_batches,
    val_batches,
    write_feature_cache,
    write_shards,
)


def write_folder(root: Path, task: str, n: int, seed: int) -> None:
    """The same images the synthetic source puts in the train shards, as root/train/<class>/<i>.png."""
    images, labels = synthetic.generate(task, n, seed=seed * 2)  # the train split's seed (see sources)
    names = synthetic.TASKS[task]
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / "train" / names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.png", compress_level=3)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f}/s  ({n} in {seconds:.2f} s)"


def bench_read(shards: Path, folder: Path, n: int, batch: int) -> None:
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    def shard_pass() -> int:
        return sum(len(y) for _, y in val_batches(shards, input_size=32, batch_size=batch, split="train"))

    tf = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = tvd.ImageFolder(str(folder / "train"), transform=tf)

    def folder_pass() -> int:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
        return sum(len(y) for _, y in loader)

    def train_stream() -> int:
        it = train_batches(shards, input_size=32, batch_size=batch, augment=True, seed=0)
        return sum(len(y) for _, y in islice(it, max(1, n // batch)))

    print(f"\n== reading {n} images (32 px PNG), batch {batch}, 1 process; best of 3 interleaved passes ==")
    readers = {
        "shards  val_batches (ordered)": shard_pass,
        "folder  torchvision ImageFolder + DataLoader": folder_pass,
        "shards  train_batches (resampled, shuffled, augmented)": train_stream,
    }
    best = dict.fromkeys(readers, float("inf"))
    counts = {}
    for fn in readers.values():
        fn()  # warm-up pass (page cache, imports)
    for _ in range(3):  # interleaved, so every reader sees the same machine load
        for name, fn in readers.items():
            t = time.perf_counter()
            counts[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    for name in readers:
        print(f"{name:56s} {rate(counts[name], best[name])}")


def bench_calibration(shards: Path, cache: Path, steps: int, batch: int, width: float) -> None:
    torch.manual_seed(0)
    teacher = build_model("mobilenet_v1", 10, width=width, input_size=32).eval()
    taps = teacher.pointwise_taps()
    print(f"\n== calibration steps: MobileNetV1-{width:g} student + teacher, 32 px, batch {batch}, {len(taps)} taps ==")
    t = time.perf_counter()
    write_feature_cache(teacher, shards, cache, input_size=32, batch_size=128, budget_mb=10_000, teacher_sha256="bench")
    size = sum(f.stat().st_size for f in cache.iterdir())
    print(f"feature cache written in {time.perf_counter() - t:.1f} s, {size / 2**20:.1f} MiB on disk")

    def variant(stream, online: bool):
        """A calibration-style training loop; returns a function that runs k steps."""
        torch.manual_seed(0)
        student = build_model("mobilenet_v1", 10, width=width, input_size=32).train()
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

        def steps_(k: int) -> None:
            for _ in range(k):
                if online:
                    x, y = next(stream)
                    with torch.no_grad():
                        t_logits, t_feats = teacher.forward_intermediates(x)
                    t_taps = {n: t_feats[n] for n in taps}
                else:
                    x, y, t_logits, t_taps = next(stream)
                logits, feats = student.forward_intermediates(x)
                loss = F.cross_entropy(logits, y) + sum(F.l1_loss(feats[n], t_taps[n]) for n in taps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return steps_

    chunk = 5
    for workers in (0, 1):  # 1: reading and decoding overlap the step in a DataLoader worker process
        run = {
            "online": variant(
                train_batches(shards, input_size=32, batch_size=batch, augment=False, seed=0, num_workers=workers),
                online=True,
            ),
            "cache": variant(
                cached_batches(cache, batch_size=batch, seed=0, input_size=32, num_workers=workers), online=False
            ),
        }
        spent = dict.fromkeys(run, 0.0)
        for fn in run.values():
            fn(3)  # warm-up: workers, shuffle buffer, allocator
        # Interleave short chunks so both variants see the same (shared, noisy) machine load.
        for _ in range(max(1, steps // chunk)):
            for name, fn in run.items():
                t = time.perf_counter()
                fn(chunk)
                spent[name] += time.perf_counter() - t
        n = max(1, steps // chunk) * chunk
        online, cached = n / spent["online"], n / spent["cache"]
        print(
            f"loader workers {workers}: online teacher targets {online:5.2f} steps/s, "
            f"feature cache {cached:5.2f} steps/s ({cached / online:.2f}x)"
        )

    # Where the difference comes from: the teacher's forward vs reading + decoding its cached targets.
    x, _ = next(iter(val_batches(shards, input_size=32, batch_size=batch, split="train")))
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(5):
            teacher.forward_intermediates(x)
    fwd = (time.perf_counter() - t) / 5
    plain, stream = (
        train_batches(shards, input_size=32, batch_size=batch, augment=False, seed=1),
        cached_batches(cache, batch_size=batch, seed=1, input_size=32),
    )
    per = []
    for it in (plain, stream):
        next(it)
        t = time.perf_counter()
        for _ in range(5):
            next(it)
        per.append((time.perf_counter() - t) / 5)
    print(
        f"per batch: teacher forward_intermediates {1000 * fwd:.0f} ms; "
        f"reading a batch of images {1000 * per[0]:.0f} ms, "
        f"of images + cached targets {1000 * per[1]:.0f} ms"
    )
    shutil.rmtree(cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="training images (synthetic shapes)")
    ap.add_argument("--steps", type=int, default=30, help="timed calibration steps per variant")
    ap.add_argument("--n-cal", type=int, default=1000, help="calibration images in the feature cache")
    ap.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0], help="MobileNetV1 widths to time")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is fastest when the data path, not the math, is the cost)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="zipper-bench-"))
    try:
        t = time.perf_counter()
        src = {"source": "synthetic", "name": "shapes", "n_train": args.n, "n_val": 64, "seed": 0}
        write_shards(src, "shapes", root / "shards", maxcount=500)
        print(f"shards written in {time.perf_counter() - t:.1f} s (incl. generating {args.n + 64} images)")
        t = time.perf_counter()
        write_folder(root / "folder", "shapes", args.n, seed=0)
        print(f"image folder written in {time.perf_counter() - t:.1f} s")
        bench_read(root / "shards", root / "folder", args.n, args.batch)
        src = dict(src, n_train=args.n_cal)
        write_shards(src, "shapes", root / "cal", maxcount=500)
        for width in args.widths:
            bench_calibration(root / "cal", root / "cache", args.steps, args.batch, width)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
