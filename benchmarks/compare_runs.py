"""Compare the accuracies of two pipeline runs (two project roots, or a root and a git revision).

Prints a markdown table, per depth and task, of each run's val accuracy (%) from metrics/depth_<k>.json
and their difference, then the largest difference; exits 1 when it exceeds `--tolerance` points.
With `--speedups`, also each depth's measured speedup in both runs (timings: not part of the exit code).

    .venv/bin/python benchmarks/compare_runs.py ROOT_A ROOT_B [--names A,B] [--tolerance 1.0]

A root is a folder holding metrics/ (a clone where `make demo` ran); `git:REV` reads the metrics
committed at REV of this repository instead (e.g. `git:HEAD`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_rows(source: str) -> dict[int, dict]:
    """{depth: metrics row} of a root folder or of `git:REV`."""
    if source.startswith("git:"):
        rev = source[4:]
        names = subprocess.run(
            ["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:metrics"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        texts = [
            subprocess.run(
                ["git", "-C", str(REPO), "show", f"{rev}:metrics/{n}"], capture_output=True, text=True, check=True
            ).stdout
            for n in names
            if n.startswith("depth_")
        ]
    else:
        texts = [p.read_text() for p in Path(source, "metrics").glob("depth_*.json")]
    rows = [json.loads(t) for t in texts]
    if not rows:
        raise SystemExit(f"{source}: no metrics/depth_<k>.json")
    return {r["depth"]: r for r in rows}


def table(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str]) -> tuple[str, float]:
    depths = sorted(set(a) & set(b))
    tasks = list(a[depths[0]]["acc"])
    head = ["depth"] + [f"{t}, {n}" for t in tasks for n in names] + [f"{t} diff" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    worst = 0.0
    for d in depths:
        accs = {t: (100 * a[d]["acc"][t], 100 * b[d]["acc"][t]) for t in tasks}
        diffs = [accs[t][0] - accs[t][1] for t in tasks]
        worst = max(worst, *map(abs, diffs))
        cells = [str(d)] + [f"{v:.2f}" for t in tasks for v in accs[t]] + [f"{x:+.2f}" for x in diffs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", worst


def speedup_table(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str]) -> tuple[str, float]:
    """Per depth: the MACs ratio and each run's measured speedup, and their relative difference."""
    depths = [d for d in sorted(set(a) & set(b)) if d > 0]
    lines = [f"| depth | MACs ratio | speedup, {names[0]} | speedup, {names[1]} | difference |", "|" + "---:|" * 5]
    worst = 0.0
    for d in depths:
        sa, sb = a[d]["speedup"], b[d]["speedup"]
        rel = 100 * (sa - sb) / sb
        worst = max(worst, abs(rel))
        lines.append(f"| {d} | {a[d]['macs_ratio']:.3f} | {sa:.3f} | {sb:.3f} | {rel:+.1f}% |")
    return "\n".join(lines) + "\n", worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--names", default="A,B", help="column names of the two runs (default: A,B)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="largest allowed difference, points")
    parser.add_argument("--speedups", action="store_true", help="also compare the measured speedups (timings)")
    args = parser.parse_args()
    names = tuple(args.names.split(","))
    text, worst = table(read_rows(args.a), read_rows(args.b), names)
    print(text)
    print(f"largest difference: {worst:.2f} points (tolerance {args.tolerance:.2f})")
    if args.speedups:
        text, rel = speedup_table(read_rows(args.a), read_rows(args.b), names)
        print(f"\n{text}\nlargest speedup difference: {rel:.1f}%")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
