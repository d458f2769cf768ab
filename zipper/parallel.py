"""Data-parallel training over torch.distributed processes (torchrun): DDP, every BatchNorm synchronised.

Each process holds `batch_size / world_size` rows of every global batch. With the BatchNorms
computing their statistics over all processes' rows, and DDP averaging the gradients of the
per-process mean losses, a step equals the one-process step on the global batch (up to float
summation order), running statistics included. torch's own SyncBatchNorm only runs on GPUs;
this one runs wherever the process group does (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .runtime import Runtime


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: every process's input reaches every output, so the
    gradient of an input is the sum of the outputs' gradients over processes."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the rows of every process (same parameters and
    buffers as BatchNorm2d, so a module is switched by class and back without touching its state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics under autocast
        count = torch.tensor([x.numel() / x.size(1)], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = count.item()
        # Two passes (mean, then squared deviations), as a single-process BN computes them.
        mean = _AllReduceSum.apply(xf.sum(dims)) / n
        centred = xf - mean[None, :, None, None]
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        self._update_running_stats(mean.detach(), var.detach(), n)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        count, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if count is None or running_mean is None or running_var is None:  # track_running_stats=False
            return
        count.add_(1)
        factor = 1.0 / count.item() if self.momentum is None else self.momentum
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        unbiased = var * (n / max(1.0, n - 1))
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


@contextmanager
def synced_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside the block, every BatchNorm2d of `model` synchronises its statistics across processes."""
    bns = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    for m in bns:
        m.__class__ = SyncedBatchNorm2d
    try:
        yield
    finally:
        for m in bns:
            m.__class__ = nn.BatchNorm2d


class _Method(nn.Module):
    """DDP wraps a module's forward; this forwards to another method (e.g. `forward_per_task`)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


@contextmanager
def data_parallel(model: nn.Module, runtime: Runtime, method: str = "forward") -> Iterator[Callable]:
    """Yield the function to train `model` with: `model.<method>` in one process; under several
    processes the same method through DDP (gradients averaged), with synchronised BatchNorms."""
    if runtime.world_size == 1:
        yield getattr(model, method)
        return
    with synced_batchnorm(model):
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # Buffers need no broadcast: synchronised BatchNorms keep them equal on every process.
        yield nn.parallel.DistributedDataParallel(_Method(model, method), device_ids=ids, broadcast_buffers=False)


def mean_over_processes(values: list[float], runtime: Runtime) -> list[float]:
    """The mean over processes of per-process values (the global-batch value of a per-process mean)."""
    if runtime.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return (t / runtime.world_size).tolist()
