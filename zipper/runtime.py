"""Where and how the stages compute: device, precision, memory format, loader workers, threads and
data-parallel processes (`torch.distributed`).

`RuntimeConfig` is params.yaml's `runtime` section; `Runtime` is that section resolved in one
process (a concrete device, an autocast dtype, this process's rank). Library functions take a
`Runtime` and default to `CPU`, today's single-process fp32 behaviour. Checkpoints never hold
device tensors: `cpu_state` is what every writer saves.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, TypeVar

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto: cuda if available, else mps, else cpu
    precision: str = "auto"  # autocast dtype; auto: bf16 on GPUs that support it, else fp32
    channels_last: bool = True  # NHWC memory format (faster convolutions on recent GPUs)
    num_workers: int = 0  # data-loader worker processes per training process
    threads: int = 0  # torch intra-op threads per process (0: torch's default, all cores)
    nproc_per_node: int = 1  # > 1: teachers and zip launch themselves under torchrun (data parallel)

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"runtime.device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"runtime.precision: expected one of {PRECISIONS}, got {self.precision!r}")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """A concrete device for `runtime.device`; one GPU per process under torchrun (cuda:LOCAL_RANK)."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"runtime.device: {name!r} requested but torch sees no CUDA device")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("runtime.device: 'mps' requested but torch.backends.mps is not available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32)."""
    if name == "auto":
        bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_gpu else None
    return DTYPES[name]


@dataclass(frozen=True)
class Runtime:
    """A resolved runtime in one process."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    channels_last: bool = False
    num_workers: int = 0
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_config(cls, cfg: RuntimeConfig) -> "Runtime":
        rank, world = distributed_rank_world()
        device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
        return cls(device, resolve_precision(cfg.precision, device), cfg.channels_last, cfg.num_workers, rank, world)

    @property
    def is_main(self) -> bool:
        """Only this process writes files (rank 0)."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (bf16 and fp32 need none: the scaler is then a pass-through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def module(self, model: ModuleT) -> ModuleT:
        """`model` on this device, in this memory format (in place, returned for chaining)."""
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        return model.to(self.device, memory_format=fmt)  # type: ignore[call-overload]  # torch's stub omits it

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and self.channels_last:
            return t.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return t.to(self.device, non_blocking=True)

    def batch(self, batch: Any) -> Any:
        """Move every tensor of a (nested) batch to the device."""
        if isinstance(batch, torch.Tensor):
            return self.tensor(batch)
        if isinstance(batch, Mapping):
            return {k: self.batch(v) for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.batch(v) for v in batch)
        return batch

    def describe(self) -> str:
        where = f"{self.device}" + (f", rank {self.rank}/{self.world_size}" if self.world_size > 1 else "")
        return f"{where}, {self.precision}" + (", channels_last" if self.channels_last else "")


CPU = Runtime()


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` as contiguous CPU tensors: what checkpoints hold, loadable anywhere."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (0 leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def per_task_threads(stage: str, params: Any, threads: int | None = None) -> dict[str, int]:
    """Tasks -> torch threads each, when a per-task stage (data, teachers) runs one process per task,
    side by side: on a CPU with threads for more than one (a small net trains far better on one core
    each than on several cores one after the other; generating images is single-threaded anyway).
    Empty when the stage runs its tasks in one process. `zipper <stage>` and the Prefect flow both
    split the threads so, so that both train the same teachers."""
    total = (params.runtime.threads if threads is None else threads) or torch.get_num_threads()  # 0: torch's default
    tasks = [t for t in params.tasks if stage != "teachers" or t not in params.teachers.checkpoints]
    on_cpu = stage == "data" or resolve_device(params.runtime.device).type == "cpu"
    if len(tasks) < 2 or total < 2 or params.runtime.nproc_per_node > 1 or launched_by_torchrun() or not on_cpu:
        return {}
    return {t: max(1, total // len(tasks)) for t in tasks}


# ------------------------------------------------------------------------- torch.distributed


def distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def distributed(cfg: RuntimeConfig) -> Iterator[None]:
    """Join the process group torchrun set up (nccl on CUDA, gloo elsewhere) for the block."""
    if not launched_by_torchrun():
        yield
        return
    device = resolve_device(cfg.device, int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
