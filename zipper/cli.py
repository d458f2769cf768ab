"""The `zipper` command: one thin subcommand per pipeline stage; all logic lives in the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _overrides(args: argparse.Namespace) -> dict:
    from .config import parse_overrides

    return parse_overrides(args.set)


def _params(args: argparse.Namespace):
    from .config import load_params

    return load_params(args.params, _overrides(args))


def _layout(args: argparse.Namespace):
    from .stages import Layout

    return Layout(Path(args.root))


def _stage(name: str):
    def run(args: argparse.Namespace) -> None:
        from . import stages

        fn = getattr(stages, f"run_{name}")
        extra = {"depth": args.depth} if hasattr(args, "depth") else {}
        if getattr(args, "task", None):
            extra["tasks"] = args.task
        result = fn(_params(args), _layout(args), **extra)
        if isinstance(result, str):
            print(result)
    return run


def _promote(args: argparse.Namespace) -> None:
    from .tracking import promote

    print(json.dumps(promote(_params(args), args.root, max_drop=args.max_drop, depth=args.depth), indent=2))


def _bench(args: argparse.Namespace) -> None:
    from . import bench

    bench.table1(repeats=args.repeats, json_path=args.json, threads=args.threads, batch=args.batch)


def _flow(args: argparse.Namespace) -> None:
    from flows import pipeline

    overrides = _overrides(args)
    if args.flow_command == "run":
        pipeline.run(args.params, args.root, overrides, runner=args.runner, dask_address=args.dask_address)
    else:
        pipeline.serve(args.params, args.root, overrides, cron=args.cron, name=args.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipper", description="Merge same-architecture CNNs by zippering.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--root", default=".", help="project root holding data/, models/, metrics/, reports/")
    common.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. calibrate.steps=50")
    common.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: small nets gain little from more, and busy machines thrash)")
    sub = parser.add_subparsers(dest="command", required=True)

    stage_help = {"data": "shard each task's source into WebDataset tars", "teachers": "train or import the teachers",
                  "features": "cache the teachers' calibration targets",
                  "zip": "merge the next block into the previous depth's model and calibrate",
                  "evaluate": "accuracy, speedup, size and memory of one depth",
                  "report": "table and plots over all depths", "register": "log every depth to MLflow and register it"}
    for name, text in stage_help.items():
        p = sub.add_parser(name, parents=[common], help=text)
        if name in ("zip", "evaluate"):
            p.add_argument("--depth", type=int, required=True)
        if name in ("data", "teachers", "features"):
            p.add_argument("--task", action="append", help="only this task (repeatable; default: all)")
        p.set_defaults(func=_stage(name))

    p = sub.add_parser("promote", parents=[common], help="put alias 'champion' on the chosen depth")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--max-drop", type=float, metavar="PCT", help="deepest depth whose worst per-task drop <= PCT points")
    choice.add_argument("--depth", type=int, metavar="K")
    p.set_defaults(func=_promote)

    bench_p = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench_p.add_subparsers(dest="bench", required=True)
    t1 = bench_sub.add_parser("table1", help="the paper's Table 1 columns: MobileNetV1-1.0, 224 px, 1000+50 classes")
    t1.add_argument("--repeats", type=int, default=20, help="timed forward passes per model (median)")
    t1.add_argument("--json", help="also write the rows as JSON here")
    t1.add_argument("--threads", type=int, help="torch threads while timing (default: 1)")
    t1.add_argument("--batch", type=int, default=1, help="images per forward pass (default: 1, the deployment case)")
    t1.set_defaults(func=_bench)

    flow_p = sub.add_parser("flow", help="the pipeline as a Prefect flow")
    flow_sub = flow_p.add_subparsers(dest="flow_command", required=True)
    run_p = flow_sub.add_parser("run", parents=[common], help="run the flow now")
    run_p.add_argument("--runner", choices=["thread", "dask"], default="thread")
    run_p.add_argument("--dask-address", help="existing Dask scheduler (default: a LocalCluster)")
    serve_p = flow_sub.add_parser("serve", parents=[common], help="serve a scheduled deployment")
    serve_p.add_argument("--cron", required=True, help="cron schedule, e.g. '0 3 * * *'")
    serve_p.add_argument("--name", default="zipper-scheduled", help="deployment name")
    for p in (run_p, serve_p):
        p.set_defaults(func=_flow)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's client logs every request otherwise
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) and args.command != "bench":
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        print(f"zipper: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
