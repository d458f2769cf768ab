"""The `zipper` command: one thin subcommand per pipeline stage; all logic lives in the library."""
from __future__ import annotations

import argparse
import logging
import sys


def _bench(args: argparse.Namespace) -> None:
    from . import bench

    bench.table1(repeats=args.repeats, json_path=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipper", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench_p = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench_p.add_subparsers(dest="bench", required=True)
    t1 = bench_sub.add_parser("table1", help="the paper's Table 1 columns: MobileNetV1-1.0, 224 px, 1000+50 classes")
    t1.add_argument("--repeats", type=int, default=20, help="timed forward passes per model (median)")
    t1.add_argument("--json", help="also write the rows as JSON here")
    t1.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"zipper: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
