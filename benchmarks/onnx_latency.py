"""ONNX Runtime against PyTorch: batch-1 CPU latency of the same zipped net, per depth of a project root.

Each depth's checkpoint is exported as `zipper export` does (to a temp dir, checked against PyTorch) and
timed against its PyTorch net on one random image of the net's input size, paired and interleaved (ABBA)
by `zipper.profiling.latency_ratio`, the pipeline's own timing; `ratio` = the median of per-repetition
PyTorch / ORT latencies (above 1: ORT is faster).

    .venv/bin/python benchmarks/onnx_latency.py ROOT [--depths 0,1,...] [--repeats 100] [--threads 1]
        [--out docs/onnx-latency]

ROOT is a project root where the pipeline ran (models/zip/depth_K.pt); all its depths by default.
Writes `<out>.json` (every row and the setup) and `<out>.md` (the table, the command, CPU and versions).
Read-only on ROOT; time on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import onnxruntime
import torch

from zipper import load
from zipper.export import export
from zipper.graph import Layout
from zipper.io import write_json, write_text
from zipper.profiling import count_macs, latency_ratio

log = logging.getLogger("onnx_latency")


def available_depths(layout: Layout) -> list[int]:
    """Depths with a finished checkpoint (a `.partial.pt` beside one is not one)."""
    folder = layout.zipped(0).parent
    stems = (p.stem.removeprefix("depth_") for p in folder.glob("depth_*.pt"))
    return sorted(int(s) for s in stems if s.isdigit() and layout.zipped(int(s)).is_file())


def ort_session(onnx_path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    # Idle pool threads that spin would take the cores from the PyTorch run timed next (measured with 2 threads
    # on 2 cores: PyTorch 4x slower beside a spinning session than beside this one); one thread has no pool.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_fn(session: onnxruntime.InferenceSession) -> Callable[[torch.Tensor], Any]:
    """The session as `latency_ratio` calls a module: `x` in, outputs out (`.numpy()` shares x's memory)."""
    return lambda x: session.run(None, {"images": x.numpy()})


def time_depth(layout: Layout, depth: int, *, repeats: int, warmup: int, threads: int) -> dict[str, Any]:
    net = load(layout.zipped(depth)).eval().to(memory_format=torch.contiguous_format)
    size = net.spec.input_size
    with tempfile.TemporaryDirectory(prefix="onnx_latency.") as tmp:
        exported = export(layout.zipped(depth), Path(tmp) / f"depth_{depth}.onnx")
        session = ort_session(Path(exported["onnx"]), threads)  # holds the graph in memory: the file may go
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(depth))
    lat = latency_ratio([net], ort_fn(session), x, repeats=repeats, warmup=warmup, threads=threads)  # inference mode
    return {
        "depth": depth,
        "net": f"{net.spec.arch} {net.spec.width:g}, {size} px, tasks {', '.join(net.spec.task_names)}",
        "input_size": size,
        "macs": count_macs(net, size),
        "pytorch_ms": lat["baseline_s"] * 1e3,
        "ort_ms": lat["candidate_s"] * 1e3,
        "ratio": lat["speedup"],  # PyTorch / ORT, median of the paired repetitions
        "ratio_q1": lat["speedup_q1"],
        "ratio_q3": lat["speedup_q3"],
        "ratio_cpu": lat["speedup_cpu"],
        "max_abs_diff": max(exported["max_abs_diff"].values()),
        "sha256": exported["sha256"],
    }


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| depth | MMACs | PyTorch (ms) | ORT (ms) | PyTorch / ORT | quartiles | max abs logit diff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['depth']} | {r['macs'] / 1e6:.1f} | {r['pytorch_ms']:.2f} | {r['ort_ms']:.2f} | {r['ratio']:.2f} | "
            f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The docs page: what was measured, how, on what, and the table; a rerun rewrites all of it."""
    return "\n".join(
        [
            "# ONNX Runtime against PyTorch: batch-1 CPU latency per depth",
            "",
            "Each depth's zipped checkpoint is exported to one ONNX graph as `zipper export` does (and kept only",
            "when ONNX Runtime's logits match PyTorch's) and timed against the same net in PyTorch (eval, inference",
            "mode, contiguous memory format) on one random image of the net's input size, on the CPU. The two are",
            "timed in pairs, alternating which goes first (ABBA), by `zipper.profiling.latency_ratio`, the timing",
            "the pipeline's speedups come from: `PyTorch / ORT` is the median of the per-pair latency ratios",
            "(above 1: ONNX Runtime is faster), the quartiles of those ratios gauge the noise; the millisecond",
            "columns are each side's median. ONNX Runtime runs with its default graph optimisations and its",
            "idle threads not spinning (spinning ones would slow the PyTorch run after them).",
            "",
            "Made by (it rewrites this page and the .json beside it; run it on an otherwise idle machine):",
            "",
            f"    {result['command']}",
            "",
            f"- root: `{result['root']}`, depths {', '.join(str(r['depth']) for r in result['rows'])}; "
            f"{result['rows'][0]['net']}",
            f"- CPU: {result['cpu']}; {result['threads']} thread(s) each (torch intra-op; ORT intra- and inter-op)",
            f"- torch {result['torch']}, onnxruntime {result['onnxruntime']}",
            f"- {result['repeats']} paired repetitions after {result['warmup']} warm-up runs of each, batch 1",
            "",
            markdown_table(result["rows"]),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--depths", help="comma list (default: every depth with a checkpoint under ROOT)")
    ap.add_argument("--repeats", type=int, default=100, help="paired repetitions per depth")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs of each side first")
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT threads (one: steady on a shared machine)")
    ap.add_argument("--out", default="docs/onnx-latency", help="output prefix: writes .json and .md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    layout = Layout(Path(args.root))
    found = available_depths(layout)
    depths = [int(d) for d in args.depths.split(",")] if args.depths else found
    if missing := sorted(set(depths) - set(found)):
        ap.error(f"no checkpoint for depth(s) {missing} under {args.root} (found: {found})")
    if not depths:
        ap.error(f"no checkpoints under {layout.zipped(0).parent}")
    torch.set_num_threads(args.threads)  # export's check and the MAC count too, not just the timed runs
    rows = []
    for depth in depths:
        row = time_depth(layout, depth, repeats=args.repeats, warmup=args.warmup, threads=args.threads)
        log.info(
            "depth %d: PyTorch %.2f ms, ORT %.2f ms, ratio %.2f", depth, row["pytorch_ms"], row["ort_ms"], row["ratio"]
        )
        rows.append(row)
    out = Path(args.out)
    result = {
        "command": shlex.join(
            [".venv/bin/python", "benchmarks/onnx_latency.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "root": args.root,  # as given: the page names no machine's paths
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
    }
    write_json(out.with_suffix(".json"), result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
