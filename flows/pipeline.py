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
- with `runtime.nproc_per_node > 1` the data-parallel stages (teachers, zip) run as their `zipper`
  command, which relaunches itself under torchrun, its output streamed to the task's log; every other
  stage runs in-process with `runtime.threads` torch threads;
- on Dask, when `runtime.device` names CUDA, the teachers and zip tasks ask for the worker resource
  `GPU` (= nproc_per_node), so only workers started with `--resources GPU=N` run them.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from prefect import flow, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.cache_policies import CachePolicy
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.filesystems import LocalFileSystem
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from zipper import runtime as zruntime
from zipper import stages
from zipper.cli import DATA_PARALLEL_STAGES
from zipper.config import Params, load_params
from zipper.io import sha256_file, sha256_json
from zipper.runtime import RuntimeConfig
from zipper.graph import Layout, stage_io, stage_of

log = logging.getLogger(__name__)

FLOW_NAME = "zipper-pipeline"
RESULTS_DIR = ".prefect-results"  # under the project root: the cache travels with the data it describes
ZIPPER_SRC = Path(stages.__file__).resolve().parent
RUNNERS = ("thread", "dask")
LOOPBACK = "127.0.0.1"  # where a LocalCluster's scheduler and dashboard listen
DASHBOARD_PORT = 8787  # Dask's usual one; another free port when it is taken
COMMAND_TAIL = 40  # lines of a failed stage command's output quoted in the task's error


# --------------------------------------------------------------------------- cache identity
def pick_params(params: Params, keys: Iterable[str]) -> dict[str, Any]:
    """The values of dotted params keys (`calibrate`, `zipper.scope`, `data.tasks.shapes`)."""
    out: dict[str, Any] = {}
    for key in keys:
        if key == "*":
            out[key] = asdict(params)
            continue
        if key == "tasks":
            out[key] = params.tasks
            continue
        node: Any = params
        for part in key.split("."):
            node = node[part] if isinstance(node, Mapping) else getattr(node, part)
        out[key] = asdict(node) if is_dataclass(node) else node
    return out


# ------------------------------------------------------------------------------------- hashing
_sha_memo: dict[tuple, str] = {}


def _sha(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime, inode): reads and writes repeat within a run."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _sha_memo.get(memo_key)
    if digest is None:
        digest = _sha_memo[memo_key] = sha256_file(path)
    return digest


def _files(path: Path) -> list[Path]:
    """A file, or every file under a folder (skipping dot files: temp names of atomic writes in flight)."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts))


def _rel(path: Path, root: Path) -> str:
    """A path under `root` relative to it; any other (an imported teacher) as params names it."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def hash_paths(paths: Iterable[Path], root: Path) -> dict[str, str | None]:
    """{path relative to root: sha256} for every file under `paths`; None for a missing file or empty folder."""
    out: dict[str, str | None] = {}
    for path in paths:
        files = _files(Path(path))
        if not files:
            out[_rel(path, root)] = None
        for f in files:
            out[_rel(f, root)] = _sha(f)
    return out


def stage_key(command: str, params: Params, layout: Layout, arg: str | int | None) -> str:
    """The cache key of one stage run, from the stage graph: what it reads (content hashes, paths relative
    to the root), the params and package code it uses. Nothing per process, run or checkout."""
    io = stage_io(stage_of(command, arg), params, layout, arg)
    return sha256_json({
        "stage": command, "arg": arg, "params": pick_params(params, io.params),
        "reads": hash_paths(io.reads, layout.root),
        "code": hash_paths((ZIPPER_SRC / c for c in io.code), ZIPPER_SRC.parent)})


def output_state(command: str, params: Params, layout: Layout, arg: str | int | None = None) -> dict[str, Any]:
    """What a finished stage left behind: its files' hashes and its entries in shared JSON files."""
    io = stage_io(stage_of(command, arg), params, layout, arg)
    entries = {}
    for path, key in io.shared:
        try:
            entries[f"{_rel(path, layout.root)}:{key}"] = key in json.loads(Path(path).read_text())
        except (OSError, ValueError):
            entries[f"{_rel(path, layout.root)}:{key}"] = False
    return {"files": hash_paths(io.writes, layout.root), "entries": entries}


def outputs_complete(state: Mapping[str, Any]) -> bool:
    return all(v is not None for v in state["files"].values()) and all(state["entries"].values())


@dataclass
class StageCache(CachePolicy):
    """Cache key = `stage_key`; a record whose outputs are gone or changed is dropped.

    Prefect looks a key up before running the task; dropping the stale record there makes the task
    run again and write a fresh record under the same key, exactly as if it had never been cached.
    """

    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        params, layout = inputs["params"], inputs["layout"]
        arg = inputs.get("name", inputs.get("depth"))
        key = stage_key(self.stage, params, layout, arg)
        store = getattr(task_ctx, "result_store", None)
        if store is None or not store.exists(key):
            return key
        current = output_state(self.stage, params, layout, arg)
        try:
            recorded = store.read(key).result.get("outputs")
        except Exception:  # unreadable record: treat as stale
            recorded = None
        if recorded == current and outputs_complete(current):
            return key
        log.info("%s %s: outputs missing or changed since it was cached; running it again", self.stage, arg)
        storage = store.result_storage
        if isinstance(storage, LocalFileSystem) and storage.basepath:
            Path(storage.basepath).expanduser().joinpath(key).unlink(missing_ok=True)
            return key
        return sha256_json([key, current])  # storage we cannot delete from: a key of its own for this state


# ------------------------------------------------------------------------------- task options
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def retry_on_io_error(task_, task_run, state) -> bool:
    """Retry only what may heal by itself: OS-level I/O errors, not missing files, bad params or NaNs."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, _NOT_TRANSIENT)


def _options(stage: str, run_name: str) -> dict[str, Any]:
    return dict(name=f"zipper-{stage}", task_run_name=run_name, cache_policy=StageCache(stage=stage),
                persist_result=True, result_serializer="json", retries=2, retry_delay_seconds=[10, 60],
                retry_condition_fn=retry_on_io_error, tags=["zipper", f"zipper-{stage}"])


def _done(stage: str, params: Params, layout: Layout, arg: str | int | None = None, **extra: Any) -> dict[str, Any]:
    return {"outputs": output_state(stage, params, layout, arg), **extra}


def _in_process(params: Params) -> None:
    """Before a stage runs in this process (a thread of the flow, or a Dask worker): its torch threads."""
    zruntime.set_threads(params.runtime.threads)


# ------------------------------------------------------------- stages as commands (torchrun)
class StageCommandError(RuntimeError):
    """A stage run as a `zipper` command exited non-zero (a RuntimeError: not retried)."""


def _yaml_value(value: Any) -> str:
    """One override value as `--set KEY=VALUE` text that `parse_overrides` reads back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def cli_args(params_path: str | os.PathLike, root: str | os.PathLike,
             overrides: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The options of every `zipper <stage>` command of a flow run: its params file, root and overrides."""
    args = ["--params", str(Path(params_path).resolve()), "--root", str(Path(root).resolve())]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={_yaml_value(value)}"]
    return tuple(args)


def as_command(stage: str, params: Params) -> bool:
    """Whether the flow runs `stage` as its `zipper` command instead of in-process: the data-parallel
    stages when runtime.nproc_per_node > 1 (the command relaunches itself under torchrun)."""
    return stage in DATA_PARALLEL_STAGES and params.runtime.nproc_per_node > 1


def stage_command(stage: str, cli: Iterable[str], arg: str | int | None = None) -> list[str]:
    """`zipper <stage> <cli> [--depth K | --task NAME]`, with this interpreter."""
    cmd = [sys.executable, "-m", "zipper.cli", stage, *cli]
    if stage in ("zip", "evaluate"):
        cmd += ["--depth", str(arg)]
    elif arg is not None:
        cmd += ["--task", str(arg)]
    return cmd


def _task_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a task run
        return log


def run_command(cmd: list[str], logger: logging.Logger | logging.LoggerAdapter | None = None,
                tail: int = COMMAND_TAIL) -> None:
    """Run `cmd`, each line of its output (stdout and stderr) logged as it comes, to the task's run
    logger by default; raise StageCommandError with its last `tail` lines if it exits non-zero.

    The command runs in a session of its own: a task that is cancelled or interrupted stops it and what
    it started (torchrun and its workers) instead of leaving them running.
    """
    logger = logger or _task_logger()
    logger.info("running %s", shlex.join(cmd))
    last: collections.deque[str] = collections.deque(maxlen=tail)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                last.append(line)
                logger.info("%s", line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if returncode != 0:
        raise StageCommandError(f"`{shlex.join(cmd)}` exited with status {returncode}; its last lines:\n"
                                + "\n".join(last))


def _command(stage: str, params: Params, cli: Iterable[str], arg: str | int) -> None:
    cli = tuple(cli)
    if not cli:
        raise ValueError(f"{stage}: runtime.nproc_per_node={params.runtime.nproc_per_node} runs it as a command, "
                         "which needs the flow run's command-line options (cli=cli_args(...))")
    run_command(stage_command(stage, cli, arg))


# ----------------------------------------------------------------------------------------- tasks
@task(**_options("data", "data-{name}"))
def data_task(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    _in_process(params)
    stages.run_data(params, layout, tasks=[name])
    return _done("data", params, layout, name)


@task(**_options("teachers", "teacher-{name}"))
def teachers_task(params: Params, layout: Layout, name: str, cli: tuple[str, ...] = ()) -> dict[str, Any]:
    if as_command("teachers", params):
        _command("teachers", params, cli, name)
        acc = json.loads(layout.teacher_metrics.read_text())[name]["val_acc"]
    else:
        _in_process(params)
        acc = stages.run_teachers(params, layout, tasks=[name])[name]
    return _done("teachers", params, layout, name, val_acc=acc)


@task(**_options("features", "features-{name}"))
def features_task(params: Params, layout: Layout, name: str) -> dict[str, Any]:
    _in_process(params)
    stages.run_features(params, layout, tasks=[name])
    return _done("features", params, layout, name)


@task(**_options("zip", "zip-depth-{depth}"))
def zip_task(params: Params, layout: Layout, depth: int, cli: tuple[str, ...] = ()) -> dict[str, Any]:
    if as_command("zip", params):
        _command("zip", params, cli, depth)
    else:
        _in_process(params)
        stages.run_zip(params, layout, depth)
    return _done("zip", params, layout, depth)


@task(**_options("evaluate", "evaluate-depth-{depth}"))
def evaluate_task(params: Params, layout: Layout, depth: int) -> dict[str, Any]:
    _in_process(params)
    row = stages.run_evaluate(params, layout, depth)
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


# ------------------------------------------------------------------- Dask worker resources (GPUs)
def task_resources(stage: str, runtime: RuntimeConfig) -> dict[str, int]:
    """The Dask worker resources a stage's task asks for: {"GPU": nproc_per_node} for the data-parallel
    stages (teachers, zip) when runtime.device names CUDA, else none. `auto` asks for nothing: the
    flow cannot know what a remote worker has."""
    if stage in DATA_PARALLEL_STAGES and runtime.device.startswith("cuda"):
        return {"GPU": runtime.nproc_per_node}
    return {}


def submit(task_, *args: Any, resources: Mapping[str, float] | None = None, **kwargs: Any) -> PrefectFuture:
    """`task_.submit(...)`, inside `dask.annotate(resources=...)` when it needs worker resources.

    prefect-dask's client submits through `distributed.Client.submit`, which merges the annotations
    active at submission (`dask.get_annotations()`) into the task's: the scheduler then runs it only on
    a worker that declares them (`dask worker ... --resources GPU=1`). Other task runners ignore them.
    """
    if not resources:
        return task_.submit(*args, **kwargs)
    import dask

    with dask.annotate(resources=dict(resources)):
        return task_.submit(*args, **kwargs)


def check_gpu_workers(task_runner: Any, resources: Mapping[str, float]) -> None:
    """Fail now rather than wait forever: a task annotated with `resources` runs only on a worker that
    declares them. A LocalCluster of this flow that lacks them raises; a remote cluster only warns
    (a worker may still join it)."""
    if not resources:
        return
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # pragma: no cover - prefect-dask is a dependency
        return
    if not isinstance(task_runner, DaskTaskRunner):
        return
    import distributed

    client = task_runner.client
    try:
        info = client.scheduler_info(n_workers=-1)  # every worker (newer distributed lists 5 by default)
    except TypeError:  # older distributed: always every worker
        info = client.scheduler_info()
    workers = info.get("workers", {}).values()
    if any(all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers):
        return
    want = ",".join(f"{k}={v:g}" for k, v in resources.items())
    if isinstance(getattr(client, "cluster", None), distributed.LocalCluster):
        raise ValueError(f"runtime.device asks the teachers and zip tasks for Dask resources {want}, but this "
                         f"machine's LocalCluster has no such worker (CUDA devices visible: {_visible_gpus()}); "
                         "set runtime.device to auto or cpu, lower runtime.nproc_per_node, or use --dask-address")
    log.warning("no worker of the Dask cluster declares %s yet: the teachers and zip tasks wait for one "
                "(start it with `dask worker ADDRESS --nthreads 1 --resources %s`)", want, want)


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
    return (f"zipper: {sum(map(len, done.values()))}/{total} depth steps; "
            f"calibrated depths {sorted(done['zip']) or '-'}, evaluated depths {sorted(done['evaluate']) or '-'}")


# ----------------------------------------------------------------------------------------- flow
def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_task_runner(runner: str = "thread", dask_address: str | None = None, *, n_workers: int | None = None,
                     processes: bool = True, gpus: int | None = None):
    """`thread`: a thread pool in this process. `dask`: an existing scheduler at `dask_address`, or a
    LocalCluster of `n_workers` single-threaded worker processes (torch parallelises inside each).

    The LocalCluster listens on the loopback interface only (scheduler and dashboard), and its workers
    declare the resource `GPU` = `gpus` (default: the CUDA devices this machine has, none without), so
    that GPU-annotated tasks run on it as they would on a cluster of `dask worker --resources GPU=N`.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner: expected one of {RUNNERS}, got {runner!r}")
    if runner == "thread":
        if dask_address:
            raise ValueError("a Dask scheduler address needs runner 'dask'")
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    n = n_workers if n_workers is not None else max(1, min(4, os.cpu_count() or 1))
    gpus = _visible_gpus() if gpus is None else gpus
    cluster_kwargs: dict[str, Any] = {"n_workers": n, "threads_per_worker": 1, "processes": processes,
                                      "host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:{DASHBOARD_PORT}"}
    if gpus:
        cluster_kwargs["resources"] = {"GPU": gpus}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def _default_task_runner():
    """Deployments pick their runner from the environment (prefect.yaml job_variables)."""
    return make_task_runner(os.environ.get("ZIPPER_TASK_RUNNER", "thread"),
                            os.environ.get("ZIPPER_DASK_ADDRESS") or None)


@flow(name=FLOW_NAME, task_runner=_default_task_runner(), validate_parameters=True,
      description="Zipper two or more same-architecture CNNs into one multi-task network, depth by depth.")
def zipper_pipeline(params_path: str = "params.yaml", root: str = ".",
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """data -> teachers -> features per task (parallel); zip 0..L in order; evaluate each depth as soon
    as it exists; report; register. `overrides`: dotted params keys, as `zipper <stage> --set`."""
    params = load_params(params_path, overrides or {})
    layout = Layout(Path(root).resolve())
    cli = cli_args(params_path, root, overrides)  # for the stages that run as commands (nproc_per_node > 1)
    gpu = {s: task_resources(s, params.runtime) for s in DATA_PARALLEL_STAGES}
    check_gpu_workers(FlowRunContext.get().task_runner, gpu["zip"])
    storage = layout.root / RESULTS_DIR  # a Path: Prefect makes it a LocalFileSystem, no saved block needed
    data_t, teachers_t, features_t, zip_t, evaluate_t, report_t, register_t = (
        t.with_options(result_storage=storage)
        for t in (data_task, teachers_task, features_task, zip_task, evaluate_task, report_task, register_task))
    depths = [0, *params.zipper.depths]

    progress = create_progress_artifact(0.0, key="zipper-progress",
                                        description=f"zipper: calibrate and evaluate depths {depths}")
    data = {n: data_t.submit(params, layout, n) for n in params.tasks}
    teachers = {n: submit(teachers_t, params, layout, n, cli, wait_for=[data[n]], resources=gpu["teachers"])
                for n in params.tasks}
    features = {n: features_t.submit(params, layout, n, wait_for=[teachers[n]]) for n in params.tasks}
    zips: dict[int, PrefectFuture] = {}
    evals: dict[int, PrefectFuture] = {}
    for d in depths:
        after = list(teachers.values()) if d == 0 else [zips[d - 1], *features.values()]
        zips[d] = submit(zip_t, params, layout, d, cli, wait_for=after, resources=gpu["zip"])
        side = [evals[0]] if d else []  # depth d > 0 reads the teachers' side measured at depth 0
        evals[d] = evaluate_t.submit(params, layout, d, wait_for=[zips[d], *teachers.values(), *side])
    report = report_t.submit(params, layout, wait_for=list(evals.values()))
    register = register_t.submit(params, layout, wait_for=[report, *zips.values()])

    # Progress over depths, as the chain and the evaluations finish (in whatever order they do).
    which = {**{f.task_run_id: ("zip", d) for d, f in zips.items()},
             **{f.task_run_id: ("evaluate", d) for d, f in evals.items()}}
    done: dict[str, list[int]] = {"zip": [], "evaluate": []}
    for fut in as_completed([*zips.values(), *evals.values()]):
        fut.wait()  # sets the future's final state from the task run itself, not from the API's (lagging) copy
        if fut.state.is_completed():
            stage, d = which[fut.task_run_id]
            done[stage].append(d)
        update_progress_artifact(progress, 100.0 * sum(map(len, done.values())) / (2 * len(depths)),
                                 description=_progress_text(done, 2 * len(depths)))
    ordered = [*data.values(), *teachers.values(), *features.values(), *(zips[d] for d in depths),
               *(evals[d] for d in depths), report, register]
    for fut in ordered:
        fut.wait()

    rows = [evals[d].result()["row"] for d in depths if evals[d].state.is_completed()]
    if rows:
        create_table_artifact(table_rows(rows), key="zipper-depths",
                              description=f"zipper: per-depth results ({len(rows)}/{len(depths)} depths)")
    failed = next((f for f in ordered if f.state.is_failed() or f.state.is_crashed()), None)
    if failed is not None:
        failed.result()  # raises the stage's own exception: the flow run fails with it
    unfinished = [f for f in ordered if not f.state.is_completed()]
    if unfinished:
        raise RuntimeError(f"zipper: {len(unfinished)} task(s) did not finish: {[f.state.name for f in unfinished]}")

    markdown = report.result()["markdown"]
    summary = register.result()["summary"]
    create_markdown_artifact(
        f"# zipper report\n\n{markdown}\n\nMLflow: `{summary.get('tracking_uri')}`, registered model "
        f"`{summary.get('registered_model')}`, parent run `{summary.get('parent_run_id')}`\n",
        key="zipper-report", description="zipper: per-depth accuracy, size and speed (reports/table.md)")
    return {"root": str(layout.root), "depths": rows, "register": summary}


# ------------------------------------------------------------------------------- command line
def _flow_parameters(params_path: str | os.PathLike, root: str | os.PathLike,
                     overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"params_path": str(Path(params_path).resolve()), "root": str(Path(root).resolve()),
            "overrides": dict(overrides or {})}


def run(params_path: str | os.PathLike, root: str | os.PathLike, overrides: Mapping[str, Any] | None,
        runner: str = "thread", dask_address: str | None = None) -> dict[str, Any]:
    """`zipper flow run`: the flow, now, on the thread pool or on Dask (LocalCluster or `dask_address`)."""
    pipeline = zipper_pipeline.with_options(task_runner=make_task_runner(runner, dask_address))
    return pipeline(**_flow_parameters(params_path, root, overrides))


def deployment_options(params_path: str | os.PathLike, root: str | os.PathLike,
                       overrides: Mapping[str, Any] | None, cron: str, name: str) -> dict[str, Any]:
    """What `serve` gives `Flow.serve` (and a test `Flow.to_deployment`): name, schedule, parameters."""
    from prefect.deployments.runner import EntrypointType

    # By module path: the served runs import flows.pipeline from the installed package, wherever
    # `zipper flow serve` was started (a file path would be relative to that directory).
    return {"name": name, "cron": cron, "parameters": _flow_parameters(params_path, root, overrides),
            "tags": ["zipper"], "description": f"zipper pipeline on {Path(root).resolve()}, cron {cron!r}",
            "entrypoint_type": EntrypointType.MODULE_PATH}


def serve(params_path: str | os.PathLike, root: str | os.PathLike, overrides: Mapping[str, Any] | None,
          cron: str, name: str = "zipper-scheduled") -> None:
    """`zipper flow serve`: register a deployment with this schedule and parameters, run its runs here."""
    zipper_pipeline.serve(**deployment_options(params_path, root, overrides, cron, name))
