"""`zipper bench calibrate`: images/s of the training side on one runtime (device, precision, memory format).

Four modes, each through the pipeline's own code paths over real WebDataset shards written to a
temp dir at the requested input size:

- `teacher`: a `train_teacher` step (augmented batch from `train_batches`, forward, backward, SGD);
- `calibrate_online`: a `calibrate()` step with teacher targets computed online;
- `calibrate_cached`: a `calibrate()` step with targets read from a `write_feature_cache` cache
  (skipped, with the reason printed, when the cache would not fit the temp budget);
- `data`: the data path alone, `train_batches` -> device tensors, for each loader worker count.

A calibration step counts tasks x batch images (every image gets a student forward and backward).
Teachers have random weights with BN statistics estimated on random images (`bench.trained_like_bn`):
speed does not depend on training, but untrained eval-mode BNs would push activations into float32's
slow denormal range. Clocks are read after synchronising the device, and the first `warmup` steps
of every mode are not timed (allocator, kernel selection, worker start-up).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TextIO

import numpy as np
import torch
from PIL import Image

from .bench import trained_like_bn
from .calibrate import CalibrateConfig, calibrate
from .data import cached_batches, read_manifest, synthetic, train_batches, write_feature_cache, write_shards
from .data.features import OverBudget
from .io import write_json
from .merge import ZipperNet, zip_models
from .models import Backbone, build_model
from .runtime import Runtime, RuntimeConfig, set_threads
from .teachers import train_teacher

TASKS = ("shapes", "textures")  # the embedded synthetic tasks, 10 classes each
MODES = ("teacher", "calibrate_online", "calibrate_cached", "data")
DRAW_SIZE = 32  # synthetic images are drawn at this size, then upscaled: drawing at 224 px takes ~0.4 s each
PIXEL_NOISE = 3.0  # sensor-like noise (0..255) after upscaling, so PNGs are as large and slow to decode as photos'
GOAL_CALIBRATE_VS_TEACHER = 0.6
GOAL_DATA_VS_CALIBRATE = 2.0


@dataclass(frozen=True)
class BenchConfig:
    arch: str = "mobilenet_v1"
    width: float = 1.0
    input_size: int = 224
    batch: int = 64  # per task
    depth: int | None = None  # zipped depth being calibrated; None: half the blocks
    steps: int = 10  # timed steps per mode
    warmup: int = 2  # untimed steps first
    data_workers: tuple[int, ...] = field(default_factory=lambda: (0, 2, os.cpu_count() or 1))
    step_workers: int | None = None  # loader workers of the training modes; None: 0 on CPU, else min(8, cpus)
    samples: int | None = None  # train images per task; None: one pass of the timed run, batch x (warmup + steps)
    cache_budget_mb: float = 2048.0  # temp space the feature caches may take
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.steps < 1 or self.warmup < 1:
            raise ValueError("bench calibrate: need batch >= 1, steps >= 1 and warmup >= 1")
        if not self.data_workers or min(self.data_workers) < 0:
            raise ValueError(f"bench calibrate: worker counts must be >= 0, got {self.data_workers}")

    @property
    def num_samples(self) -> int:
        n = self.samples or self.batch * (self.warmup + self.steps)
        return max(n, len(synthetic.TASKS[TASKS[0]]))  # every class in the train split


def parse_workers(text: str) -> tuple[int, ...]:
    """ "0,2,N" -> (0, 2, os.cpu_count()); duplicates dropped, order kept."""
    out = []
    for item in text.split(","):
        item = item.strip()
        n = (os.cpu_count() or 1) if item.upper() == "N" else int(item)
        if n < 0:
            raise ValueError(f"--workers: counts must be >= 0 (or N), got {item!r}")
        out.append(n)
    return tuple(dict.fromkeys(out))


# ------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels: on an accelerator the clock would otherwise time only their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StepClock:
    """`calibrate`'s `on_step` callback (and the teacher loop's): the time after every step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, step: int = 0, net: Any = None) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def seconds_per_step(self, warmup: int) -> float:
        """Mean time of the steps after the first `warmup` (clocked from the end of step `warmup`)."""
        timed = self.times[warmup - 1 :]
        if len(timed) < 2:
            raise ValueError(f"need more than {warmup} clocked steps, got {len(self.times)}")
        return (timed[-1] - timed[0]) / (len(timed) - 1)


def _close(*streams: Iterator) -> None:
    """Stop the streams' loader workers now rather than at garbage collection."""
    for s in streams:
        if hasattr(s, "close"):
            s.close()


# ------------------------------------------------------------------------------------ inputs


def write_image_folder(root: Path, task: str, n_train: int, n_val: int, size: int, seed: int) -> None:
    """`root/{train,val}/<class>/<i>.png`: the synthetic task's images at `size` px."""
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        images, labels = synthetic.generate(task, n, seed=seed * 2 + i, size=min(size, DRAW_SIZE))
        rng = np.random.default_rng([seed, i])
        for j, (img, y) in enumerate(zip(images, labels)):
            pic = Image.fromarray(img)
            if pic.size != (size, size):
                pic = pic.resize((size, size), Image.Resampling.BILINEAR)
                noisy = np.asarray(pic, np.float32) + rng.normal(0, PIXEL_NOISE, (size, size, 3))
                pic = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
            folder = root / split / synthetic.TASKS[task][y]
            folder.mkdir(parents=True, exist_ok=True)
            pic.save(folder / f"{j:06d}.png", compress_level=1)  # re-encoded by write_shards anyway


def write_bench_shards(tmp: Path, cfg: BenchConfig, max_workers: int) -> dict[str, Path]:
    """Per task, shards of `cfg.num_samples` train images at the input size, cut so that every one of
    `max_workers` loader workers gets a shard (a stream gives a worker at most one shard's share)."""
    n = cfg.num_samples
    maxcount = max(1, math.ceil(n / max(1, max_workers)))
    dirs = {}
    for task in TASKS:
        folder = tmp / "images" / task
        write_image_folder(folder, task, n, len(synthetic.TASKS[task]), cfg.input_size, cfg.seed)
        dirs[task] = tmp / "shards" / task
        write_shards({"source": "imagefolder", "root": str(folder)}, task, dirs[task], maxcount=maxcount)
        shutil.rmtree(folder)
    return dirs


def make_teachers(cfg: BenchConfig) -> dict[str, Backbone]:
    torch.manual_seed(cfg.seed)
    teachers = {
        t: build_model(cfg.arch, len(synthetic.TASKS[t]), width=cfg.width, input_size=cfg.input_size) for t in TASKS
    }
    for teacher in teachers.values():
        trained_like_bn(teacher, cfg.input_size)
    return teachers


def cache_bytes_per_sample(teacher: Backbone, shard_dir: Path, input_size: int, runtime: Runtime) -> float:
    """Bytes one cached sample takes: its PNG, fp32 logits and every pointwise tap in fp16."""
    with torch.no_grad():
        x = runtime.tensor(torch.zeros(1, 3, input_size, input_size))
        _, feats = runtime.module(teacher).forward_intermediates(x)
    taps = sum(feats[t].numel() for t in teacher.pointwise_taps())
    info = read_manifest(shard_dir, verify=False)["splits"]["train"]
    png = sum(s["bytes"] for s in info["shards"]) / info["count"]
    return png + 2 * taps + 4 * teacher.num_classes


# ------------------------------------------------------------------------------------- modes


def time_teacher(shard_dir: Path, cfg: BenchConfig, runtime: Runtime, workers: int) -> float:
    """Seconds per `train_teacher` step, timed by its `on_step` callback."""
    clock = StepClock(runtime.device)
    train_teacher(
        shard_dir,
        arch=cfg.arch,
        width=cfg.width,
        input_size=cfg.input_size,
        steps=cfg.warmup + cfg.steps,
        batch_size=cfg.batch,
        lr=0.1,
        seed=cfg.seed,
        runtime=replace(runtime, num_workers=workers),
        on_step=clock,
    )
    return clock.seconds_per_step(cfg.warmup)


def time_calibration(
    net: ZipperNet,
    teachers: Mapping[str, Backbone],
    streams: Mapping[str, Iterator],
    cfg: BenchConfig,
    runtime: Runtime,
) -> float:
    """Seconds per `calibrate()` step of (a copy of) `net`, timed by its `on_step` callback."""
    net = copy.deepcopy(net)  # every mode calibrates the same start
    recipe = CalibrateConfig(
        steps=cfg.warmup + cfg.steps, batch_size=cfg.batch, bn_reset_batches=0, checkpoint_every=10**9, seed=cfg.seed
    )
    clock = StepClock(runtime.device)
    try:
        calibrate(net, teachers, streams, recipe, runtime=runtime, on_step=clock)
    finally:
        _close(*streams.values())
    return clock.seconds_per_step(cfg.warmup)


def time_data(shard_dir: Path, cfg: BenchConfig, runtime: Runtime, workers: int) -> tuple[float, int]:
    """(seconds per batch, batches timed) of `train_batches` -> device tensors with `workers` loader workers."""
    stream = train_batches(
        shard_dir,
        input_size=cfg.input_size,
        batch_size=cfg.batch,
        augment=True,
        seed=cfg.seed,
        num_workers=workers,
        pin_memory=runtime.pin_memory,
    )
    timed = max(20, cfg.steps, 4 * workers)  # a batch is cheap: time enough of them to see every worker deliver
    clock = StepClock(runtime.device)
    try:
        for _ in range(cfg.warmup + workers + timed):  # + workers: every worker has started and delivered once
            runtime.batch(next(stream))
            clock()
    finally:
        _close(stream)
    return clock.seconds_per_step(cfg.warmup + workers), timed


def write_caches(
    teachers: Mapping[str, Backbone],
    shards: Mapping[str, Path],
    tmp: Path,
    cfg: BenchConfig,
    runtime: Runtime,
    per_sample: float,
) -> dict[str, Path] | str:
    """Feature caches of every task, or the reason they are skipped (over the temp budget)."""
    need_mb = per_sample * cfg.num_samples * len(shards) / 2**20
    budget_mb = min(cfg.cache_budget_mb, shutil.disk_usage(tmp).free / 2**20 / 2)
    if need_mb > budget_mb:
        return (
            f"feature caches would take {need_mb:.0f} MiB ({per_sample / 1024:.0f} KiB/sample x "
            f"{cfg.num_samples} samples x {len(shards)} tasks), over the temp budget of {budget_mb:.0f} MiB "
            "(--cache-budget-mb, half the free disk at most)"
        )
    out = {}
    with contextlib.redirect_stdout(sys.stderr):  # the cache's size line is progress, not a result
        for task, teacher in teachers.items():
            out[task] = tmp / "features" / task
            try:
                write_feature_cache(
                    teacher,
                    shards[task],
                    out[task],
                    input_size=cfg.input_size,
                    batch_size=cfg.batch,
                    budget_mb=budget_mb,
                    teacher_sha256="bench",
                    runtime=runtime,
                )
            except OverBudget as e:
                return str(e)
    return out


# ------------------------------------------------------------------------------------- driver


def run(
    cfg: BenchConfig,
    runtime_cfg: RuntimeConfig = RuntimeConfig(),
    *,
    threads: int = 0,
    json_path: str | os.PathLike | None = None,
    tmp_dir: str | None = None,
    out: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Time every mode; print the table and the two ratios, optionally write the rows as JSON."""
    set_threads(threads)
    bench = _Bench(cfg, Runtime.from_config(runtime_cfg))
    with tempfile.TemporaryDirectory(prefix="zipper-bench-calibrate-", dir=tmp_dir) as tmp:
        bench.shards = write_bench_shards(Path(tmp), cfg, max(*cfg.data_workers, bench.step_workers))
        bench.teacher()
        bench.calibrate_online()
        bench.calibrate_cached(Path(tmp))
        for workers in cfg.data_workers:
            bench.data(workers)
    _add_ratios(bench.rows)
    print(format_table(bench.rows, cfg, bench.depth), file=out or sys.stdout)
    if json_path:
        write_json(json_path, bench.rows)
    return bench.rows


class _Bench:
    """One run's shared state (runtime, teachers, the zipped start, shards) and its rows, one method per mode."""

    def __init__(self, cfg: BenchConfig, runtime: Runtime) -> None:
        self.cfg, self.runtime = cfg, runtime
        self.rows: list[dict[str, Any]] = []
        # A GPU outruns one process decoding PNGs; a CPU needs its cores for the step.
        self.step_workers: int = (
            cfg.step_workers
            if cfg.step_workers is not None
            else 0
            if runtime.device.type == "cpu"
            else min(8, os.cpu_count() or 1)
        )
        self.teachers = make_teachers(cfg)
        blocks = next(iter(self.teachers.values())).num_blocks
        self.depth = blocks // 2 if cfg.depth is None else cfg.depth
        self.net = zip_models(self.teachers, self.depth, scope="block")  # zipped before anything moves to the device
        self.shards: dict[str, Path] = {}
        self.common = dict(
            device=str(runtime.device),
            precision=runtime.precision,
            channels_last=runtime.channels_last,
            arch=cfg.arch,
            width=cfg.width,
            input_size=cfg.input_size,
            batch=cfg.batch,
            threads=torch.get_num_threads(),
        )

    def add(self, mode: str, workers: int, seconds: float | None, images: int, **extra: Any) -> None:
        rate = images / seconds if seconds else None
        self.rows.append(
            {
                "mode": mode,
                "images_per_s": rate,
                "workers": workers,
                **self.common,
                "seconds_per_step": seconds,
                "images_per_step": images,
                **extra,
            }
        )

    @property
    def first(self) -> Path:
        return self.shards[TASKS[0]]

    def loader(self) -> dict[str, Any]:
        """Stream arguments of the training modes."""
        return dict(
            batch_size=self.cfg.batch,
            seed=self.cfg.seed,
            input_size=self.cfg.input_size,
            num_workers=self.step_workers,
            pin_memory=self.runtime.pin_memory,
        )

    def teacher(self) -> None:
        seconds = time_teacher(self.first, self.cfg, self.runtime, self.step_workers)
        self.add("teacher", self.step_workers, seconds, self.cfg.batch, timed_steps=self.cfg.steps)

    def calibrate_online(self) -> None:
        streams = {t: train_batches(d, augment=True, **self.loader()) for t, d in self.shards.items()}
        seconds = time_calibration(self.net, self.teachers, streams, self.cfg, self.runtime)
        self.add("calibrate_online", self.step_workers, seconds, len(TASKS) * self.cfg.batch, **self._calib())

    def calibrate_cached(self, tmp: Path) -> None:
        per_sample = cache_bytes_per_sample(self.teachers[TASKS[0]], self.first, self.cfg.input_size, self.runtime)
        extra = dict(self._calib(), cache_kib_per_sample=per_sample / 1024, cache_samples=self.cfg.num_samples)
        caches = write_caches(self.teachers, self.shards, tmp, self.cfg, self.runtime, per_sample)
        if isinstance(caches, str):
            self.add("calibrate_cached", self.step_workers, None, len(TASKS) * self.cfg.batch, skipped=caches, **extra)
            return
        streams = {t: cached_batches(d, **self.loader()) for t, d in caches.items()}
        seconds = time_calibration(self.net, self.teachers, streams, self.cfg, self.runtime)
        self.add("calibrate_cached", self.step_workers, seconds, len(TASKS) * self.cfg.batch, **extra)

    def data(self, workers: int) -> None:
        seconds, timed = time_data(self.first, self.cfg, self.runtime, workers)
        self.add("data", workers, seconds, self.cfg.batch, timed_steps=timed)

    def _calib(self) -> dict[str, Any]:
        return dict(depth=self.depth, tasks=len(TASKS), timed_steps=self.cfg.steps)


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """On each calibration row: its images/s over the teacher's, and the best data path's over its own."""
    rate = {r["mode"]: r["images_per_s"] for r in rows if r["mode"] != "data"}
    best = max((r for r in rows if r["mode"] == "data"), key=lambda r: r["images_per_s"])
    for r in rows:
        if r["mode"].startswith("calibrate") and r["images_per_s"]:
            r["vs_teacher"] = r["images_per_s"] / rate["teacher"]
            r["data_vs_calibrate"] = best["images_per_s"] / r["images_per_s"]
            r["data_best_workers"] = best["workers"]


def format_table(rows: Sequence[dict[str, Any]], cfg: BenchConfig, depth: int) -> str:
    """The rows as a table, then the two ratios against their goals."""
    r0 = rows[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"bench calibrate: {cfg.arch} width {cfg.width:g}, {cfg.input_size} px, batch {cfg.batch} per task, "
        f"{len(TASKS)} tasks, calibrating depth {depth} (block scope)",
        f"{r0['device']}, {r0['precision']}, channels_last {'on' if r0['channels_last'] else 'off'}; "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cpu(s), {r0['threads']} torch "
        f"thread(s), load {load:.1f}; {cfg.steps} timed steps after {cfg.warmup} warm-up",
        "",
        f"{'mode':<17} {'workers':>7} {'images/s':>10} {'ms/step':>9} {'images/step':>11}  note",
        "-" * 72,
    ]
    for r in rows:
        rate = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        ms = "-" if r["seconds_per_step"] is None else f"{1000 * r['seconds_per_step']:.1f}"
        note = r.get("skipped") and f"skipped: {r['skipped']}"
        if not note and "cache_kib_per_sample" in r:
            note = f"cache {r['cache_kib_per_sample']:.1f} KiB/sample x {r['cache_samples']} samples per task"
        lines.append(f"{r['mode']:<17} {r['workers']:>7} {rate:>10} {ms:>9} {r['images_per_step']:>11}  {note or ''}")
    lines.append("")
    for r in rows:
        if "vs_teacher" not in r:
            continue
        lines.append(
            f"{r['mode']} / teacher images/s: {r['vs_teacher']:.2f} "
            f"(goal >= {GOAL_CALIBRATE_VS_TEACHER}: {_met(r['vs_teacher'], GOAL_CALIBRATE_VS_TEACHER)})"
        )
        lines.append(
            f"data ({r['data_best_workers']} workers) / {r['mode']} images/s: {r['data_vs_calibrate']:.2f} "
            f"(goal >= {GOAL_DATA_VS_CALIBRATE:g}: {_met(r['data_vs_calibrate'], GOAL_DATA_VS_CALIBRATE)})"
        )
    return "\n".join(lines)


def _met(value: float, goal: float) -> str:
    return "met" if value >= goal else "NOT met"
