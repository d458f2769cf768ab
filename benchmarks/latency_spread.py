"""How steady a measured speedup is: one depth of a project timed `--trials` times per repetition count,
as `zipper evaluate` times it (batch 1, one thread, interleaved), and the spread of each estimator.

    .venv/bin/python benchmarks/latency_spread.py ROOT --depth 12 [--trials 6] [--repeats 30,200]

ROOT is a project root where the pipeline ran (models/teachers/, models/zip/). Run it once per process
count you want to compare (the spread across processes is the one a rerun of the pipeline sees).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from zipper import load
from zipper.graph import Layout
from zipper.profiling import latency_ratio
from zipper.teachers import load_teacher

ESTIMATORS = ("speedup", "speedup_medians", "speedup_cpu")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--repeats", default="30,200", help="comma list of repetition counts")
    args = ap.parse_args(argv)
    layout = Layout(Path(args.root))
    net = load(layout.zipped(args.depth)).eval()
    teachers = [load_teacher(layout.teacher(t))[0].eval() for t in net.spec.task_names]
    x = torch.randn(1, 3, net.spec.input_size, net.spec.input_size)
    print("| repetitions | estimator | min | max | spread (%) |\n|---:|---|---:|---:|---:|")
    for repeats in map(int, args.repeats.split(",")):
        rows = [latency_ratio(teachers, net, x, repeats=repeats, warmup=10, threads=1) for _ in range(args.trials)]
        for key in ESTIMATORS:
            values = [r[key] for r in rows]
            print(
                f"| {repeats} | {key} | {min(values):.3f} | {max(values):.3f} | "
                f"{100 * (max(values) / min(values) - 1):.1f} |"
            )


if __name__ == "__main__":
    main()
