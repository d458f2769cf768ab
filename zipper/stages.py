"""The pipeline's stage functions. DVC (`zipper <stage>`) and Prefect (zipper/flows/) both call these.

Each stage reads its inputs and writes its outputs at the paths of a `Layout` (zipper/graph.py declares
which), atomically, and records in every checkpoint what made it (its params section hashes and its
inputs' sha256).
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from . import locks
from .config import Params
from .graph import Layout
from .io import sha256_file, write_json, write_text
from .runtime import CPU, Runtime

if TYPE_CHECKING:
    import torch

    from .calibrate import ProgressCallback

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- data
def run_data(params: Params, layout: Layout, tasks: list[str] | None = None) -> None:
    """Shard each task's source into WebDataset tars + manifest."""
    from .data import write_shards
    from .data.sources import at_input_size

    for task in tasks or params.tasks:
        source = at_input_size(params.data.tasks[task], params.teachers.input_size)
        write_shards(
            source, task, layout.shards(task), maxcount=params.data.maxcount, on_bad_sample=params.data.on_bad_sample
        )


# ------------------------------------------------------------------------------------- teachers
NEAR_CHANCE = 1.5  # a teacher below this many times chance accuracy learnt (next to) nothing


def run_teachers(params: Params, layout: Layout, tasks: list[str] | None = None) -> dict[str, float]:
    """Train (or import) one teacher per task; writes checkpoints and their val accuracies."""
    from .data import read_manifest, val_batches
    from .evaluate import accuracy
    from .teachers import import_teacher, save_teacher, train_teacher

    cfg = params.teachers
    runtime = Runtime.from_config(params.runtime)
    accs = {}
    for task in tasks or params.tasks:
        manifest = read_manifest(layout.shards(task))
        classes = manifest["classes"]
        if task in cfg.checkpoints:
            model = import_teacher(
                cfg.checkpoints[task],
                arch=cfg.arch,
                num_classes=len(classes),
                width=cfg.width,
                input_size=cfg.input_size,
            )
            acc = accuracy(
                runtime.module(model),
                val_batches(layout.shards(task), input_size=cfg.input_size, batch_size=256, world_size=1),
                runtime,
            )
            model.cpu()
            origin = {
                "imported_from": str(cfg.checkpoints[task]),
                "imported_sha256": sha256_file(cfg.checkpoints[task]),
            }
        else:
            with locks.computing(layout.root):
                model, acc = train_teacher(
                    layout.shards(task),
                    arch=cfg.arch,
                    width=cfg.width,
                    input_size=cfg.input_size,
                    steps=cfg.steps,
                    batch_size=cfg.batch_size,
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                    momentum=cfg.momentum,
                    seed=cfg.seed + params.tasks.index(task),
                    augment=cfg.augment,
                    label_smoothing=cfg.label_smoothing,
                    runtime=runtime,
                    skip=held_out_split(params),
                )
            origin = {}
        accs[task] = acc
        if not runtime.is_main:
            continue
        save_teacher(
            model,
            layout.teacher(task),
            task=task,
            classes=classes,
            val_acc=acc,
            provenance={
                "params.teachers": params.section_hash("teachers"),
                "data.holdout": params.data.holdout,
                "shards_manifest_sha256": sha256_file(layout.shards(task) / "manifest.json"),
                **origin,
            },
        )
        log.info("teacher %s: val accuracy %.2f%%", task, 100 * acc)
        if acc < NEAR_CHANCE / len(classes):  # e.g. a learning rate too high for the arch: nothing to zip
            log.warning(
                "teacher %s: val accuracy %.2f%% is near chance (%d classes): its training failed; try a "
                "lower teachers.lr",
                task,
                100 * acc,
                len(classes),
            )
    if runtime.is_main:
        _update_json(layout.teacher_metrics, {t: {"val_acc": a} for t, a in accs.items()})
    return accs


def _update_json(path: Path, entries: Mapping[str, Any]) -> None:
    """Merge entries into a JSON object file; locked, since per-task stages run in parallel under Prefect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(path.read_text()) if path.exists() else {}
        write_json(path, {**current, **entries})


def load_teachers(params: Params, layout: Layout) -> dict[str, Any]:
    from .teachers import load_teacher

    return {t: load_teacher(layout.teacher(t))[0] for t in params.tasks}


# ------------------------------------------------------------------------------------- features
ONLINE = "ONLINE"  # the note a features output holds instead of a cache (disabled, or over budget)


def run_features(params: Params, layout: Layout, tasks: list[str] | None = None) -> None:
    """Cache each teacher's calibration targets (logits + pointwise taps) next to its images."""
    from .data.features import OverBudget, write_feature_cache
    from .teachers import load_teacher

    runtime = Runtime.from_config(params.runtime)
    for task in tasks or params.tasks:
        out = layout.features(task)
        if not params.features.enabled:
            _features_online(out, "features.enabled is false")
            continue
        teacher, _ = load_teacher(layout.teacher(task))
        try:
            with locks.computing(layout.root):
                write_feature_cache(
                    teacher,
                    layout.shards(task),
                    out,
                    input_size=params.teachers.input_size,
                    batch_size=params.features.batch_size,
                    budget_mb=params.features.budget_mb,
                    teacher_sha256=sha256_file(layout.teacher(task)),
                    runtime=runtime,
                )
        except OverBudget as e:  # at scale the cache is far larger than the data: step aside, do not fail
            log.warning("%s: calibration computes teacher targets online", e)
            _features_online(out, str(e))


def _features_online(out: Path, reason: str) -> None:
    """Leave a note instead of a cache; an earlier cache there must not be picked up again."""
    from .data.features import MANIFEST

    if (out / MANIFEST).exists() or (out / ONLINE).exists():
        shutil.rmtree(out)
    write_text(out / ONLINE, f"{reason}: calibration computes teacher targets online\n")


def calibration_streams(
    params: Params, layout: Layout, seed: int, runtime: Runtime = CPU
) -> tuple[dict[str, Iterator], str]:
    """Per task: cached targets when a matching cache exists, else online (augmented) batches;
    this process's rows of every global batch, the held-out split left out."""
    from .data import train_batches
    from .data.features import cache_matches, cached_batches

    size = params.teachers.input_size
    loader = dict(
        batch_size=params.calibrate.batch_size,
        seed=seed,
        num_workers=runtime.num_workers,
        rank=runtime.rank,
        world_size=runtime.world_size,
        pin_memory=runtime.pin_memory,
        skip=held_out_split(params),
    )
    cached = params.features.enabled and all(
        cache_matches(layout.features(t), sha256_file(layout.teacher(t)), shard_dir=layout.shards(t), input_size=size)
        for t in params.tasks
    )
    if cached:
        return {t: cached_batches(layout.features(t), input_size=size, **loader) for t in params.tasks}, "cache"
    return {
        t: train_batches(layout.shards(t), input_size=size, augment=params.teachers.augment, **loader)
        for t in params.tasks
    }, "online"


def alignment_batches(params: Params, layout: Layout, seed: int, runtime: Runtime = CPU) -> Iterator[torch.Tensor]:
    """`zipper.align_batches` calibration batches of every task for init "activations", task by task, each
    drawn when it is consumed: none is held longer than its forward pass."""
    # Whole global batches on every process: each must find the same permutations.
    whole = replace(runtime, rank=0, world_size=1, num_workers=0)
    streams, _ = calibration_streams(params, layout, seed=seed, runtime=whole)
    return (next(streams[t])[0] for t in params.tasks for _ in range(params.zipper.align_batches))


def held_out_split(params: Params) -> Any:
    """Which train samples no stage trains on (`data.holdout`; None: none), so that calibration can stop on
    them (`calibrate.until`) as on unseen data."""
    from .data.holdout import HeldOut

    return HeldOut(params.data.holdout) if params.data.holdout else None


def held_out_drop(
    params: Params, layout: Layout, teachers: Mapping[str, Any], runtime: Runtime
) -> tuple[Any, dict[str, list[str]]]:
    """(net -> per-task drop in points against the teachers on the held-out split, the split's keys per task)."""
    from .data.holdout import holdout_batches
    from .evaluate import accuracy, evaluate_zipper

    split, size, until = held_out_split(params), params.teachers.input_size, params.calibrate.until
    if until is None:
        raise ValueError("held-out checks need calibrate.until")
    batches, keys = {}, {}
    for t in params.tasks:
        batches[t], keys[t] = holdout_batches(
            layout.shards(t), split, input_size=size, batch_size=params.evaluate.batch_size, limit=until.holdout_samples
        )
    teacher_acc = {t: accuracy(runtime.module(teachers[t]).eval(), batches[t], runtime) for t in params.tasks}

    def drop(net: Any) -> dict[str, float]:
        acc = evaluate_zipper(net, batches, runtime)
        return {t: 100 * (teacher_acc[t] - acc[t]) for t in params.tasks}

    return drop, keys


# ------------------------------------------------------------------------------------------ zip
def run_zip(params: Params, layout: Layout, depth: int, on_progress: ProgressCallback | None = None) -> None:
    """Depth 0: the teachers side by side. Depth k: merge block k into the calibrated depth k-1, calibrate
    (`on_progress` follows its steps: `zipper.calibrate.calibrate`)."""
    from .calibrate import calibrate, steps_to_recover
    from .merge import deepen, side_by_side
    from .merge import load as load_zipper

    teachers = load_teachers(params, layout)
    runtime = Runtime.from_config(params.runtime)
    provenance = {
        "params.zipper": params.section_hash("zipper"),
        **{f"teacher.{t}.sha256": sha256_file(layout.teacher(t)) for t in params.tasks},
    }
    if depth == 0:
        if not runtime.is_main:
            return
        side_by_side(teachers, params.zipper.scope).save(layout.zipped(0), **provenance)
        write_json(layout.curves(0), {"depth": 0, "targets": None, "loss": [], "ce": [], "distill": [], "lr": []})
        return
    prev_path = layout.zipped(depth - 1)
    prev = load_zipper(prev_path)
    if prev.spec.scope != params.zipper.scope:
        raise ValueError(
            f"{prev_path}: made with scope {prev.spec.scope!r} but zipper.scope is "
            f"{params.zipper.scope!r}; rerun from depth 0"
        )
    seed = params.calibrate.seed + depth
    if params.zipper.init == "average":
        net = deepen(prev, depth)
    else:
        from .merge.align import deepen_aligned

        batches = alignment_batches(params, layout, seed, runtime)
        net = deepen_aligned(runtime.module(prev), depth, params.zipper.init, batches=batches).cpu()
    streams, targets = calibration_streams(params, layout, seed=seed, runtime=runtime)
    log.info(
        "depth %d: merged from %s (init %s), calibrating with %s teacher targets on %s",
        depth,
        prev_path.name,
        params.zipper.init,
        targets,
        runtime.describe(),
    )
    # What else decides the result: a partial checkpoint made from other inputs must not be resumed.
    provenance["init"] = params.zipper.init  # evaluate reports it from here, not from params that may have moved on
    resume_key = {
        **provenance,
        "prev_sha256": sha256_file(prev_path),
        "targets": targets,
        "augment": params.teachers.augment,
        **{f"shards.{t}.sha256": sha256_file(layout.shards(t) / "manifest.json") for t in params.tasks},
    }
    with locks.computing(layout.root):
        check, holdout = held_out_drop(params, layout, teachers, runtime) if params.calibrate.until else (None, None)
        curves = calibrate(
            net,
            teachers,
            streams,
            params.calibrate,
            partial_path=layout.partial(depth),
            runtime=runtime,
            resume_key=resume_key,
            on_progress=on_progress,
            held_out_drop=check,
        )
    if not runtime.is_main:
        return
    net.save(
        layout.zipped(depth),
        **provenance,
        **{"params.calibrate": params.section_hash("calibrate")},
        prev_sha256=sha256_file(prev_path),
        targets=targets,
        **({"holdout_keys": holdout} if holdout else {}),
    )
    write_json(
        layout.curves(depth),
        {"depth": depth, "targets": targets, **curves, "steps_to_recover": steps_to_recover(curves["checks"])},
    )


# ------------------------------------------------------------------------------------- evaluate
def run_evaluate(params: Params, layout: Layout, depth: int) -> dict[str, Any]:
    """Per-task accuracy and drop against the teachers, plus size, MACs, speedup and memory ratios."""
    import torch

    from .data import val_batches
    from .evaluate import evaluate_zipper
    from .memory import start_memory_probes
    from .merge import load as load_zipper
    from .profiling import profile, teacher_stats, throughput

    cfg = params.evaluate
    if cfg.memory:
        start_memory_probes()
    net = load_zipper(layout.zipped(depth)).eval()
    teachers = load_teachers(params, layout)
    runtime = Runtime.from_config(params.runtime)
    val = {
        t: val_batches(
            layout.shards(t),
            input_size=params.teachers.input_size,
            batch_size=cfg.batch_size,
            num_workers=runtime.num_workers,
            pin_memory=runtime.pin_memory,
        )
        for t in params.tasks
    }
    with locks.computing(layout.root):
        acc = evaluate_zipper(runtime.module(net), val, runtime)
    # Timed as loaded, as the teachers are: a memory format on one side only would count in the speedup.
    net.cpu().to(memory_format=torch.contiguous_format)
    teacher_acc = {t: v["val_acc"] for t, v in json.loads(layout.teacher_metrics.read_text()).items() if t in acc}
    drop = {t: 100 * (teacher_acc[t] - acc[t]) for t in acc}
    with locks.measuring(layout.root):  # timings taken beside other work would say more about that work
        # CPU batch-1 latency is the deployment measure; on an accelerator, serving throughput beside it.
        gpu = throughput(net, teachers, runtime, batch=cfg.batch_size) if runtime.device.type != "cpu" else {}
        # The teachers' sizes and memory are measured once, at depth 0; every depth reads them from there.
        side = (
            teacher_stats(teachers, threads=cfg.threads, memory=cfg.memory)
            if depth == 0
            else json.loads(layout.metrics(0).read_text())["teachers_side"]
        )
        prof = profile(
            net, teachers, repeats=cfg.latency_repeats, threads=cfg.threads, memory=cfg.memory, teachers_side=side
        )
    curves = json.loads(layout.curves(depth).read_text())
    row = {
        "depth": depth,
        "scope": net.spec.scope,
        "init": net.provenance.get("init"),
        "targets": curves["targets"],
        "acc": acc,
        "teacher_acc": teacher_acc,
        "drop_pp": drop,
        "max_drop_pp": max(drop.values()),
        "final_loss": curves["loss"][-1] if curves["loss"] else None,
        "steps": len(curves["loss"]),
        "steps_to_recover": curves.get("steps_to_recover"),
        **{
            k: prof[k]
            for k in (
                "params",
                "conv_weights",
                "macs",
                "comp_params",
                "comp_conv",
                "macs_ratio",
                "speedup",
                "latency_teachers_ms",
                "latency_zipper_ms",
            )
        },
        "memory_comp": prof.get("memory_comp"),
        **gpu,
        **({"teachers_side": side} if depth == 0 else {}),
    }
    write_json(layout.metrics(depth), row)
    log.info(
        "depth %d: acc %s, max drop %.2f pp, speedup %.2fx",
        depth,
        {t: f"{100 * a:.1f}%" for t, a in acc.items()},
        row["max_drop_pp"],
        row["speedup"],
    )
    return row


def collect_metrics(params: Params, layout: Layout) -> list[dict[str, Any]]:
    depths = [0, *params.zipper.depths]
    missing = [layout.metrics(d) for d in depths if not layout.metrics(d).exists()]
    if missing:
        raise FileNotFoundError(f"no metrics for this depth yet: {missing[0]} (run its evaluate stage)")
    return [json.loads(layout.metrics(d).read_text()) for d in depths]


# --------------------------------------------------------------------------------------- report
def run_report(params: Params, layout: Layout) -> str:
    from .report import write_report

    return write_report(collect_metrics(params, layout), layout.reports, tasks=params.tasks)


def run_register(params: Params, layout: Layout) -> dict[str, Any]:
    from .tracking import log_pipeline

    summary = log_pipeline(params, layout, collect_metrics(params, layout))
    write_json(layout.mlflow_runs, summary)
    return summary
