"""The Prefect front end: the real flow on a real (temporary) Prefect server, thread pool and Dask.

One temporary project carries the thread-runner tests, with as few full runs as possible: a run that
fails at depth 2 (its checkpoint's path taken by a folder), the run that resumes it (its checkpoints
compared with `dvc repro`'s), a run of the served deployment (another process) and a run after it that
both compute nothing, then a run after deleting a checkpoint. A second, smaller project (one depth,
few steps) runs on a Dask LocalCluster. Which stages a run computed comes from its task runs' states.
Wall time on 2 cores: about 3 minutes, most of it the one full pipeline and the Dask cluster.

At scale, without a GPU and without a full run each: GPU-annotated tasks on a real Dask cluster of a
GPU-declaring and a CPU-only worker (a tiny flow), the LocalCluster's loopback binding, and the
training stages that run as their `zipper` command (torchrun when runtime.nproc_per_node > 1).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import pytest
import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.task_runners import ThreadPoolTaskRunner

from zipper import stages
from zipper.config import load_params
from zipper.flows import cache, commands, pipeline, runners
from zipper.graph import Layout
from zipper.locks import RootLocked
from zipper.runtime import RuntimeConfig

from .conftest import checkpoint_digests, copy_tiny_params, holding_root

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "params.tiny.yaml"
STAGES = ("data", "teachers", "features", "zip", "evaluate", "report", "register")
# The Dask check: one depth, few steps, no memory probes (each probe is a child process importing torch).
_TINY_CHAIN = yaml.safe_load(TINY.read_text())["zipper"]["chain"]
SMALL = {
    "zipper.chain": dict(list(_TINY_CHAIN.items())[:1]) if isinstance(_TINY_CHAIN, dict) else _TINY_CHAIN[:1],
    "calibrate.steps": 5,
    "teachers.steps": 10,
    "evaluate.latency_repeats": 2,
    "evaluate.memory": False,
}


# -------------------------------------------------------------------------------------- helpers
_Expanded = tuple[dict, int | None, Callable[[str], str]]  # (body, depth or None, substitute)


def _foreach(stage: dict, chain: dict) -> list[_Expanded]:
    """(body, depth or None, substitute) per expanded dvc.yaml stage: foreach over zipper.chain."""
    if "foreach" not in stage:
        return [(stage, None, lambda s: s)]
    out: list[_Expanded] = []
    for depth, prev in chain.items():

        def sub(s: str, d=depth, p=prev) -> str:
            return s.replace("${key}", str(d)).replace("${item}", str(p))

        out.append((stage["do"], int(depth), sub))
    return out


def dvc_outputs(dvc_yaml: Path, params_file: Path) -> set[str]:
    """Every path dvc.yaml declares as an out, metric or plot, foreach expanded over zipper.chain."""
    spec = yaml.safe_load(dvc_yaml.read_text())
    chain = yaml.safe_load(params_file.read_text())["zipper"]["chain"]
    paths = set()
    for stage in spec["stages"].values():
        for body, _, sub in _foreach(stage, chain):
            for key in ("outs", "metrics", "plots"):
                for entry in body.get(key, []):
                    paths.add(sub(next(iter(entry)) if isinstance(entry, dict) else entry))
    return paths


def _state_name(run: TaskRun) -> str:
    """A task run's state name: every task run the API returns has a state, and every state a name."""
    assert run.state is not None and run.state.name is not None, run
    return run.state.name


def _computed(flow_run_id) -> dict[str, list]:
    """Stage -> the tasks or depths a flow run computed (task runs that ran, not Cached ones), from the
    Prefect API: the training stages run as commands in processes of their own."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    seen: dict[str, list] = collections.defaultdict(list)
    for r in runs:
        if _state_name(r) in ("Completed", "Failed"):
            stage = next(t.removeprefix("zipper-") for t in r.tags if t.startswith("zipper-"))
            arg = None if stage in ("report", "register") else r.name.rsplit("-", 1)[-1]
            seen[stage].append(int(arg) if arg and arg.isdigit() else arg)
    return {stage: sorted(args, key=str) for stage, args in seen.items()}


def _last_flow_run_id(root: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50)
    return next(r.id for r in runs if r.parameters.get("root") == str(root.resolve()))


def _run(root: Path, overrides: dict | None = None, **kwargs) -> tuple[dict, dict[str, list]]:
    result = pipeline.run(root / "params.yaml", root, overrides or {}, **kwargs)
    return result, _computed(_last_flow_run_id(root))


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server and PREFECT_HOME for this module (real API, sqlite in a temp dir)."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as mp:  # for child processes: the server, Dask workers
        mp.setenv("PREFECT_HOME", str(home))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
        mp.setenv("MPLBACKEND", "Agg")
        with temporary_settings(
            updates={
                PREFECT_HOME: home,
                PREFECT_SERVER_ANALYTICS_ENABLED: False,
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 90,
            }
        ):
            with prefect_test_harness(server_startup_timeout=90):
                yield


@pytest.fixture(scope="module")
def resumed(prefect_server, tmp_path_factory):
    """The tiny pipeline run twice on one project: failing at depth 2 (its checkpoint's path is taken
    by a folder, so the calibrated depth cannot be saved), then, the folder gone, resuming."""
    root = tmp_path_factory.mktemp("flow-project")
    copy_tiny_params(root / "params.yaml", live=True)
    layout = Layout(root)
    layout.zipped(2).mkdir(parents=True)
    with pytest.raises(commands.StageCommandError, match=r"zip .*--depth 2` exited(.|\n)*IsADirectoryError") as failure:
        pipeline.run(root / "params.yaml", root, {})
    first = _computed(_last_flow_run_id(root))
    layout.zipped(2).rmdir()
    after_failure = {
        p: p.stat().st_mtime_ns
        for p in [
            layout.zipped(0),
            layout.zipped(1),
            layout.metrics(1),
            layout.shards("shapes") / "manifest.json",
            layout.teacher("shapes"),
            layout.teacher("textures"),
        ]
    }
    zipped_after_failure = {d: layout.zipped(d).is_file() for d in range(4)}
    result, second = _run(root)
    return {
        "root": root,
        "layout": layout,
        "failure": failure.value,
        "first": first,
        "second": second,
        "result": result,
        "mtimes": after_failure,
        "zipped_after_failure": zipped_after_failure,
    }


# ------------------------------------------------------------------ thread runner, one project
@pytest.mark.slow
def test_failure_at_depth_2_then_resume_skips_what_was_done(resumed):
    first, second = resumed["first"], resumed["second"]
    # The failing run did everything up to depth 2 (and still evaluated depth 1, overlapping depth 2).
    assert first["data"] == first["teachers"] == first["features"] == ["shapes", "textures"]
    assert first["zip"] == [0, 1, 2] and first["evaluate"] == [0, 1]  # zip 2 failed: nothing after it ran
    assert "report" not in first and "register" not in first
    assert resumed["zipped_after_failure"] == {0: True, 1: True, 2: False, 3: False}
    # The second run resumed at depth 2: nothing before it ran again, nothing it left was rewritten.
    assert second["zip"] == [2, 3], second
    assert second["evaluate"] == [2, 3], second
    assert not {"data", "teachers", "features"} & set(second), second
    assert second["report"] == [None] and second["register"] == [None]
    assert {p: p.stat().st_mtime_ns for p in resumed["mtimes"]} == resumed["mtimes"]


@pytest.mark.slow
def test_flow_writes_what_dvc_writes(resumed):
    root, layout = resumed["root"], resumed["layout"]
    params = load_params(root / "params.yaml")
    expected = dvc_outputs(REPO / "dvc.yaml", root / "params.yaml")
    missing = sorted(
        p for p in expected if not (root / p).exists() or (root / p).is_dir() and not any((root / p).iterdir())
    )
    assert not missing, f"declared by dvc.yaml but not written by the flow: {missing}"
    for name in params.tasks:
        assert (layout.shards(name) / "manifest.json").is_file() and layout.teacher(name).is_file()
        assert any(layout.features(name).iterdir())
    for depth in [0, *params.zipper.depths]:
        assert layout.zipped(depth).is_file() and layout.curves(depth).is_file()
        assert not layout.partial(depth).exists()
        metrics = json.loads(layout.metrics(depth).read_text())
        assert metrics["depth"] == depth and set(metrics["acc"]) == set(params.tasks)
    assert set(json.loads(layout.teacher_metrics.read_text())) == set(params.tasks)
    assert "| 3 |" in (layout.reports / "table.md").read_text()
    summary = json.loads((layout.reports / "mlflow.json").read_text())
    assert summary["tracking_uri"] == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    assert summary == resumed["result"]["register"]
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    tags = MlflowClient(summary["tracking_uri"], summary["tracking_uri"]).get_run(summary["parent_run_id"]).data.tags
    with get_client(sync_client=True) as client:  # the MLflow run names the flow run that registered it
        runs = {str(r.id) for r in client.read_flow_runs() if r.parameters.get("root") == str(root.resolve())}
    assert tags["zipper.prefect_flow_run_id"] in runs
    assert [row["depth"] for row in resumed["result"]["depths"]] == [0, 1, 2, 3]


@pytest.mark.slow
def test_flow_and_dvc_repro_write_identical_checkpoints(resumed, dvc_project):
    """Same params, same machine: the flow (failed at depth 2, then resumed) and `dvc repro` write the same
    teacher and zipped checkpoints, byte for byte."""
    flow, dvc = checkpoint_digests(resumed["root"]), json.loads((dvc_project / "first_repro.json").read_text())
    assert len(flow) == 2 + 4 and flow == dvc  # two teachers, depths 0-3


@pytest.mark.slow
def test_a_flow_run_refuses_a_root_another_run_holds(prefect_server, tmp_path):
    shutil.copy(TINY, tmp_path / "params.yaml")
    with holding_root(tmp_path, "zipper data"):
        with pytest.raises(RootLocked, match=r"in use by pid \d+: zipper data"):
            pipeline.run(tmp_path / "params.yaml", tmp_path, {})
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_run_publishes_progress_table_and_report_artifacts(resumed):
    from prefect.artifacts import Artifact

    progress = Artifact.get("zipper-progress")
    assert progress.type == "progress" and float(progress.data) == 100.0
    calibration = Artifact.get("zipper-calibration")  # followed the last depth's steps to its end
    assert float(calibration.data) == 100.0 and re.fullmatch(r"depth 3: step (\d+)/\1", calibration.description)
    table = Artifact.get("zipper-depths")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["depth"] for r in rows] == [0, 1, 2, 3] and {"acc_shapes", "speedup", "comp_conv"} <= set(rows[0])
    report = Artifact.get("zipper-report")
    assert report.type == "markdown" and "| 3 |" in report.data


@pytest.mark.slow
def test_flow_runs_are_named_after_their_project_and_start(resumed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = [r.name for r in client.read_flow_runs() if r.parameters.get("root") == str(resumed["root"].resolve())]
    pattern = rf"zipper-{re.escape(resumed['root'].name)}-\d{{8}}-\d{{6}}"
    assert names and all(re.fullmatch(pattern, n) for n in names), names


def _logged_models(root: Path) -> int:
    from mlflow import MlflowClient

    params = load_params(root / "params.yaml")
    client = MlflowClient(params.tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    assert experiment is not None, "the flow logged nothing"
    return len(client.search_logged_models([experiment.experiment_id]))


def _served_run(root: Path) -> list[str]:
    """`zipper flow serve` in its own process; one run of its deployment; the state names of its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    command = [
        "flow",
        "serve",
        "--params",
        str(root / "params.yaml"),
        "--root",
        str(root),
        "--cron",
        "0 3 * * *",
        "--name",
        "served",
    ]
    serve = subprocess.Popen(
        [sys.executable, "-m", "zipper.cli", *command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        flow_run = None
        for _ in range(120):  # the deployment appears once serve has registered it
            try:
                flow_run = run_deployment(f"{pipeline.FLOW_NAME}/served", timeout=300)
                break
            except ObjectNotFound:
                assert serve.poll() is None, "zipper flow serve exited"
                time.sleep(1)
        assert isinstance(flow_run, FlowRun), flow_run  # None if serve never registered it; run_deployment is sync here
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        return sorted(_state_name(r) for r in runs)
    finally:
        serve.terminate()
        serve.wait(timeout=60)


@pytest.mark.slow
def test_served_run_then_run_again_compute_nothing(resumed):
    """A cache filled by `zipper flow run` serves the deployment's runs (another process, started from its
    module path) and the next `zipper flow run`: every stage task is Cached, no model is logged again."""
    root = resumed["root"]
    logged = _logged_models(root)
    states = _served_run(root)
    assert states and set(states) == {"Cached"}, states
    result, calls = _run(root)
    assert calls == {}, calls
    assert result["register"] == resumed["result"]["register"]
    assert _logged_models(root) == logged


@pytest.mark.slow
def test_deleted_checkpoint_reruns_only_its_depth(resumed):
    layout = resumed["layout"]
    layout.zipped(3).unlink()
    _, calls = _run(resumed["root"])
    # Recalibrated to the same bytes (checkpoints hold no timestamps, the calibration is seeded): the
    # evaluation, report and registration that read it stay cached.
    assert calls == {"zip": [3]}, calls
    assert layout.zipped(3).is_file()


# ------------------------------------------------------------------------------------------ Dask
@pytest.mark.slow
def test_dask_local_cluster_runs_the_flow(prefect_server, tmp_path):
    """prefect-dask on a LocalCluster of worker processes, as `zipper flow run --runner dask` makes it
    (processes=True: about 35 s slower here than processes=False, but it is what pickles tasks, params
    and results across processes). One depth, few steps."""
    shutil.copy(TINY, tmp_path / "params.yaml")
    result = pipeline.run(tmp_path / "params.yaml", tmp_path, SMALL, runner="dask")
    layout = Layout(tmp_path)
    assert [row["depth"] for row in result["depths"]] == [0, 1]
    assert all(layout.zipped(d).is_file() and layout.metrics(d).is_file() for d in (0, 1))
    assert (layout.reports / "mlflow.json").is_file()
    # Keys computed in the worker processes are the keys computed here: switching runners reruns nothing.
    _, calls = _run(tmp_path, SMALL)
    assert calls == {}, calls


@task(cache_policy=NO_CACHE)
def _worker_name(i: int) -> str:
    from distributed import get_worker

    return get_worker().name


@pytest.mark.spawns
def test_gpu_tasks_run_only_on_workers_that_declare_a_gpu(prefect_server):
    """A real Dask cluster (in-process workers, TCP on loopback): one worker started as with
    `--resources GPU=1`, one CPU-only. The flow's own helpers annotate the submissions; no torch on CUDA."""
    from distributed import Scheduler, SpecCluster, Worker

    cuda, cpu = RuntimeConfig(device="cuda"), RuntimeConfig(device="cpu")
    assert runners.task_resources("zip", cuda) == runners.task_resources("teachers", cuda) == {"GPU": 1}
    assert runners.task_resources("teachers", RuntimeConfig(device="cuda:1", nproc_per_node=4)) == {"GPU": 4}
    assert runners.task_resources("evaluate", cuda) == runners.task_resources("features", cuda) == {}
    assert runners.task_resources("zip", cpu) == runners.task_resources("zip", RuntimeConfig()) == {}  # auto: nothing

    host = {"host": runners.LOOPBACK}
    spec = {
        "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}, **host}},
        "cpu": {"cls": Worker, "options": {"nthreads": 1, **host}},
    }
    with SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": f"{runners.LOOPBACK}:0", **host}}, workers=spec
    ) as cluster:
        runner = runners.make_task_runner("dask", cluster.scheduler_address)  # as `--dask-address`

        @flow(task_runner=runner)
        def placement() -> dict[str, list[str]]:
            from prefect.context import FlowRunContext

            gpu = runners.task_resources("zip", cuda)
            ctx = FlowRunContext.get()
            assert ctx is not None  # inside this flow's run
            runners.check_gpu_workers(ctx.task_runner, gpu)  # there is one: no error
            on_gpu = [runners.submit(_worker_name, i, resources=gpu) for i in range(4)]
            anywhere = [
                runners.submit(_worker_name, i, resources=runners.task_resources("evaluate", cuda)) for i in range(4, 8)
            ]
            return {"gpu": [f.result() for f in on_gpu], "any": [f.result() for f in anywhere]}

        placed = placement()
        assert placed["gpu"] == ["gpu"] * 4, placed  # never the CPU-only worker
        assert set(placed["any"]) <= {"gpu", "cpu"}, placed


def test_local_cluster_listens_on_loopback_and_refuses_gpu_tasks_it_cannot_run():
    """`zipper flow run --runner dask`: scheduler and dashboard bound to 127.0.0.1 (the sockets, not only
    the advertised link: Dask's default binds the dashboard to every interface); no GPU worker, no wait."""
    import psutil

    assert runners.make_task_runner("dask", gpus=2).cluster_kwargs["resources"] == {"GPU": 2}
    runner = runners.make_task_runner("dask", n_workers=0, gpus=0)  # the CLI's kwargs, without worker processes
    assert "resources" not in runner.cluster_kwargs
    with runner:
        client = runner.client
        scheduler, dashboard = urlparse(client.scheduler.address), urlparse(client.dashboard_link)
        assert scheduler.scheme == "tcp" and scheduler.hostname == dashboard.hostname == "127.0.0.1"
        me = psutil.Process()
        listening = {
            c.laddr.port: c.laddr.ip
            for c in getattr(me, "net_connections", me.connections)(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening[scheduler.port] == listening[dashboard.port] == "127.0.0.1", listening
        with pytest.raises(ValueError, match="LocalCluster has no such worker"):
            runners.check_gpu_workers(runner, {"GPU": 1})
    runners.check_gpu_workers(ThreadPoolTaskRunner(), {"GPU": 1})  # not Dask: nothing to check


def test_training_stages_run_as_their_command_with_the_threads_dvc_gives_them(tmp_path, monkeypatch):
    """teachers and zip run `zipper <stage> ...` (which relaunches under torchrun when nproc_per_node > 1)
    with the flow run's params file, root and overrides, under the flow's root lock, each teacher with the
    threads `zipper teachers` gives its task's process; the other stages run in-process."""
    from zipper import locks, runtime
    from zipper.cli import build_parser
    from zipper.config import parse_overrides

    overrides = {
        "runtime.threads": 4,
        "calibrate.lr": 1e-5,
        "zipper.chain": {"1": 0},
        "tracking.uri": "",
        "tracking.live": False,  # the stubbed evaluation has no row to log
    }
    params = load_params(TINY, overrides)
    layout = Layout(tmp_path)
    cli = commands.cli_args(TINY, tmp_path, overrides)
    ran, threads, in_process = [], [], []
    monkeypatch.setattr(commands, "run_command", lambda cmd, *a, env=None, **k: ran.append((cmd, env)))
    monkeypatch.setattr(runtime, "set_threads", threads.append)
    for name in STAGES:
        monkeypatch.setattr(stages, f"run_{name}", lambda *a, _n=name, **k: in_process.append(_n) or {"shapes": 0.5})
    layout.teacher_metrics.parent.mkdir(parents=True)
    layout.teacher_metrics.write_text(json.dumps({"shapes": {"val_acc": 0.75}}))

    assert pipeline.teachers_task.fn(params, layout, "shapes", cli)["val_acc"] == 0.75
    pipeline.zip_task.fn(params, layout, 1, cli)
    assert in_process == [] and threads == []
    expected = (("teachers", ["--task", "shapes", "--threads", "2"]), ("zip", ["--depth", "1"]))
    for (cmd, env), (stage, extra) in zip(ran, expected):
        assert cmd[:4] == [sys.executable, "-m", "zipper.cli", stage] and cmd[-len(extra) :] == extra
        args = build_parser().parse_args(cmd[3:])  # what the command line will parse
        assert (Path(args.params), Path(args.root)) == (TINY.resolve(), tmp_path.resolve())
        assert parse_overrides(args.set) == overrides
        assert env == {locks.HELD_ENV: str((tmp_path / locks.ROOT_LOCK).resolve())}
    with pytest.raises(ValueError, match="command-line options"):
        pipeline.zip_task.fn(params, layout, 1)
    pipeline.evaluate_task.fn(params, layout, 1)
    assert in_process == ["evaluate"] and threads == [4] and len(ran) == 2


def test_run_command_streams_its_output_and_fails_with_its_last_lines(caplog):
    logger = logging.getLogger("zipper.test.command")
    script = "import sys\nfor i in range(60): print('line', i)\nprint('boom', file=sys.stderr)\nsys.exit(3)"
    with caplog.at_level(logging.INFO, logger=logger.name):
        with pytest.raises(commands.StageCommandError, match="exited with status 3") as failure:
            commands.run_command([sys.executable, "-c", script], logger)
        commands.run_command([sys.executable, "-c", "print('fine')"], logger)
    logged = [r.getMessage() for r in caplog.records]
    assert "line 0" in logged and "boom" in logged and "fine" in logged  # every line, stderr too
    message = str(failure.value)
    assert message.endswith("line 59\nboom") and "line 21\n" in message and "line 20\n" not in message


# ------------------------------------------------------------------------- no server needed
def test_cache_key_follows_inputs_params_and_code_not_the_run(tmp_path):
    params = load_params(TINY)
    layout = Layout(tmp_path)
    (layout.shards("shapes")).mkdir(parents=True)
    (layout.shards("shapes") / "manifest.json").write_text("{}")
    layout.teacher("shapes").parent.mkdir(parents=True)
    layout.teacher("shapes").write_bytes(b"weights")
    key = cache.stage_key("features", params, layout, "shapes")
    assert cache.stage_key("features", params, layout, "shapes") == key
    assert cache.stage_key("features", params, layout, "textures") != key
    layout.teacher("shapes").write_bytes(b"other weights")
    changed = cache.stage_key("features", params, layout, "shapes")
    assert changed != key
    assert cache.stage_key("features", load_params(TINY, {"features.batch_size": 7}), layout, "shapes") != changed
    assert cache.stage_key("features", load_params(TINY, {"calibrate.lr": 0.5}), layout, "shapes") == changed
    state = cache.output_state("teachers", params, layout, "shapes")
    assert not cache.outputs_complete(state)  # teachers.json has no entry for it yet


def test_retries_only_on_io_errors():
    from prefect.states import Failed

    def retry(exc):
        return pipeline.retry_on_io_error(None, None, Failed(data=exc))

    assert retry(OSError(5, "Input/output error")) and retry(TimeoutError()) and retry(ConnectionResetError())
    assert not retry(FileNotFoundError("models/zip/depth_1.pt"))
    assert not retry(RuntimeError("boom")) and not retry(FloatingPointError("nan")) and not retry(ValueError("x"))


def test_serve_options_and_prefect_yaml():
    from prefect.flows import load_flow_from_entrypoint

    deployment = pipeline.zipper_pipeline.to_deployment(
        **pipeline.deployment_options("params.yaml", ".", {"calibrate.steps": 5}, "0 3 * * *", "nightly")
    )
    assert deployment.name == "nightly" and deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.entrypoint == "zipper.flows.pipeline.zipper_pipeline"  # importable wherever serve runs
    assert deployment.parameters == {
        "params_path": str(Path("params.yaml").resolve()),
        "root": str(Path(".").resolve()),
        "overrides": {"calibrate.steps": 5},
    }
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert config["deployments"]
    for dep in config["deployments"]:
        entry = dep["entrypoint"]
        flow = load_flow_from_entrypoint(str(REPO / entry.split(":")[0]) + ":" + entry.split(":")[1])
        assert flow.name == pipeline.FLOW_NAME
        assert set(dep["parameters"]) == {"params_path", "root", "overrides"}
        env = dep["work_pool"]["job_variables"]["env"]
        assert dep["work_pool"]["name"] and env["ZIPPER_TASK_RUNNER"] in runners.RUNNERS
