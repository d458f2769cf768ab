"""Where the flow's tasks run: a thread pool, or Dask (a LocalCluster on the loopback interface, or a
cluster's scheduler), with GPU worker resources for the data-parallel stages."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner

from zipper.graph import DATA_PARALLEL_STAGES
from zipper.runtime import RuntimeConfig

log = logging.getLogger(__name__)

RUNNERS = ("thread", "dask")
LOOPBACK = "127.0.0.1"  # where a LocalCluster's scheduler and dashboard listen
DASHBOARD_PORT = 8787  # Dask's usual one; another free port when it is taken


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
        raise ValueError(
            f"runtime.device asks the teachers and zip tasks for Dask resources {want}, but this "
            f"machine's LocalCluster has no such worker (CUDA devices visible: {_visible_gpus()}); "
            "set runtime.device to auto or cpu, lower runtime.nproc_per_node, or use --dask-address"
        )
    log.warning(
        "no worker of the Dask cluster declares %s yet: the teachers and zip tasks wait for one "
        "(start it with `dask worker ADDRESS --nthreads 1 --resources %s`)",
        want,
        want,
    )


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_task_runner(
    runner: str = "thread",
    dask_address: str | None = None,
    *,
    n_workers: int | None = None,
    processes: bool = True,
    gpus: int | None = None,
):
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
    cluster_kwargs: dict[str, Any] = {
        "n_workers": n,
        "threads_per_worker": 1,
        "processes": processes,
        "host": LOOPBACK,
        "dashboard_address": f"{LOOPBACK}:{DASHBOARD_PORT}",
    }
    if gpus:
        cluster_kwargs["resources"] = {"GPU": gpus}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def default_task_runner():
    """Deployments pick their runner from the environment (prefect.yaml job_variables)."""
    return make_task_runner(
        os.environ.get("ZIPPER_TASK_RUNNER", "thread"), os.environ.get("ZIPPER_DASK_ADDRESS") or None
    )
