"""The zippering pipeline as a Prefect flow: the DVC stage graph, resumable, schedulable, distributable.

Every task calls one function of `zipper.stages` (the same ones `dvc.yaml` runs through `zipper <stage>`);
this module only wires them together, along the stage graph of `zipper.graph` that dvc.yaml is made from:

- per-task work (shards, teachers, feature caches) runs in parallel, the zip chain in order (depth k
  waits for depth k-1's checkpoint) and each depth's evaluation as soon as its checkpoint exists, so
  evaluating depth k overlaps calibrating depth k+1;
- a task's cache key is the sha256 of the files it reads, the params it uses and the package code it
  runs, as the stage graph declares them: the same in every process, deployment and checkout;
  results persist under `<root>/.prefect-results`, so a second run does no training and a run killed
  at depth k resumes at depth k (and mid-calibration, from the stage's own partial checkpoint);
- a cached result is used only while the files that task wrote are still there and unchanged: a
  deleted or edited checkpoint makes its task run again (and, through the hashes, what follows);
- the training stages (teachers, zip) run as their `zipper` command, as under DVC, in a process of
  their own (torch's RNG and thread settings are per process): the flow and `dvc repro` write the same
  checkpoints; with `runtime.nproc_per_node > 1` the command relaunches itself under torchrun. Their
  output streams to the task's log. Every other stage runs in-process with `runtime.threads` threads;
- one pipeline per project root: the flow holds the root's lock (`zipper.locks`) while it runs, and
  evaluations time their latency only while nothing else computes there;
- on Dask, when `runtime.device` names CUDA, the teachers and zip tasks ask for the worker resource
  `GPU` (= nproc_per_node), so only workers started with `--resources GPU=N` run them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, cast
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed

from zipper import live, stages
from zipper import runtime as zruntime
from zipper.calibrate import PROGRESS_PATTERN
from zipper.config import Params, load_params
from zipper.graph import DATA_PARALLEL_STAGES, Layout
from zipper.locks import root_lock

from .cache import StageCache, output_state
from .commands import cli_args, run_stage_command
from .runners import check_gpu_workers, default_task_runner, make_task_runner, submit, task_resources

log = logging.getLogger(__name__)

FLOW_NAME = "zipper-pipeline"
RESULTS_DIR = ".prefect-results"  # under the project root: the cache travels with the data it describes


# ------------------------------------------------------------------------------- task options
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def retry_on_io_error(task_, task_run, state) -> bool:
    """Retry only what may heal by itself: OS-level I/O errors, not missing files, bad params or NaNs."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT)


def _options(stage: str, run_name: str) -> dict[str, Any]:
    return dict(
        name=f"zipper-{stage}",
        task_run_name=run_name,
        cache_policy=StageCache(stage=stage),
        persist_result=True,
        result_serializer="json",
        retries=2,
        retry_delay_seconds=[10, 60],
        retry_condition_fn=retry_on_io_error,
        tags=["zipper", f"zipper-{stage}"],
    )


def _done(stage: str, params: Params, layout: Layout, arg: str | int | None = None, **extra: Any) -> dict[str, Any]:
    return {"outputs": output_state(stage, params, layout, arg), **extra}


def _in_process(params: Params) -> None:
    """Before a stage runs in this process (a thread of the flow, or a Dask worker): its torch threads."""
    zruntime.set_threads(params.runtime.threads)


# ----------------------------------------------------------------------------------------- tasks
@task(**_options("data", "data-{name}"))
def data_task(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    _in_process(params)
    stages.run_data(params, layout, tasks=[name])
    return _done("data", params, layout, name)


@task(**_options("teachers", "teacher-{name}"))
def teachers_task(params: Params, layout: Layout, name: str, cli: tuple[str, ...] = ()) -> dict[str, Any]:
    # With the threads `zipper teachers` gives each task's process: the same teachers as dvc repro's.
    run_stage_command(
        "teachers", cli, name, layout.root, threads=zruntime.per_task_threads("teachers", params).get(name)
    )
    acc = json.loads(layout.teacher_metrics.read_text())[name]["val_acc"]
    return _done("teachers", params, layout, name, val_acc=acc)


@task(**_options("features", "features-{name}"))
def features_task(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    _in_process(params)
    stages.run_features(params, layout, tasks=[name])
    return _done("features", params, layout, name)


@task(**_options("zip", "zip-depth-{depth}"))
def zip_task(
    params: Params, layout: Layout, depth: int, cli: tuple[str, ...] = (), progress: UUID | None = None
) -> dict[str, Any]:
    """Calibrate one depth (its command); `progress`: an artifact that follows its calibration steps."""

    def follow(line: str) -> None:
        match = PROGRESS_PATTERN.search(line)
        if progress is not None and match:
            d, step, steps = map(int, match.groups())
            update_progress_artifact(progress, 100.0 * step / steps, description=f"depth {d}: step {step}/{steps}")

    run_stage_command("zip", cli, depth, layout.root, on_line=follow)
    return _done("zip", params, layout, depth)


@task(**_options("evaluate", "evaluate-depth-{depth}"))
def evaluate_task(params: Params, layout: Layout, depth: int) -> dict[str, Any]:
    _in_process(params)
    row = stages.run_evaluate(params, layout, depth)
    live.log_evaluation(params, layout, row)
    return _done("evaluate", params, layout, depth, row=row)


@task(**_options("report", "report"))
def report_task(params: Params, layout: Layout) -> dict[str, Any]:
    _in_process(params)
    markdown = stages.run_report(params, layout)
    return _done("report", params, layout, markdown=markdown)


@task(**_options("register", "register"))
def register_task(params: Params, layout: Layout) -> dict[str, Any]:
    _in_process(params)
    summary = stages.run_register(params, layout)
    return _done("register", params, layout, summary=summary)


# ------------------------------------------------------------------------------------ artifacts
def table_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per depth for the table artifact."""
    out = []
    for r in rows:
        flat = {"depth": r["depth"], "scope": r["scope"], "init": r["init"], "targets": r["targets"]}
        flat.update({f"acc_{t}": round(100 * a, 2) for t, a in r["acc"].items()})
        flat.update({f"drop_pp_{t}": round(d, 2) for t, d in r["drop_pp"].items()})
        for k in ("comp_params", "comp_conv", "macs_ratio", "speedup", "memory_comp", "final_loss"):
            flat[k] = None if r.get(k) is None else round(float(r[k]), 4)
        out.append(flat)
    return out


def _progress_text(done: Mapping[str, list[int]], total: int) -> str:
    return (
        f"zipper: {sum(map(len, done.values()))}/{total} depth steps; "
        f"calibrated depths {sorted(done['zip']) or '-'}, evaluated depths {sorted(done['evaluate']) or '-'}"
    )


def flow_run_name() -> str:
    """`zipper-<project folder>-<start, UTC>`: which project a run worked on, and when, at a glance in the UI."""
    from prefect.runtime import flow_run

    root = Path(flow_run.parameters.get("root") or ".").resolve()
    return f"zipper-{root.name}-{flow_run.scheduled_start_time:%Y%m%d-%H%M%S}"


@flow(
    name=FLOW_NAME,
    flow_run_name=flow_run_name,
    task_runner=default_task_runner(),
    validate_parameters=True,
    description="Zipper two or more same-architecture CNNs into one multi-task network, depth by depth.",
)
def zipper_pipeline(
    params_path: str = "params.yaml", root: str = ".", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """data -> teachers -> features per task (parallel); zip 0..L in order; evaluate each depth as soon
    as it exists; report; register. `overrides`: dotted params keys, as `zipper <stage> --set`."""
    params = load_params(params_path, overrides or {})
    layout = Layout(Path(root).resolve())
    cli = cli_args(params_path, root, overrides)  # for the training stages, which run as commands
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None  # the flow's body runs inside its flow run
    with root_lock(layout.root, f"Prefect flow run {ctx.flow_run.name!r}"):
        return _pipeline(params, layout, cli)


def _pipeline(params: Params, layout: Layout, cli: tuple[str, ...]) -> dict[str, Any]:
    gpu = {s: task_resources(s, params.runtime) for s in DATA_PARALLEL_STAGES}
    ctx = FlowRunContext.get()
    assert ctx is not None  # called by the flow's body only
    check_gpu_workers(ctx.task_runner, gpu["zip"])
    storage = layout.root / RESULTS_DIR  # a Path: Prefect makes it a LocalFileSystem, no saved block needed
    # One by one, not in a loop: each keeps its own signature for the type checker.
    data_t = data_task.with_options(result_storage=storage)
    teachers_t = teachers_task.with_options(result_storage=storage)
    features_t = features_task.with_options(result_storage=storage)
    zip_t = zip_task.with_options(result_storage=storage)
    evaluate_t = evaluate_task.with_options(result_storage=storage)
    report_t = report_task.with_options(result_storage=storage)
    register_t = register_task.with_options(result_storage=storage)
    depths = [0, *params.zipper.depths]

    # A sync flow: Prefect's async_dispatch runs the sync version, which returns the artifact's id.
    calibration = cast(
        UUID, create_progress_artifact(0.0, key="zipper-calibration", description="zipper: calibration steps")
    )
    progress = cast(
        UUID,
        create_progress_artifact(
            0.0, key="zipper-progress", description=f"zipper: calibrate and evaluate depths {depths}"
        ),
    )
    data = {n: data_t.submit(params, layout, n) for n in params.tasks}
    teachers = {
        n: submit(teachers_t, params, layout, n, cli, wait_for=[data[n]], resources=gpu["teachers"])
        for n in params.tasks
    }
    # return_state=False is Prefect's default; its overloads want it spelled out next to wait_for.
    features = {
        n: features_t.submit(params, layout, n, wait_for=[teachers[n]], return_state=False) for n in params.tasks
    }
    zips: dict[int, PrefectFuture] = {}
    evals: dict[int, PrefectFuture] = {}
    for d in depths:
        after = list(teachers.values()) if d == 0 else [zips[d - 1], *features.values()]
        zips[d] = submit(zip_t, params, layout, d, cli, calibration, wait_for=after, resources=gpu["zip"])
        side = [evals[0]] if d else []  # depth d > 0 reads the teachers' side measured at depth 0
        evals[d] = evaluate_t.submit(
            params, layout, d, wait_for=[zips[d], *teachers.values(), *side], return_state=False
        )
    report = report_t.submit(params, layout, wait_for=list(evals.values()), return_state=False)
    register = register_t.submit(params, layout, wait_for=[report, *zips.values()], return_state=False)

    # Progress over depths, as the chain and the evaluations finish (in whatever order they do).
    which = {
        **{f.task_run_id: ("zip", d) for d, f in zips.items()},
        **{f.task_run_id: ("evaluate", d) for d, f in evals.items()},
    }
    done: dict[str, list[int]] = {"zip": [], "evaluate": []}
    for fut in as_completed([*zips.values(), *evals.values()]):
        fut.wait()  # sets the future's final state from the task run itself, not from the API's (lagging) copy
        if fut.state.is_completed():
            stage, d = which[fut.task_run_id]
            done[stage].append(d)
        update_progress_artifact(
            progress,
            100.0 * sum(map(len, done.values())) / (2 * len(depths)),
            description=_progress_text(done, 2 * len(depths)),
        )
    ordered = [
        *data.values(),
        *teachers.values(),
        *features.values(),
        *(zips[d] for d in depths),
        *(evals[d] for d in depths),
        report,
        register,
    ]
    for fut in ordered:
        fut.wait()

    rows = [evals[d].result()["row"] for d in depths if evals[d].state.is_completed()]
    if rows:
        create_table_artifact(
            table_rows(rows),
            key="zipper-depths",
            description=f"zipper: per-depth results ({len(rows)}/{len(depths)} depths)",
        )
    failed = next((f for f in ordered if f.state.is_failed() or f.state.is_crashed()), None)
    if failed is not None:
        failed.result()  # raises the stage's own exception: the flow run fails with it
    unfinished = [f for f in ordered if not f.state.is_completed()]
    if unfinished:
        raise RuntimeError(f"zipper: {len(unfinished)} task(s) did not finish: {[f.state.name for f in unfinished]}")

    markdown = report.result()["markdown"]
    summary = register.result()["summary"]
    create_markdown_artifact(
        f"# zipper report\n\n{markdown}\n\nMLflow: `{summary.get('tracking_uri')}`, parent run "
        f"`{summary.get('parent_run_id')}`; `zipper promote` registers a depth as "
        f"`{summary.get('registered_model')}@champion`\n",
        key="zipper-report",
        description="zipper: per-depth accuracy, size and speed (reports/table.md)",
    )
    return {"root": str(layout.root), "depths": rows, "register": summary}


# ------------------------------------------------------------------------------- command line
def _flow_parameters(
    params_path: str | os.PathLike, root: str | os.PathLike, overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "params_path": str(Path(params_path).resolve()),
        "root": str(Path(root).resolve()),
        "overrides": dict(overrides or {}),
    }


def run(
    params_path: str | os.PathLike,
    root: str | os.PathLike,
    overrides: Mapping[str, Any] | None,
    runner: str = "thread",
    dask_address: str | None = None,
) -> dict[str, Any]:
    """`zipper flow run`: the flow, now, on the thread pool or on Dask (LocalCluster or `dask_address`)."""
    pipeline = zipper_pipeline.with_options(task_runner=make_task_runner(runner, dask_address))
    return pipeline(**_flow_parameters(params_path, root, overrides))


def deployment_options(
    params_path: str | os.PathLike, root: str | os.PathLike, overrides: Mapping[str, Any] | None, cron: str, name: str
) -> dict[str, Any]:
    """What `serve` gives `Flow.serve` (and a test `Flow.to_deployment`): name, schedule, parameters."""
    from prefect.deployments.runner import EntrypointType

    # By module path: the served runs import zipper.flows.pipeline from the installed package, wherever
    # `zipper flow serve` was started (a file path would be relative to that directory).
    return {
        "name": name,
        "cron": cron,
        "parameters": _flow_parameters(params_path, root, overrides),
        "tags": ["zipper"],
        "description": f"zipper pipeline on {Path(root).resolve()}, cron {cron!r}",
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }


def serve(
    params_path: str | os.PathLike,
    root: str | os.PathLike,
    overrides: Mapping[str, Any] | None,
    cron: str,
    name: str = "zipper-scheduled",
) -> None:
    """`zipper flow serve`: register a deployment with this schedule and parameters, run its runs here."""
    zipper_pipeline.serve(**deployment_options(params_path, root, overrides, cron, name))
