"""Measuring a model: per-task accuracy, size (parameters, the paper's conv-weight count), MACs,
latency against the teachers (interleaved, in-process) and peak runtime memory (child processes).
"""
from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing as mp
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .runtime import CPU, Runtime


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             runtime: Runtime = CPU) -> float:
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

def evaluate_zipper(net: nn.Module, val_batches_by_task: Mapping[str, Iterable[tuple[torch.Tensor, torch.Tensor]]],
                    runtime: Runtime = CPU) -> dict[str, float]:
    """Per-task top-1 of a multi-task net (`net(x) -> {task: logits}`), each task on its own batches."""
    tasks = _task_names(net)
    unknown = [t for t in val_batches_by_task if tasks is not None and t not in tasks]
    if unknown:
        raise KeyError(f"no task {unknown[0]!r} in this network; it has {tasks}")
    # Only the asked task's branch runs when the net can do that (ZipperNet.forward_tasks).
    only = getattr(net, "forward_tasks", None)
    with _eval_mode(net):
        return {task: accuracy((lambda x, t=task: only(x, [t])[t]) if only else (lambda x, t=task: net(x)[t]), batches,
                               runtime)
                for task, batches in val_batches_by_task.items()}


def _task_names(net: nn.Module) -> list[str] | None:
    spec = getattr(net, "spec", None)
    if spec is not None and hasattr(spec, "task_names"):
        return list(spec.task_names)
    branches = getattr(net, "branches", None)
    return list(branches) if isinstance(branches, nn.ModuleDict) else None


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
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


# ---------------------------------------------------------------- size and compute

def count_params(model: nn.Module) -> int:
    """All parameters; a parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())  # parameters() already drops duplicates


def count_conv_weights(model: nn.Module) -> int:
    """The paper's accounting (Table 1, Comp.): convolution weights only, shared ones once.

    No BatchNorm, no biases, no classifier (Linear) weights.
    """
    weights = {id(m.weight): m.weight.numel() for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd) and m.weight is not None}
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
        else:
            total += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), _eval_mode(model):
            model(torch.zeros(batch, in_channels, h, w, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total


# ---------------------------------------------------------------- latency

def latency_ratio(baseline_fns: Sequence[Callable[[torch.Tensor], Any]], candidate_fn: Callable[[torch.Tensor], Any],
                  x: torch.Tensor, *, repeats: int = 50, warmup: int = 5, threads: int | None = 1) -> dict[str, Any]:
    """Time the baseline (its functions one after another) against the candidate, interleaved.

    Each repetition times both, in alternating order (ABBA), so drift and a busy machine hit
    both alike; warm-up runs first; a fixed thread count; inference mode; GC off while timing.
    Returns wall-clock medians (`baseline_s`, `candidate_s`), `speedup` = median(baseline) /
    median(candidate), the median and quartiles of the per-repetition ratios (`speedup_paired`,
    `speedup_q1`, `speedup_q3`) as a noise gauge, and the same ratio in process CPU time
    (`speedup_cpu`): on a shared machine preemption inflates wall time but not CPU time (with
    one thread the two agree on an idle machine).
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
    return {"baseline_s": statistics.median(b), "candidate_s": statistics.median(c),
            "speedup": statistics.median(b) / statistics.median(c), "speedup_paired": statistics.median(ratios),
            "speedup_q1": q1, "speedup_q3": q3,
            "baseline_cpu_s": cpu_b, "candidate_cpu_s": cpu_c, "speedup_cpu": cpu_b / cpu_c if cpu_c > 0 else None,
            "repeats": repeats, "warmup": warmup, "threads": threads if threads is not None else old_threads}


# ---------------------------------------------------------------- runtime memory (child processes)

# A model description a fresh process can rebuild (random weights: memory does not depend on values):
#   ("teachers", arch, [classes, ...], width, input_size)  the teachers, run one after the other
#   ("zipper", spec_dict)                                  a ZipperNet (spec_to_dict(net.spec))
ModelDesc = tuple


def describe_teachers(teachers: Mapping[str, nn.Module]) -> ModelDesc:
    """The description of `teachers` (registry Backbones) for `peak_memory`."""
    first = next(iter(teachers.values()), None)
    if first is None:
        raise ValueError("no teachers to describe")
    for t, m in teachers.items():
        missing = [a for a in ("arch", "num_classes", "width", "input_size") if not hasattr(m, a)]
        if missing:
            raise ValueError(f"teacher {t!r} ({type(m).__name__}) is not a zipper Backbone: no {missing[0]!r}")
    return ("teachers", first.arch, [int(m.num_classes) for m in teachers.values()], float(first.width),
            int(first.input_size))


def describe_zipper(net: nn.Module) -> ModelDesc:
    """The description of a ZipperNet for `peak_memory`."""
    from .merge.zipnet import spec_to_dict

    spec = getattr(net, "spec", None)
    if spec is None:
        raise ValueError(f"{type(net).__name__} has no ZipperSpec (`.spec`); cannot rebuild it in a child process")
    return ("zipper", spec_to_dict(spec))


def build_described(desc: Sequence[Any]) -> tuple[list[nn.Module], int]:
    """Rebuild (deterministically, seed 0, eval mode) the modules a description names, and its input size."""
    from .merge import ZipperNet, ZipperSpec
    from .models import build_model

    _described_input_size(desc)
    torch.manual_seed(0)
    kind = desc[0]
    if kind == "teachers":
        _, arch, classes, width, input_size = desc
        return [build_model(arch, int(n), width=width, input_size=input_size).eval() for n in classes], int(input_size)
    spec = ZipperSpec(**desc[1])
    return [ZipperNet(spec).eval()], spec.input_size


def _described_input_size(desc: Sequence[Any]) -> int:
    kind = desc[0] if len(desc) else None
    if kind == "teachers" and len(desc) == 5:
        return int(desc[4])
    if kind == "zipper" and len(desc) == 2 and isinstance(desc[1], Mapping):
        return int(desc[1].get("input_size", 224))
    raise ValueError(f"unknown model description {kind!r}; expected ('teachers', arch, classes, width, input_size) "
                     "or ('zipper', spec_dict)")


def peak_memory(desc: ModelDesc, *, batch: int = 1, threads: int = 1, timeout: float = 300.0) -> int:
    """Measured peak memory (bytes) of one no-grad forward pass of the described model(s),
    weights included, in a fresh child process (see `measure_memory`)."""
    return measure_memory(desc, batch=batch, threads=threads, timeout=timeout)["peak"]


def _probe_context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["zipper.evaluate"])  # import torch once, in the server
    return ctx


def start_memory_probes() -> None:
    """Start the memory probes' fork server now: it spends seconds importing torch, which can overlap
    whatever the caller does before its first `measure_memory`."""
    from multiprocessing import forkserver

    _probe_context()
    forkserver.ensure_running()


def measure_memory(desc: ModelDesc, *, batch: int = 1, threads: int = 1, timeout: float = 300.0) -> dict[str, int]:
    """Measured peak memory (bytes) of one no-grad forward pass, in a fresh child process.

    The child (forked from a multiprocessing fork server that has imported torch and zipper
    and has never built a model) pins glibc's mmap threshold so freed tensors leave the RSS,
    primes torch's kernels, records its resident set (the baseline), builds the described
    model(s), hands freed memory back to the OS, resets the kernel's high-water mark
    (`/proc/self/clear_refs`), runs the forward (the teachers one after the other) and reads
    VmHWM. Returns `peak` = high-water mark - baseline (weights + activations + whatever the
    forward allocates) and `model` = resident bytes the build added. Linux only.
    """
    _described_input_size(desc)  # a bad description fails here, not in the child
    ctx = _probe_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(send, list(desc), int(batch), int(threads)), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise RuntimeError(f"memory probe for {desc[0]!r} gave no answer within {timeout:.0f} s")
        status, payload = receive.recv()
    except EOFError:
        status, payload = "error", "the child process died"
    finally:
        receive.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"memory probe for {desc[0]!r} failed (exit {proc.exitcode}): {payload}")
    return payload


def _memory_child(conn: Any, desc: list, batch: int, threads: int) -> None:
    """Body of the child process of `peak_memory`: sends ("ok", sizes) or ("error", message)."""
    try:
        gc.freeze()  # the server's objects are not ours to collect: keeps gc.collect() fast
        _pin_malloc()
        torch.set_num_threads(threads)
        size = _described_input_size(desc)
        x = torch.randn(batch, 3, size, size)
        _prime_kernels(desc, x)
        _release_memory()
        baseline = _proc_status("VmRSS")
        models, _ = build_described(desc)
        _release_memory()
        model = _proc_status("VmRSS") - baseline
        _reset_high_water_mark()
        with torch.inference_mode():
            outputs = [m(x) for m in models]  # the teachers one after the other; outputs kept, as a caller would
        peak = _proc_status("VmHWM") - baseline
        del outputs
        conn.send(("ok", {"peak": peak, "model": model, "baseline": baseline}))
    except Exception as e:  # reported by the parent, with the child's message
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _pin_malloc() -> None:
    """glibc: fixed mmap threshold (64 KiB) and trim threshold, so big frees go back to the OS at once."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also stops glibc raising it dynamically)
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _prime_kernels(desc: list, x: torch.Tensor) -> None:
    """Build and run a narrow copy of the described model (width 0.25) first, so the code pages
    and one-time state of the kernels a forward uses are resident before the baseline: they are
    the library's memory, not the model's."""
    if desc[0] == "teachers":
        narrow = [*desc[:3], 0.25, *desc[4:]]
    else:
        narrow = [desc[0], {**desc[1], "width": 0.25}]
    models, _ = build_described(narrow)
    with torch.inference_mode():
        for m in models:
            m(x)


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed heap pages back to the OS
    except (OSError, AttributeError):
        pass


def _proc_status(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in bytes."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError as e:
        raise OSError("peak_memory needs Linux /proc/self/status") from e
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def _reset_high_water_mark() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError as e:
        raise OSError("peak_memory needs to reset the peak RSS via /proc/self/clear_refs (Linux >= 4.0)") from e


# ---------------------------------------------------------------- one depth, everything

def teacher_stats(teachers: Mapping[str, nn.Module], *, input_size: int | None = None, batch: int = 1,
                  threads: int = 1, memory: bool = True) -> dict[str, int]:
    """The teachers' side of every ratio (each teacher counted separately), computed once per pipeline."""
    size = input_size or _input_size(next(iter(teachers.values())))
    stats = {"teacher_params": sum(count_params(m) for m in teachers.values()),
             "teacher_conv_weights": sum(count_conv_weights(m) for m in teachers.values()),
             "teacher_macs": sum(count_macs(m, size, batch) for m in teachers.values())}
    if memory:
        mem = measure_memory(describe_teachers(teachers), batch=batch, threads=threads)
        stats.update(teacher_peak_bytes=mem["peak"], teacher_model_bytes=mem["model"])
    return stats


def profile(net: nn.Module, teachers: Mapping[str, nn.Module], *, input_size: int | None = None, batch: int = 1,
            repeats: int = 20, warmup: int = 3, threads: int | None = 1, memory: bool = True,
            teachers_side: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Size, compute, speed and memory of a zipped `net` against its `teachers` run one after the other.

    Ratios are teachers / net (bigger is better): `comp_params` (all parameters), `comp_conv`
    (the paper's Comp.: conv weights only), `macs_ratio`, `speedup` (interleaved medians, see
    `latency_ratio`) and `memory_comp` (measured peak memory of a forward, each side in a fresh
    process; rebuilt from the architecture with random weights, since values do not change sizes).
    `teachers_side`: `teacher_stats(...)` computed once, for a loop over depths; `memory=False`
    skips the child processes.
    """
    size = input_size or _input_size(net)
    side = dict(teachers_side) if teachers_side is not None else teacher_stats(
        teachers, input_size=size, batch=batch, threads=threads or 1, memory=memory)
    spec = getattr(net, "spec", None)
    row: dict[str, Any] = {"depth": getattr(spec, "depth", None), "scope": getattr(spec, "scope", None),
                           "input_size": size, "batch": batch, **side}
    row["params"] = count_params(net)
    row["conv_weights"] = count_conv_weights(net)
    row["macs"] = count_macs(net, size, batch)
    row["comp_params"] = side["teacher_params"] / row["params"]
    row["comp_conv"] = side["teacher_conv_weights"] / row["conv_weights"]
    row["macs_ratio"] = side["teacher_macs"] / row["macs"]

    x = torch.randn(batch, 3, size, size)
    with _eval_mode(net, *teachers.values()):
        lat = latency_ratio(list(teachers.values()), net, x, repeats=repeats, warmup=warmup, threads=threads)
    row.update(latency_teachers_ms=lat["baseline_s"] * 1e3, latency_zipper_ms=lat["candidate_s"] * 1e3,
               speedup=lat["speedup"], speedup_paired=lat["speedup_paired"], speedup_q1=lat["speedup_q1"],
               speedup_q3=lat["speedup_q3"], speedup_cpu=lat["speedup_cpu"], repeats=repeats, threads=lat["threads"])
    if memory:
        if "teacher_peak_bytes" not in side:
            raise ValueError("teachers_side has no teacher_peak_bytes; compute it with teacher_stats(memory=True)")
        row.update(memory_ratio(describe_zipper(net), side["teacher_peak_bytes"], batch=batch, threads=threads or 1))
    return row


@torch.no_grad()
def throughput(net: nn.Module, teachers: Mapping[str, nn.Module], runtime: Runtime, *, batch: int = 256,
               repeats: int = 20, input_size: int | None = None) -> dict[str, float]:
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
    return {"throughput_zipper": zipped, "throughput_teachers": side, "throughput_ratio": zipped / side,
            "throughput_batch": batch, "throughput_device": str(runtime.device), "throughput_precision": runtime.precision}


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
