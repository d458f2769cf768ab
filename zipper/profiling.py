"""Size, compute and speed of a zipped net against its teachers: parameters, the paper's conv-weight
count, MACs, latency (interleaved, in-process) and, through `zipper.memory`, peak runtime memory.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .evaluate import eval_mode
from .memory import ModelDesc, describe_teachers, describe_zipper, measure_memory
from .runtime import Runtime

# ---------------------------------------------------------------- size and compute


def count_params(model: nn.Module) -> int:
    """All parameters; a parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())  # parameters() already drops duplicates


def count_conv_weights(model: nn.Module) -> int:
    """The paper's accounting (Table 1, Comp.): convolution weights only, shared ones once.

    No BatchNorm, no biases, no classifier (Linear) weights.
    """
    weights = {
        id(m.weight): m.weight.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight is not None
    }
    return sum(weights.values())


def count_macs(model: nn.Module, input_size: int | tuple[int, int], batch: int = 1, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass: every convolution and linear layer call (not BN,
    activations or pooling), from its output shape.

    One no-grad pass in eval mode where the model lives (meta tensors work: shapes only); its weights,
    buffers and mode are left as they were. torch's FlopCounterMode counts the same (flops / 2; a test
    checks), but it and meta-device kernels take seconds to load.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    total = 0

    def count(module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            total += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    handles = [
        m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(batch, in_channels, h, w, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


# ---------------------------------------------------------------- latency


def latency_ratio(
    baseline_fns: Sequence[Callable[[torch.Tensor], Any]],
    candidate_fn: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Time the baseline (its functions one after another) against the candidate, interleaved.

    Each repetition times both, in alternating order (ABBA), so drift and a busy machine hit
    both alike; warm-up runs first; a fixed thread count; inference mode; GC off while timing.
    Returns wall-clock medians (`baseline_s`, `candidate_s`), `speedup` = the median of the
    per-repetition ratios baseline / candidate (each pair timed back to back: the steadiest estimate
    across runs, docs/robustness.md), their quartiles (`speedup_q1`, `speedup_q3`) as a noise gauge,
    the ratio of the medians (`speedup_medians`), and that ratio in process CPU time (`speedup_cpu`):
    on a shared machine preemption inflates wall time but not CPU time (with one thread the two
    agree on an idle machine).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")

    def baseline() -> None:
        for fn in baseline_fns:
            fn(x)

    def candidate() -> None:
        candidate_fn(x)

    old_threads, gc_was_on = torch.get_num_threads(), gc.isenabled()
    if threads is not None:
        torch.set_num_threads(threads)
    wall: dict[str, list[float]] = {"baseline": [], "candidate": []}
    cpu: dict[str, list[float]] = {"baseline": [], "candidate": []}
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                baseline()
                candidate()
            gc.disable()  # a collection inside a timed run would land on one side only
            for i in range(repeats):
                order = (("baseline", baseline), ("candidate", candidate))
                for name, fn in order if i % 2 == 0 else order[::-1]:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
    finally:
        if gc_was_on:
            gc.enable()
        torch.set_num_threads(old_threads)
    b, c = wall["baseline"], wall["candidate"]
    ratios = sorted(bi / ci for bi, ci in zip(b, c))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    cpu_b, cpu_c = statistics.median(cpu["baseline"]), statistics.median(cpu["candidate"])
    return {
        "baseline_s": statistics.median(b),
        "candidate_s": statistics.median(c),
        "speedup": statistics.median(ratios),
        "speedup_medians": statistics.median(b) / statistics.median(c),
        "speedup_q1": q1,
        "speedup_q3": q3,
        "baseline_cpu_s": cpu_b,
        "candidate_cpu_s": cpu_c,
        "speedup_cpu": cpu_b / cpu_c if cpu_c > 0 else None,
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads if threads is not None else old_threads,
    }


# ---------------------------------------------------------------- one depth, everything


def teacher_stats(
    teachers: Mapping[str, nn.Module],
    *,
    input_size: int | None = None,
    batch: int = 1,
    threads: int = 1,
    memory: bool = True,
) -> dict[str, int]:
    """The teachers' side of every ratio (each teacher counted separately), computed once per pipeline."""
    size = input_size or _input_size(next(iter(teachers.values())))
    stats = {
        "teacher_params": sum(count_params(m) for m in teachers.values()),
        "teacher_conv_weights": sum(count_conv_weights(m) for m in teachers.values()),
        "teacher_macs": sum(count_macs(m, size, batch) for m in teachers.values()),
    }
    if memory:
        mem = measure_memory(describe_teachers(teachers), batch=batch, threads=threads)
        stats.update(teacher_peak_bytes=mem["peak"], teacher_model_bytes=mem["model"])
    return stats


def profile(
    net: nn.Module,
    teachers: Mapping[str, nn.Module],
    *,
    input_size: int | None = None,
    batch: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = 1,
    memory: bool = True,
    teachers_side: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Size, compute, speed and memory of a zipped `net` against its `teachers` run one after the other.

    Ratios are teachers / net (bigger is better): `comp_params` (all parameters), `comp_conv`
    (the paper's Comp.: conv weights only), `macs_ratio`, `speedup` (interleaved medians, see
    `latency_ratio`) and `memory_comp` (measured peak memory of a forward, each side in a fresh
    process; rebuilt from the architecture with random weights, since values do not change sizes).
    `teachers_side`: `teacher_stats(...)` computed once, for a loop over depths; `memory=False`
    skips the child processes.
    """
    size = input_size or _input_size(net)
    side = (
        dict(teachers_side)
        if teachers_side is not None
        else teacher_stats(teachers, input_size=size, batch=batch, threads=threads or 1, memory=memory)
    )
    spec = getattr(net, "spec", None)
    row: dict[str, Any] = {
        "depth": getattr(spec, "depth", None),
        "scope": getattr(spec, "scope", None),
        "input_size": size,
        "batch": batch,
        **side,
    }
    row["params"] = count_params(net)
    row["conv_weights"] = count_conv_weights(net)
    row["macs"] = count_macs(net, size, batch)
    row["comp_params"] = side["teacher_params"] / row["params"]
    row["comp_conv"] = side["teacher_conv_weights"] / row["conv_weights"]
    row["macs_ratio"] = side["teacher_macs"] / row["macs"]

    x = torch.randn(batch, 3, size, size)
    with eval_mode(net, *teachers.values()):
        lat = latency_ratio(list(teachers.values()), net, x, repeats=repeats, warmup=warmup, threads=threads)
    row.update(
        latency_teachers_ms=lat["baseline_s"] * 1e3,
        latency_zipper_ms=lat["candidate_s"] * 1e3,
        speedup=lat["speedup"],
        speedup_medians=lat["speedup_medians"],
        speedup_q1=lat["speedup_q1"],
        speedup_q3=lat["speedup_q3"],
        speedup_cpu=lat["speedup_cpu"],
        repeats=repeats,
        threads=lat["threads"],
    )
    if memory:
        if "teacher_peak_bytes" not in side:
            raise ValueError("teachers_side has no teacher_peak_bytes; compute it with teacher_stats(memory=True)")
        row.update(memory_ratio(describe_zipper(net), side["teacher_peak_bytes"], batch=batch, threads=threads or 1))
    return row


@torch.no_grad()
def throughput(
    net: nn.Module,
    teachers: Mapping[str, nn.Module],
    runtime: Runtime,
    *,
    batch: int = 256,
    repeats: int = 20,
    input_size: int | None = None,
) -> dict[str, float | str]:
    """Images/s of `net` and of the teachers one after the other on an accelerator, at a batch
    that fills it (the serving case; CPU latency at batch 1 stays the deployment measure)."""
    size = input_size or _input_size(net)
    x = runtime.tensor(torch.randn(batch, 3, size, size))
    models = [runtime.module(m).eval() for m in (net, *teachers.values())]

    def per_second(fns: list[nn.Module]) -> float:
        with runtime.autocast():
            for _ in range(3):  # warm-up: kernel selection, allocator
                [f(x) for f in fns]
            _synchronize(runtime)
            t0 = time.perf_counter()
            for _ in range(repeats):
                [f(x) for f in fns]
            _synchronize(runtime)
        return batch * repeats / (time.perf_counter() - t0)

    zipped, side = per_second(models[:1]), per_second(models[1:])
    for m in models:
        m.cpu()
    return {
        "throughput_zipper": zipped,
        "throughput_teachers": side,
        "throughput_ratio": zipped / side,
        "throughput_batch": batch,
        "throughput_device": str(runtime.device),
        "throughput_precision": runtime.precision,
    }


def _synchronize(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    elif runtime.device.type == "mps":
        torch.mps.synchronize()


def memory_ratio(desc: ModelDesc, teacher_peak_bytes: int, *, batch: int = 1, threads: int = 1) -> dict[str, float]:
    """`measure_memory` of a described ZipperNet and `memory_comp` = teachers' peak / its peak."""
    mem = measure_memory(desc, batch=batch, threads=threads)
    return {"peak_bytes": mem["peak"], "model_bytes": mem["model"], "memory_comp": teacher_peak_bytes / mem["peak"]}


def _input_size(model: nn.Module) -> int:
    spec = getattr(model, "spec", None)
    size = getattr(spec, "input_size", None) or getattr(model, "input_size", None)
    if size is None:
        raise ValueError(f"{type(model).__name__} does not record its input size; pass input_size=")
    return int(size)
