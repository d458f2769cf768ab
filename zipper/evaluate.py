"""Accuracy: top-1 of a model over batches, and per task of a multi-task net (each task on its own
batches). Size, compute and speed live in `zipper.profiling`, runtime memory in `zipper.memory`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .runtime import CPU, Runtime


@torch.no_grad()
def accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    runtime: Runtime = CPU,
) -> float:
    """Top-1 accuracy in [0, 1] of `predict(x) -> logits` over (x, y) batches, computed on `runtime`'s
    device (where `predict`'s model must be)."""
    correct = total = 0
    for x, y in batches:
        x, y = runtime.batch((x, y))
        with runtime.autocast():
            correct += (predict(x).argmax(1) == y).sum().item()
        total += len(y)
    if total == 0:
        raise ValueError("accuracy over an empty set of batches")
    return correct / total


# ---------------------------------------------------------------- per-task accuracy


def evaluate_zipper(
    net: nn.Module,
    val_batches_by_task: Mapping[str, Iterable[tuple[torch.Tensor, torch.Tensor]]],
    runtime: Runtime = CPU,
) -> dict[str, float]:
    """Per-task top-1 of a multi-task net (`net(x) -> {task: logits}`), each task on its own batches."""
    tasks = _task_names(net)
    unknown = [t for t in val_batches_by_task if tasks is not None and t not in tasks]
    if unknown:
        raise KeyError(f"no task {unknown[0]!r} in this network; it has {tasks}")
    # Only the asked task's branch runs when the net can do that (ZipperNet.forward_tasks).
    only = getattr(net, "forward_tasks", None)

    def logits(task: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: only(x, [task])[task] if only else net(x)[task]

    with eval_mode(net):
        return {task: accuracy(logits(task), batches, runtime) for task, batches in val_batches_by_task.items()}


def _task_names(net: nn.Module) -> list[str] | None:
    spec = getattr(net, "spec", None)
    if spec is not None and hasattr(spec, "task_names"):
        return list(spec.task_names)
    branches = getattr(net, "branches", None)
    return list(branches) if isinstance(branches, nn.ModuleDict) else None


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside the block (BN must not update its statistics), the old modes after."""
    modes = [{m: m.training for m in mod.modules()} for mod in modules]
    for mod in modules:
        mod.eval()
    try:
        yield
    finally:
        for saved in modes:
            for m, training in saved.items():
                m.training = training
