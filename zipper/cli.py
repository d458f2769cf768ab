"""The `zipper` command: one thin subcommand per pipeline stage; all logic lives in the library."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from .graph import DATA_PARALLEL_STAGES, TABLE, Layout
from .locks import RootLocked


def _overrides(args: argparse.Namespace) -> dict:
    from .config import parse_overrides

    return parse_overrides(args.set)


def _params(args: argparse.Namespace):
    from .config import load_params

    return load_params(args.params, _overrides(args))


def _layout(args: argparse.Namespace):
    return Layout(Path(args.root))


PER_TASK_STAGES = ("data", "teachers", "features")  # --task runs one task
SIDE_BY_SIDE_STAGES = ("data", "teachers")  # on a CPU, one process per task (features: too short to gain)


def _stage(name: str):
    def run(args: argparse.Namespace) -> int | None:
        from .locks import root_lock

        params = _params(args)
        _warn_if_dvc_yaml_is_stale(params, Path(args.root))
        with root_lock(args.root, shlex.join(["zipper", *args.argv])):
            return _run_stage(name, params, args)

    return run


def _run_stage(name: str, params, args: argparse.Namespace) -> int | None:
    from . import live, runtime, stages

    runtime.set_threads(params.runtime.threads if args.threads is None else args.threads)
    if name in DATA_PARALLEL_STAGES and params.runtime.nproc_per_node > 1 and not runtime.launched_by_torchrun():
        return _torchrun(params.runtime.nproc_per_node, args.argv)
    if (
        name in SIDE_BY_SIDE_STAGES
        and not args.task
        and (per_task := runtime.per_task_threads(name, params, args.threads))
    ):
        return _run_per_task(name, args.argv, per_task)
    if name not in DATA_PARALLEL_STAGES and runtime.launched_by_torchrun():
        raise ValueError(
            f"zipper {name} runs in one process; launch only {' and '.join(DATA_PARALLEL_STAGES)} under torchrun"
        )
    fn = getattr(stages, f"run_{name}")
    extra = {"depth": args.depth} if hasattr(args, "depth") else {}
    if getattr(args, "task", None):
        extra["tasks"] = args.task
    layout = _layout(args)
    with runtime.distributed(params.runtime):
        if name == "zip":
            with live.calibration_logged(params, layout, args.depth) as on_progress:
                result = fn(params, layout, on_progress=on_progress, **extra)
        else:
            result = fn(params, layout, **extra)
    if name == "evaluate":
        live.log_evaluation(params, layout, result)
    if isinstance(result, str):
        print(result)
    return None


def _warn_if_dvc_yaml_is_stale(params, root: Path) -> None:
    """A generated dvc.yaml names the tasks' plots and the imported teachers of the params it was made from."""
    from .dvc_yaml import HEADER, render

    path = root / "dvc.yaml"
    text = path.read_text() if path.is_file() else ""
    if text.startswith(HEADER) and text != render(params):
        logging.getLogger(__name__).warning(
            "%s does not match these params (task names or teachers.checkpoints "
            "changed): regenerate it with `zipper dvc-yaml > dvc.yaml`",
            path,
        )


def _run_per_task(name: str, argv: list[str], threads: dict[str, int]) -> int:
    """Run this stage command once per task, all at once; the first failure's exit code."""
    import subprocess

    log = logging.getLogger(__name__)
    log.info(
        "%s: one process per task, side by side: %s",
        name,
        ", ".join(f"{t} ({n} thread(s))" for t, n in threads.items()),
    )
    procs = [
        subprocess.Popen([sys.executable, "-m", "zipper.cli", *argv, "--task", t, "--threads", str(n)])
        for t, n in threads.items()
    ]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this very command under torchrun with `nproc` processes on this machine (runtime.nproc_per_node)."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "zipper.cli",
        *argv,
    ]
    logging.getLogger(__name__).info("launching %d data-parallel processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd).returncode


def _promote(args: argparse.Namespace) -> None:
    from .tracking import promote

    print(json.dumps(promote(_params(args), args.root, max_drop=args.max_drop, depth=args.depth), indent=2))


def _export(args: argparse.Namespace) -> None:
    import tempfile

    from .export import export
    from .tracking import download_champion

    layout = _layout(args)
    with tempfile.TemporaryDirectory() as tmp:
        depth, checkpoint = (
            (args.depth, layout.zipped(args.depth))
            if args.depth is not None
            else download_champion(_params(args), args.root, tmp)
        )
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"no checkpoint for depth {depth}: {checkpoint} (run its zip stage)")
        out = args.onnx or layout.root / "models" / "onnx" / f"depth_{depth}.onnx"
        print(json.dumps({"depth": depth, **export(checkpoint, out)}, indent=2))


def _dvc_yaml(args: argparse.Namespace) -> None:
    from .dvc_yaml import render

    print(render(_params(args)), end="")


def _bench(args: argparse.Namespace) -> None:
    from . import bench

    bench.table1(
        repeats=args.repeats,
        json_path=args.json,
        threads=args.threads,
        batch=args.batch,
        markdown_path=args.markdown,
        command=" ".join(["zipper", *map(shlex.quote, sys.argv[1:])]),
    )


def _bench_calibrate(args: argparse.Namespace) -> None:
    from .bench_calibrate import BenchConfig, parse_workers, run
    from .runtime import RuntimeConfig

    cfg = BenchConfig(
        arch=args.arch,
        width=args.width,
        input_size=args.input_size,
        batch=args.batch,
        depth=args.depth,
        steps=args.steps,
        warmup=args.warmup,
        data_workers=parse_workers(args.workers),
        step_workers=args.step_workers,
        samples=args.samples,
        cache_budget_mb=args.cache_budget_mb,
    )
    runtime = RuntimeConfig(device=args.device, precision=args.precision, channels_last=args.channels_last)
    run(cfg, runtime, threads=args.threads, json_path=args.json, tmp_dir=args.tmp)


def _flow(args: argparse.Namespace) -> None:
    import os

    # The stages' own log lines in the Prefect UI, also for served runs (their processes inherit this).
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "zipper")
    # The temporary server's telemetry heartbeat races the flow for its new sqlite file at start-up and
    # prints a "database is locked" traceback; a user who wants telemetry sets this to true.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from .flows import pipeline

    overrides = _overrides(args)
    if args.flow_command == "run":
        result = pipeline.run(args.params, args.root, overrides, runner=args.runner, dask_address=args.dask_address)
        registered = result["register"]
        print(
            f"\n{Layout(Path(result['root'])).path(TABLE).read_text()}\n"
            f"MLflow: {registered['tracking_uri']}, parent run {registered['parent_run_id']}; "
            f"`zipper promote --max-drop 1.0` registers a depth as {registered['registered_model']}@champion"
        )
    else:
        pipeline.serve(args.params, args.root, overrides, cron=args.cron, name=args.name)


def _add_bench_calibrate(bench_sub) -> None:
    cal = bench_sub.add_parser(
        "calibrate",
        help="images/s of teacher steps, calibration steps (online and cached targets) and the data path on one device",
    )
    cal.add_argument("--arch", default="mobilenet_v1")
    cal.add_argument("--width", type=float, default=1.0)
    cal.add_argument("--input-size", type=int, default=224)
    cal.add_argument("--batch", type=int, default=64, help="images per task per step (default: 64)")
    cal.add_argument("--depth", type=int, help="zipped depth being calibrated (default: half the blocks)")
    cal.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    cal.add_argument("--precision", default="auto", help="autocast dtype: auto, fp32, bf16 or fp16 (default: auto)")
    cal.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    cal.add_argument(
        "--workers", default="0,2,N", help="loader worker counts for the data path; N = all cpus (default: 0,2,N)"
    )
    cal.add_argument(
        "--step-workers", type=int, help="loader workers of the timed steps (default: 0 on CPU, else min(8, cpus))"
    )
    cal.add_argument("--steps", type=int, default=10, help="timed steps per mode (default: 10)")
    cal.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    cal.add_argument("--samples", type=int, help="train images per task (default: batch x (warmup + steps))")
    cal.add_argument(
        "--cache-budget-mb",
        type=float,
        default=2048.0,
        help="temp space for the feature caches; over it the cached mode is skipped (default: 2048)",
    )
    cal.add_argument("--threads", type=int, default=0, help="torch threads (default: 0, torch's default)")
    cal.add_argument("--tmp", help="where the temp shards and caches go (default: the system temp dir)")
    cal.add_argument("--json", help="also write the rows as JSON here")
    cal.set_defaults(func=_bench_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zipper", description="Merge same-architecture CNNs by zippering.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--root", default=".", help="project root holding data/, models/, metrics/, reports/")
    common.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. calibrate.steps=50")
    common.add_argument(
        "--threads",
        type=int,
        help="torch threads per process (default: runtime.threads); on a "
        "CPU, data and teachers share them among the tasks, run side by side",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    stage_help = {
        "data": "shard each task's source into WebDataset tars",
        "teachers": "train or import the teachers",
        "features": "cache the teachers' calibration targets",
        "zip": "merge the next block into the previous depth's model and calibrate",
        "evaluate": "accuracy, speedup, size and memory of one depth",
        "report": "table and plots over all depths",
        "register": "log every depth to MLflow and register it",
    }
    for name, text in stage_help.items():
        p = sub.add_parser(name, parents=[common], help=text)
        if name in ("zip", "evaluate"):
            p.add_argument("--depth", type=int, required=True)
        if name in PER_TASK_STAGES:
            p.add_argument("--task", action="append", help="only this task (repeatable; default: all)")
        p.set_defaults(func=_stage(name))

    p = sub.add_parser("promote", parents=[common], help="put alias 'champion' on the chosen depth")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--max-drop", type=float, metavar="PCT", help="deepest depth whose worst per-task drop <= PCT points"
    )
    choice.add_argument("--depth", type=int, metavar="K")
    p.set_defaults(func=_promote)

    p = sub.add_parser(
        "export",
        parents=[common],
        help="one depth as ONNX (one output per task), checked against "
        "PyTorch; default: the @champion version's own checkpoint",
    )
    p.add_argument("--depth", type=int, metavar="K", help="the calibrated depth under --root instead of the champion")
    p.add_argument("--onnx", metavar="PATH", help="output file (default: models/onnx/depth_<K>.onnx under --root)")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "dvc-yaml",
        parents=[common],
        help="print dvc.yaml as the stage graph and params make it "
        "(zipper dvc-yaml > dvc.yaml after changing the tasks or imported teachers)",
    )
    p.set_defaults(func=_dvc_yaml)

    bench_p = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench_p.add_subparsers(dest="bench", required=True)
    t1 = bench_sub.add_parser("table1", help="the paper's Table 1 columns: MobileNetV1-1.0, 224 px, 1000+50 classes")
    t1.add_argument("--repeats", type=int, default=20, help="timed forward passes per model (median)")
    t1.add_argument("--json", help="also write the rows as JSON here")
    t1.add_argument("--markdown", help="also write the table as a markdown page here (e.g. docs/table1.md)")
    t1.add_argument("--threads", type=int, help="torch threads while timing (default: 1)")
    t1.add_argument("--batch", type=int, default=1, help="images per forward pass (default: 1, the deployment case)")
    t1.set_defaults(func=_bench)
    _add_bench_calibrate(bench_sub)

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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args) or 0
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError, RootLocked) as e:
        print(f"zipper: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
