"""Run pytest once per CPU kernel path this machine can emulate, and print a table of the results.

Float results differ between machines: oneDNN and ATen pick kernels by instruction set, and the
thread count changes how reductions split. Capping both emulates older (or other) CPUs, so a test
that passes under every path here does not hinge on one machine's rounding.

    python tests/kernel_paths.py                          # every path, the fast tier + training tests
    python tests/kernel_paths.py --paths aten-default,threads-2 -- -m trains
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TypedDict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTEST_ARGS = ["-m", "not slow or trains"]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def kernel_paths(flags: set[str]) -> dict[str, dict[str, str]]:
    """name -> environment; only the instruction sets this CPU has (a cap above it changes nothing)."""
    paths = {
        "native": {},
        "threads-2": {"ZIPPER_TEST_THREADS": "2"},
        "onednn-sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
        "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    }
    if "avx2" in flags:
        paths |= {"onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"}}
    if "avx512f" in flags:
        paths |= {
            "onednn-avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
            "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
        }
    return paths


class PathRun(TypedDict):
    """One kernel path's test run: a row of the table."""

    path: str
    env: str
    rc: int
    passed: int
    failed: int
    wall_s: float


def run(name: str, env: dict[str, str], pytest_args: list[str]) -> PathRun:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error)", tail)}
    print(f"{name}: {tail}", flush=True)
    if proc.returncode:
        print(proc.stdout[-3000:], flush=True)
    return {
        "path": name,
        "env": " ".join(f"{k}={v}" for k, v in env.items()) or "-",
        "rc": proc.returncode,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0),
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", help="comma-separated path names (default: all this CPU supports)")
    args = parser.parse_args(ours)
    paths = kernel_paths(cpu_flags())
    chosen = args.paths.split(",") if args.paths else list(paths)
    unknown = [p for p in chosen if p not in paths]
    if unknown:
        parser.error(f"unknown or unsupported kernel path {unknown[0]!r}; this CPU has: {', '.join(paths)}")
    rows = [run(name, paths[name], pytest_args or DEFAULT_PYTEST_ARGS) for name in chosen]
    print("\n| kernel path | environment | passed | failed | wall (s) |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['env']} | {r['passed']} | {r['failed']} | {r['wall_s']:.0f} |")
    return max(r["rc"] for r in rows)


if __name__ == "__main__":
    sys.exit(main())
