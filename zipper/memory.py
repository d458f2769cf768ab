"""Peak runtime memory of a model's forward pass, measured in a fresh child process (Linux).

A child forked from a fork server that has imported torch and never built a model rebuilds the model
from a description (its architecture; random weights: memory does not depend on values), so nothing
the measuring process holds is counted. glibc's `mallopt` pins the allocator's thresholds so freed
tensors leave the resident set.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .models import Backbone

# A model description a fresh process can rebuild (random weights: memory does not depend on values):
#   ("teachers", arch, [classes, ...], width, input_size)  the teachers, run one after the other
#   ("zipper", spec_dict)                                  a ZipperNet (spec_to_dict(net.spec))
ModelDesc = tuple


def describe_teachers(teachers: Mapping[str, nn.Module]) -> ModelDesc:
    """The description of `teachers` (registry Backbones) for `peak_memory`."""
    for t, m in teachers.items():
        if not isinstance(m, Backbone):
            raise ValueError(f"teacher {t!r} ({type(m).__name__}) is not a zipper Backbone")
    backbones = [m for m in teachers.values() if isinstance(m, Backbone)]
    if not backbones:
        raise ValueError("no teachers to describe")
    first = backbones[0]
    return ("teachers", first.arch, [m.num_classes for m in backbones], first.width, first.input_size)


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
    raise ValueError(
        f"unknown model description {kind!r}; expected ('teachers', arch, classes, width, input_size) "
        "or ('zipper', spec_dict)"
    )


def peak_memory(desc: ModelDesc, *, batch: int = 1, threads: int = 1, timeout: float = 300.0) -> int:
    """Measured peak memory (bytes) of one no-grad forward pass of the described model(s),
    weights included, in a fresh child process (see `measure_memory`)."""
    return measure_memory(desc, batch=batch, threads=threads, timeout=timeout)["peak"]


def _probe_context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["zipper.memory"])  # import torch once, in the server
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
