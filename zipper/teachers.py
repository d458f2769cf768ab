"""Teachers: train one per task from its shards, or import a user's checkpoint; save / load them.

A teacher file is one `torch.save`d dict (format "zipper.Teacher/1"): arch, num_classes, width,
input_size, task, classes, val_acc, provenance and the state_dict, loadable with weights_only=True.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import read_manifest, train_batches, val_batches
from .evaluate import accuracy
from .guard import check_loss
from .io import load_torch, save_torch
from .models import Backbone, build_model, torchvision_key
from .parallel import data_parallel, mean_over_processes
from .runtime import CPU, Runtime, cpu_state

log = logging.getLogger(__name__)

FORMAT = "zipper.Teacher/1"
WARMUP_FRACTION = 0.05  # linear warm-up share of the steps before the cosine decay
LOSS_CHECK_EVERY = 10  # steps between divergence checks (each reads the loss back from the device)


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up for WARMUP_FRACTION of `steps`, then cosine decay to 0."""
    warm = max(1, round(steps * WARMUP_FRACTION))
    if step < warm:
        return lr * (step + 1) / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train_teacher(
    shard_dir: str | os.PathLike,
    *,
    arch: str,
    width: float,
    input_size: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    seed: int = 0,
    augment: bool = True,
    label_smoothing: float = 0.0,
    runtime: Runtime = CPU,
    on_step: Callable[[int, Backbone], None] | None = None,
    skip: Callable[[str], bool] | None = None,
) -> tuple[Backbone, float]:
    """Train `arch` from scratch on the shards' train split (SGD + Nesterov, warm-up + cosine LR) on
    `runtime`'s device and precision; data-parallel under torch.distributed (`batch_size` is global).
    `on_step(steps_done, model)` runs after every step (as `calibrate`'s does); `skip(key)` leaves a
    train sample out (the held-out split).

    Returns the model (eval mode, on the CPU) and its top-1 accuracy on the val split.
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"teacher training needs steps >= 1, batch_size >= 1, lr > 0 (got {steps}, {batch_size}, {lr})"
        )
    manifest = read_manifest(shard_dir)
    torch.manual_seed(seed)
    model = runtime.module(build_model(arch, len(manifest["classes"]), width=width, input_size=input_size))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():  # no weight decay on BN and biases (standard for small nets)
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
        nesterov=momentum > 0,
    )
    scaler = runtime.grad_scaler()
    batches = train_batches(
        shard_dir,
        input_size=input_size,
        batch_size=batch_size,
        augment=augment,
        seed=seed,
        num_workers=runtime.num_workers,
        rank=runtime.rank,
        world_size=runtime.world_size,
        pin_memory=runtime.pin_memory,
        skip=skip,
    )
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(steps),
        desc=f"teacher {manifest['task']}",
        unit="step",
        mininterval=5,
        disable=None if runtime.is_main else True,
    )
    first = math.nan  # the first step's loss: the divergence check's reference
    with data_parallel(model, runtime) as forward:
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            x, y = runtime.batch(next(batches))
            with runtime.autocast():
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if step % LOSS_CHECK_EVERY == 0 or step == steps - 1:
                value = mean_over_processes([loss.item()], runtime)[0]  # every process stops together
                first = value if step == 0 else first
                check_loss(
                    value,
                    first,
                    where=f"teacher {manifest['task']}, step {step}",
                    hint="lower teachers.lr (or add teachers.steps for a longer warm-up)",
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{value:.3f}")
            if on_step is not None:
                on_step(step + 1, model)
    model.eval()
    val = val_batches(
        shard_dir,
        input_size=input_size,
        batch_size=max(batch_size, 128),
        world_size=1,
        num_workers=runtime.num_workers,
        pin_memory=runtime.pin_memory,
    )
    acc = accuracy(model, val, runtime)
    log.info(
        "teacher %s: %d steps in %.0f s on %s, val accuracy %.2f%%",
        manifest["task"],
        steps,
        time.perf_counter() - t0,
        runtime.describe(),
        100 * acc,
    )
    return model.cpu(), acc


def save_teacher(
    model: Backbone,
    path: str | os.PathLike,
    *,
    task: str,
    classes: list[str],
    val_acc: float,
    provenance: Mapping[str, Any],
) -> None:
    """Write the teacher as one atomic file (format "zipper.Teacher/1")."""
    if len(classes) != model.num_classes:
        raise ValueError(f"teacher {task!r}: {len(classes)} class names for a model with {model.num_classes} classes")
    save_torch(
        {
            "format": FORMAT,
            "arch": model.arch,
            "num_classes": model.num_classes,
            "width": float(model.width),
            "input_size": int(model.input_size),
            "task": task,
            "classes": list(classes),
            "val_acc": float(val_acc),
            "provenance": dict(provenance),
            "state_dict": cpu_state(model),
        },
        path,
    )


def load_teacher(path: str | os.PathLike) -> tuple[Backbone, dict[str, Any]]:
    """Load a teacher file: (model in eval mode, metadata without the state_dict)."""
    obj = load_torch(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (use import_teacher for other checkpoints)")
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    model = build_model(meta["arch"], meta["num_classes"], width=meta["width"], input_size=meta["input_size"])
    _load_checked(model, obj["state_dict"], str(path))
    return model.eval(), meta


def import_teacher(path: str | os.PathLike, *, arch: str, num_classes: int, width: float, input_size: int) -> Backbone:
    """Load a user's checkpoint into `arch`: our state_dict, a torchvision-style state_dict of that arch,
    a dict holding one under "state_dict" / "model", or a zipper teacher file.

    Missing or unexpected keys and shape mismatches raise ValueError naming the layer (and the class
    counts when the classifier is at fault).
    """
    obj = load_torch(path)
    state = _find_state_dict(obj, str(path))
    model = build_model(arch, num_classes, width=width, input_size=input_size)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP / DataParallel wrappers
    if any(k.startswith(("features.", "classifier.")) for k in state):
        try:
            state = {torchvision_key(arch, k, model.num_blocks): v for k, v in state.items()}
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: torchvision-style keys that do not fit {arch}: {e}") from e
    _load_checked(model, state, str(path))
    return model.eval()


def _find_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return _find_state_dict(obj[key], where)
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise ValueError(
        f"{where}: no state_dict found (expected a state_dict, or a dict with 'state_dict' or 'model'; "
        "save a model with torch.save(model.state_dict(), path))"
    )


def classifier_name(model: nn.Module) -> str:
    """Name of the last Linear layer (the classifier)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else ""


def _load_checked(model: Backbone, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    head = classifier_name(model)
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(
            f"{where}: layer {missing[0].rsplit('.', 1)[0]!r} missing from the checkpoint "
            f"({len(missing)} keys missing, e.g. {missing[0]!r}; is it a {model.arch} checkpoint?)"
        )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ValueError(
            f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} keys) for {model.arch} width {model.width}"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            layer = k.rsplit(".", 1)[0]
            if layer == head:
                got = state[k].shape[0]
                raise ValueError(
                    f"{where}: classifier {layer!r} has {got} classes, the task has {model.num_classes} "
                    f"(shape {tuple(state[k].shape)} vs {tuple(v.shape)})"
                )
            raise ValueError(
                f"{where}: layer {layer!r} shape {tuple(state[k].shape)} does not match {model.arch} "
                f"width {model.width} ({tuple(v.shape)}) in {k!r}"
            )
    model.load_state_dict(state, strict=True)
