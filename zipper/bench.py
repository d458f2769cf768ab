"""`zipper bench table1`: our size, compute, speed and memory columns beside the paper's Table 1.

MobileNetV1-1.0 at 224 px, two teachers with 1000 and 50 classes, zipped at depths 0..13 under
both scopes. Random weights (sizes and speed do not depend on training), with BN statistics
estimated on random images so activations keep a trained network's scale (see `trained_like_bn`).
Every number comes from `zipper.profiling.profile`, the function the pipeline's evaluate stage calls.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence, TextIO

import torch
from tqdm import tqdm

from .io import write_json, write_text
from .memory import describe_zipper
from .merge import zip_models
from .merge.bn import reset_bn_stats
from .models import build_model
from .profiling import memory_ratio, profile, teacher_stats

log = logging.getLogger(__name__)

# The paper (He et al., Merging MobileNets for multitask), Table 1 "Merge performance on
# different tasks, and the compression and speedup ratio of different merged layers":
# merged layers k -> (Comp., Speedup, Runtime memory usage Comp.). MobileNetV1, ImageNet (1000
# classes) + DeepFashion (50). Its authors merged weights only up to layer 10, so its Comp. stays
# at 1.258 for k = 11..13; ours keeps growing there.
PAPER_TABLE1: dict[int, tuple[float, float, float]] = {
    0: (1.000, 1.00, 1.00),
    1: (1.000, 1.08, 1.09),
    2: (1.002, 1.13, 1.14),
    3: (1.004, 1.21, 1.19),
    4: (1.009, 1.24, 1.23),
    5: (1.020, 1.30, 1.27),
    6: (1.042, 1.33, 1.28),
    7: (1.089, 1.37, 1.30),
    8: (1.140, 1.42, 1.32),
    9: (1.196, 1.48, 1.34),
    10: (1.258, 1.53, 1.37),
    11: (1.258, 1.53, 1.39),
    12: (1.258, 1.53, 1.40),
    13: (1.258, 1.53, 1.41),
}
PAPER_SETUP = dict(arch="mobilenet_v1", width=1.0, input_size=224, classes=(1000, 50))
# One thread by default: on a small shared machine two OpenMP threads that compete with other
# processes make a batch-1 forward 10x slower and the timings meaningless; one thread is stable.
DEFAULT_THREADS = 1


def table1(
    repeats: int = 20,
    json_path: str | None = None,
    threads: int | None = None,
    depths: Iterable[int] = range(14),
    scopes: Sequence[str] = ("block", "pointwise"),
    *,
    arch: str = "mobilenet_v1",
    width: float = 1.0,
    input_size: int = 224,
    classes: Sequence[int] = (1000, 50),
    batch: int = 1,
    warmup: int = 3,
    memory: bool = True,
    memory_workers: int = 2,
    out: TextIO | None = None,
    markdown_path: str | None = None,
    command: str = "zipper bench table1",
) -> list[dict[str, Any]]:
    """Profile the zipped teachers at every depth and scope; print the table, optionally write JSON rows
    and a markdown page (the table and `command`, which made it).

    Batch 1 by default: one image through both tasks, the deployment case (the paper does not
    state its batch). `threads=None` means `DEFAULT_THREADS`.
    Timing runs first, one configuration at a time; the memory probes (one fresh
    process each, not timing-sensitive) run afterwards, `memory_workers` at a time. The keyword
    arguments after `scopes` exist for quick runs (tests); the paper columns are filled only for
    the paper's setup.
    """
    out = out or sys.stdout
    threads = DEFAULT_THREADS if threads is None else threads
    depths = list(depths)
    torch.manual_seed(0)
    teachers = {f"task{i}_{n}": build_model(arch, n, width=width, input_size=input_size) for i, n in enumerate(classes)}
    for teacher in teachers.values():
        trained_like_bn(teacher, input_size)
    num_blocks = next(iter(teachers.values())).num_blocks
    bad = [d for d in depths if not 0 <= d <= num_blocks]
    if bad:
        raise ValueError(f"depth {bad[0]} out of range 0..{num_blocks} for {arch}")
    paper = dict(arch=arch, width=width, input_size=input_size, classes=tuple(classes)) == PAPER_SETUP

    log.info(
        "teachers: %s width %s, %d px, classes %s; batch %d, %d thread(s), %d repeats",
        arch,
        width,
        input_size,
        list(classes),
        batch,
        threads,
        repeats,
    )
    side = teacher_stats(teachers, input_size=input_size, batch=batch, threads=threads, memory=memory)
    rows, descs = [], []
    configs = [(scope, d) for scope in scopes for d in depths]
    for scope, depth in tqdm(configs, desc="table1 timing", unit="net", file=sys.stderr):
        net = zip_models(teachers, depth, scope=scope)
        trained_like_bn(net, input_size)  # as the pipeline does after merging
        row = profile(
            net,
            teachers,
            input_size=input_size,
            batch=batch,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            memory=False,
            teachers_side=side,
        )
        comp, speedup, mem = PAPER_TABLE1.get(depth, (None, None, None)) if paper else (None, None, None)
        row.update(arch=arch, width=width, paper_comp=comp, paper_speedup=speedup, paper_memory=mem)
        log.debug("depth %d %s: speedup %.3f", depth, scope, row["speedup"])
        rows.append(row)
        descs.append(describe_zipper(net))
        del net
    if memory:
        with ThreadPoolExecutor(max(1, memory_workers)) as pool:
            jobs = [
                pool.submit(memory_ratio, d, side["teacher_peak_bytes"], batch=batch, threads=threads) for d in descs
            ]
            for row, job in zip(rows, tqdm(jobs, desc="table1 memory", unit="net", file=sys.stderr)):
                row.update(job.result())
    else:
        for row in rows:
            row.update(peak_bytes=None, model_bytes=None, memory_comp=None)

    checks = check_table1(rows) + [
        f"{line} [CPU-time clock]" for line in check_table1(rows, "speedup_cpu") if "speedup" in line
    ]
    text = "\n".join([format_table1(rows, threads=threads, batch=batch, repeats=repeats), *checks])
    print(text, file=out)
    if markdown_path:
        write_text(
            markdown_path,
            f"# Table 1: the paper's columns beside ours\n\nMade by `{command}`.\n\n```text\n{text}\n```\n",
        )
    if json_path:
        write_json(json_path, rows)
        log.info("wrote %d rows to %s", len(rows), json_path)
    return rows


def trained_like_bn(model: torch.nn.Module, input_size: int, batch: int = 4) -> None:
    """BN statistics estimated on random images, then eval mode.

    Why: freshly initialised BN (mean 0, var 1) in eval mode lets activations shrink layer by
    layer (the fan-out init gives each depthwise conv a gain of ~1/16 in variance) until they
    reach float32's denormal range, where CPU arithmetic is many times slower: timings would
    then measure the random values, not the network. Estimated statistics keep activations at
    a trained network's scale.
    """
    x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    reset_bn_stats(model, [x])
    model.eval()


def format_table1(rows: Sequence[dict[str, Any]], *, threads: int, batch: int, repeats: int) -> str:
    """Our columns beside the paper's, one block per scope."""

    def f(v: float | None, nd: int = 3) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"Table 1 ({rows[0]['arch'] if rows else '?'}, {rows[0]['input_size'] if rows else '?'} px): "
        f"teachers / zipper; torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cpu(s), "
        f"load {load:.1f}, {threads} thread(s), batch {batch}, median of {repeats} interleaved runs",
        "comp_conv: conv weights only, shared once (the paper's Comp.); params: all parameters; macs: "
        "flop counter; speedup: median of paired wall-clock ratios [q1-q3], cpu: ratio of medians in CPU time; "
        "memory: measured peak RSS of one forward, fresh process each",
        "paper: Comp. stays 1.258 for k = 11..13 (its authors merged weights up to layer 10 only); ours keeps growing.",
    ]
    header = (
        f"{'depth':>5} {'scope':<9} | {'comp_conv':>9} {'paper':>6} | {'params':>6} | {'macs':>6} | "
        f"{'speedup':>7} {'[q1-q3]':>11} {'cpu':>5} {'paper':>5} | {'ms teach':>8} {'ms zip':>7} | "
        f"{'memory':>6} {'paper':>5}"
    )
    for scope in dict.fromkeys(r["scope"] for r in rows):
        lines += ["", header, "-" * len(header)]
        for r in (r for r in rows if r["scope"] == scope):
            spread = f"[{f(r['speedup_q1'], 2)}-{f(r['speedup_q3'], 2)}]"
            lines.append(
                f"{r['depth']:>5} {scope:<9} | {f(r['comp_conv']):>9} {f(r['paper_comp']):>6} | "
                f"{f(r['comp_params']):>6} | {f(r['macs_ratio']):>6} | {f(r['speedup']):>7} {spread:>11} "
                f"{f(r.get('speedup_cpu'), 2):>5} {f(r['paper_speedup'], 2):>5} | "
                f"{r['latency_teachers_ms']:>8.2f} {r['latency_zipper_ms']:>7.2f} | "
                f"{f(r.get('memory_comp')):>6} {f(r['paper_memory'], 2):>5}"
            )
    return "\n".join(lines)


def check_table1(rows: Sequence[dict[str, Any]], speedup: str = "speedup") -> list[str]:
    """Table 1's checks as printable lines (the conv-weight column equals the paper's, the speedup grows
    with depth), judged on the `speedup` column (wall clock; "speedup_cpu" for CPU time). Checks that
    need the paper's columns are left out without them."""
    lines: list[str] = []
    point = {r["depth"]: r for r in rows if r["scope"] == "pointwise" and r["paper_comp"] is not None}
    block = sorted((r for r in rows if r["scope"] == "block" and r.get(speedup) is not None), key=lambda r: r["depth"])
    ref = [d for d in point if d <= 10]
    if ref:
        off = [d for d in ref if round(point[d]["comp_conv"], 3) != point[d]["paper_comp"]]
        lines.append(
            f"check comp_conv (pointwise) = paper Comp. at depths {min(ref)}..{max(ref)}: "
            + ("yes" if not off else f"NO at depths {off}")
        )
    if len(block) > 1:
        drops = [(a["depth"], b["depth"]) for a, b in zip(block, block[1:]) if b[speedup] < a[speedup]]
        lines.append(
            "check block speedup grows with depth: "
            + ("yes" if not drops else "NO, drops at " + ", ".join(f"{a}->{b}" for a, b in drops))
        )
    if block:
        last = block[-1]
        rel = last[speedup] / last["macs_ratio"] - 1
        lines.append(
            f"check block speedup at depth {last['depth']} within 10% of MACs ratio: "
            f"{last[speedup]:.3f} vs {last['macs_ratio']:.3f} ({rel:+.1%}): " + ("yes" if abs(rel) <= 0.10 else "NO")
        )
    with_paper = [r for r in block if r["paper_speedup"] is not None]
    if with_paper:
        below = [
            f"{r['depth']} ({r[speedup]:.3f} < {r['paper_speedup']:.2f})"
            for r in with_paper
            if r[speedup] < r["paper_speedup"]
        ]
        note = " (depth 0 is the teachers themselves: 1 +- noise)" if below and below[0].startswith("0 ") else ""
        lines.append(
            "check block speedup >= paper Speedup at every depth: "
            + ("yes" if not below else "NO at depths " + ", ".join(below))
            + note
        )
    return lines
