"""MLflow: one parent run per pipeline run, one nested run and one logged model (`depth-<k>`) per depth.

The stages log as they finish (`zipper.live`), each process finding the open pipeline run in the root's
state file; `register` logs what they did not and closes it. The registry holds only what someone
promotes: `promote` registers the chosen depth's logged model (once) and points the `champion` alias at
it; never the deprecated stages.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from .config import Params, TrackingConfig
from .io import sha256_json, write_json

log = logging.getLogger(__name__)

ALIAS = "champion"
ROOT_TAG = "zipper.root"  # on a pipeline's parent run: the project root it logged
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # a user's choice of store, never ours
MODEL_TAGS = {"depth", "max_drop_pp", "pipeline_run"}  # what promote reads from a logged model
DESCRIPTION_TAG = "zipper.description"  # a logged model's summary; promote makes it its version's description
PARENT_METRICS = ("max_drop_pp", "speedup", "macs_ratio")  # on the parent run against step = depth, beside acc_<task>
PREFECT_URL_VARIABLE = "ZIPPER_PREFECT_FLOW_RUN_URL"  # Prefect's own names its flow run's id, not its URL
PREFECT_VARIABLES = {
    "PREFECT__FLOW_RUN_ID": "zipper.prefect_flow_run_id",
    PREFECT_URL_VARIABLE: "zipper.prefect_flow_run_url",
}
DEPTH_TAG = "zipper.depth"  # on a depth's nested run
LOGGED_TAG = "zipper.logged"  # on a depth's nested run once its evaluation and model are logged
CHECK_METRIC = "holdout_drop_pp_"  # + task: calibrate.until's checks on the held-out split, against step
CURVE_KEYS = ("loss", "ce", "distill", "lr")  # a calibration's per-step curves
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PACKAGE = Path(__file__).parent  # shipped inside every logged model
MODEL_REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pillow")  # what it imports, pinned as installed


def redacted(uri: str) -> str:
    """`uri` with the password of its user info replaced: what may be printed, logged or stored."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def connect(cfg: TrackingConfig, root: Path, *, set_experiment: bool = False):
    """An MlflowClient on the tracking (and registry) URI, with its store created or migrated first, and
    with `set_experiment`, the configured experiment made the active one (created if missing)."""
    import mlflow

    uri = cfg.tracking_uri(root)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # its bars would break the stages' lines
    with _store_lock(uri):  # the first use creates or migrates a sqlite store: one process at a time
        with _environment_kept(URI_VARIABLES):  # mlflow exports the URIs; no child may inherit this root's
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
        client = mlflow.MlflowClient()
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)  # the registry's store: the same file, another engine
        if set_experiment:  # created by the first of two concurrent pipelines, found by the second
            mlflow.set_experiment(cfg.experiment)
    return client


@contextmanager
def _environment_kept(names: Sequence[str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An fcntl lock beside a local sqlite store (two processes migrating one new file: one fails)."""
    parts = urlsplit(uri)
    if parts.scheme != "sqlite" or not parts.path.strip("/"):
        yield
        return
    path = Path(parts.path[1:])  # sqlite:///relative/file, sqlite:////absolute/file
    with _locked(path.with_name(f".{path.name}.lock")):
        yield


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_pipeline(params: Params, layout, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Complete and close the root's pipeline run: its params' report and teacher metrics, and every depth
    the zip and evaluate stages did not log as they ran (under DVC's or Prefect's cache they did not run)."""
    root = Path(layout.root).resolve()
    client = connect(params.tracking, root, set_experiment=True)
    parent = open_pipeline_run(client, params, layout)
    summary: dict[str, Any] = {
        "tracking_uri": redacted(params.tracking.tracking_uri(root)),
        "registered_model": params.tracking.registered_model,
        "parent_run_id": parent,
        "depths": {},
    }
    client.log_batch(parent, metrics=metric_points({f"teacher_acc_{t}": a for t, a in rows[0]["teacher_acc"].items()}))
    for path in sorted(layout.reports.glob("*")):
        if path.suffix in (".md", ".png", ".json") and path.name != "mlflow.json":
            client.log_artifact(parent, str(path), "report")
    for row in rows:
        summary["depths"][str(row["depth"])] = log_depth(client, parent, params, layout, row)
    client.set_terminated(parent, "FINISHED")
    return summary


def open_pipeline_run(client, params: Params, layout) -> str:
    """The root's open pipeline run (the parent run) for these params, started if there is none. Every stage
    process of one pipeline run finds its id in the root's state file; one left RUNNING by other params
    was interrupted and is marked FAILED."""
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    root = Path(layout.root).resolve()
    digest = sha256_json({k: v for k, v in asdict(params).items() if k != "tracking"})  # the settings it runs
    experiment_id = client.get_experiment_by_name(params.tracking.experiment).experiment_id  # connect made it
    with _locked(layout.pipeline_run.with_name(f"{layout.pipeline_run.name}.lock")):
        state = json.loads(layout.pipeline_run.read_text()) if layout.pipeline_run.is_file() else {}
        if state.get("params_sha256") == digest:
            try:
                info = client.get_run(state["run_id"]).info
            except MlflowException:  # the state of another store
                info = None
            if info and (info.status, info.lifecycle_stage, info.experiment_id) == ("RUNNING", "active", experiment_id):
                return state["run_id"]
        fail_interrupted_runs(client, experiment_id, root)
        run = client.create_run(
            experiment_id,
            run_name=f"zipper {'+'.join(params.tasks)}",
            tags={ROOT_TAG: str(root), **_made_by(params, root)},
        )
        flat = _flatten(asdict(params))
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])
        write_json(layout.pipeline_run, {"run_id": run.info.run_id, "params_sha256": digest})
        log.info("MLflow pipeline run %s started for %s", run.info.run_id, root)
        return run.info.run_id


def depth_run(client, parent: str, depth: int, *, new: bool = False):
    """The newest nested run of `depth` in pipeline run `parent`, started now if there is none. `new`: a new
    attempt (a zip stage calibrating), started after marking an unfinished earlier one FAILED."""
    from mlflow.entities import RunStatus

    experiment_id = client.get_run(parent).info.experiment_id
    found = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.`{DEPTH_TAG}` = '{depth}'",
        order_by=["attributes.start_time DESC"],
    )
    if found and not new:
        return found[0]
    for run in found:
        if run.info.status == "RUNNING":  # killed before it could say so
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
    tags = {"mlflow.parentRunId": parent, DEPTH_TAG: str(depth)}
    return client.create_run(experiment_id, run_name=f"depth {depth}", tags=tags)


def log_depth(client, parent: str, params: Params, layout, row: dict[str, Any]) -> dict[str, Any]:
    """A depth's evaluation into its newest nested run: the curve points zip did not log as they came, the
    depth's metrics, its checkpoint as logged model `depth-<k>`, its point on the parent's depth-step curves;
    then the run is tagged logged (and FINISHED). Idempotent: a retry after a failure half way adds nothing
    twice, and a run already logged is left as it is."""
    import mlflow
    from mlflow.entities import Param

    depth = row["depth"]
    run = depth_run(client, parent, depth)
    run_id = run.info.run_id
    if run.data.tags.get(LOGGED_TAG) == "true":
        return {"run_id": run_id}
    names = ("scope", "init", "targets")
    client.log_batch(run_id, params=[Param("depth", str(depth)), *(Param(k, str(row[k])) for k in names)])
    _log_missing_curves(client, run, layout.curves(depth))
    client.log_artifact(run_id, str(layout.curves(depth)), "calibration")
    calibrated = run.info.end_time if run.info.status == "FINISHED" else None  # by zip, as it ended
    logged = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        if logged:  # by an attempt that failed after it
            model_id = logged[0].model_id
        else:
            classes = Path(tmp) / "classes.json"
            classes.write_text(json.dumps({t: _classes(layout, t) for t in params.tasks}))
            model_id = mlflow.pyfunc.log_model(
                name=f"depth-{depth}",
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(layout.zipped(depth)), "classes": str(classes)},
                code_paths=[str(PACKAGE)],  # so it loads where zipper is not installed
                pip_requirements=[f"{p}=={metadata.version(p)}" for p in MODEL_REQUIREMENTS],
                signature=_signature(params.tasks),
                input_example=_input_example(params.teachers.input_size),
                tags=_model_tags(row, parent),
            ).model_id
        mlflow.log_metrics(_depth_metrics(row))
        mlflow.log_metrics(_depth_metrics(row), model_id=model_id)  # shown on the model's page
        client.log_batch(parent, metrics=metric_points(_over_depth(row), step=depth))  # MLflow's charts by depth
        client.set_tag(run_id, LOGGED_TAG, "true")
    if calibrated:  # the run's duration stays its calibration's: DVC may evaluate long after
        client.set_terminated(run_id, "FINISHED", end_time=calibrated)
    log.info("depth %d logged as MLflow run %s, model %s", depth, run_id, model_id)
    return {"run_id": run_id, "model_id": model_id}


def _classes(layout, task: str) -> list[str]:
    from .data import read_manifest

    return read_manifest(layout.shards(task), verify=False)["classes"]


def metric_points(values: dict[str, float], *, step: int = 0) -> list:
    """MLflow metric points stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def _log_missing_curves(client, run, path: Path) -> None:
    """The calibration's points its zip stage did not log as they came (not live, or resumed from a partial
    checkpoint in another process), and its held-out checks: stamped when the depth's calibration ended
    (the file's time), never the 1970 of a missing timestamp."""
    from mlflow.entities import Metric

    curves = json.loads(path.read_text())
    when = int(path.stat().st_mtime * 1000)
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    points = [
        Metric(k, float(v), when, step) for k in CURVE_KEYS for step, v in enumerate(curves[k]) if step not in logged
    ]
    if not any(k.startswith(CHECK_METRIC) for k in run.data.metrics):
        points += [
            Metric(f"{CHECK_METRIC}{t}", float(d), when, c["step"])
            for c in curves.get("checks", [])
            for t, d in c["drop_pp"].items()
        ]
    for i in range(0, len(points), 1000):
        client.log_batch(run.info.run_id, metrics=points[i : i + 1000])


def _model_tags(row: dict[str, Any], pipeline_run: str) -> dict[str, str]:
    """A depth's logged-model tags (and, once promoted, its version's): drops in points, accuracies in percent."""
    acc = ", ".join(f"{t} {100 * a:.2f}% (teacher {100 * row['teacher_acc'][t]:.2f}%)" for t, a in row["acc"].items())
    description = (
        f"Depth {row['depth']} of {' + '.join(row['acc'])}: the first {row['depth']} blocks shared "
        f"(scope {row['scope']}, init {row['init']}), calibrated {row['steps']} steps by distillation "
        f"from the teachers ({row['targets']} targets). Top-1 on val: {acc}; worst drop "
        f"{row['max_drop_pp']:.2f} points; speedup {row['speedup']:.2f}x, MACs ratio {row['macs_ratio']:.2f}x. "
        f"Pipeline run {pipeline_run}."
    )
    return {
        "depth": str(row["depth"]),
        "scope": row["scope"],
        "init": row["init"],
        "max_drop_pp": f"{row['max_drop_pp']:.4f}",
        "pipeline_run": pipeline_run,
        **{f"acc_pct_{t}": f"{100 * a:.2f}" for t, a in row["acc"].items()},
        DESCRIPTION_TAG: description,
    }


def _over_depth(row: dict[str, Any]) -> dict[str, float]:
    return {
        **{f"acc_{t}": a for t, a in row["acc"].items()},
        **{k: float(row[k]) for k in PARENT_METRICS if row.get(k) is not None},
    }


def _signature(tasks: Sequence[str]):
    """uint8 RGB images (N, H, W, 3) of any size in; one column per task out (its class names, or with
    params output=probabilities the per-class probabilities)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([ColSpec("string", t) for t in tasks]),
        params=ParamSchema([ParamSpec("output", "string", "labels")]),
    )


def _input_example(size: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)


def fail_interrupted_runs(client, experiment_id: str, root: Path) -> None:
    """Pipeline runs of this root still RUNNING that no stage will continue (called before another one
    starts): mark them and their unfinished depth runs FAILED, so that neither the UI nor `promote` takes
    them for a result."""
    from mlflow.entities import RunStatus

    running = "attributes.status = 'RUNNING'"
    for parent in client.search_runs([experiment_id], f"tags.`{ROOT_TAG}` = '{root}' and {running}"):
        children = client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' and {running}"
        )
        for run in [*children, parent]:
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        log.warning("MLflow run %s (a pipeline run of %s) was interrupted; marked FAILED", parent.info.run_id, root)


def _made_by(params: Params, root: Path) -> dict[str, str]:
    """Tags that link a pipeline run to what made it: the project's git commit and whether its tracked files
    had changes, the params' hash, and the DVC experiment or Prefect flow run that ran it, if any."""
    tags = {"zipper.params_sha256": sha256_json(asdict(params))}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    commit = git("rev-parse", "HEAD") if shutil.which("git") else None
    if commit is not None and commit.returncode == 0:
        changes = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        tags.update({"mlflow.source.git.commit": commit.stdout.strip(), "zipper.git_dirty": str(bool(changes)).lower()})
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`
        tags["zipper.dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    prefect = {v: os.environ[v] for v in PREFECT_VARIABLES if os.environ.get(v)} | flow_run_env()
    tags.update({PREFECT_VARIABLES[v]: value for v, value in prefect.items()})
    return tags


def flow_run_env() -> dict[str, str]:
    """The Prefect flow run this process belongs to, if any, as the variables `_made_by` reads: a flow passes
    them to its stage commands, which import no Prefect."""
    if "prefect" not in sys.modules:  # never imported for DVC's stage commands
        return {}
    from prefect.runtime import flow_run

    ids = {"PREFECT__FLOW_RUN_ID": flow_run.id}
    if flow_run.id:
        ids[PREFECT_URL_VARIABLE] = flow_run.ui_url  # None without a server UI
    return {k: str(v) for k, v in ids.items() if v}


def _depth_metrics(row: dict[str, Any]) -> dict[str, float]:
    m = {
        k: row.get(k)
        for k in (
            "comp_conv",
            "comp_params",
            "macs_ratio",
            "speedup",
            "memory_comp",
            "max_drop_pp",
            "final_loss",
            "steps",
            "steps_to_recover",
        )
    }
    m.update({f"acc_{t}": a for t, a in row["acc"].items()})
    m.update({f"drop_pp_{t}": d for t, d in row["drop_pp"].items()})
    return {k: float(v) for k, v in m.items() if v is not None}


def promote(
    params: Params, root: str | Path, *, max_drop: float | None = None, depth: int | None = None
) -> dict[str, Any]:
    """Register the chosen depth of the latest complete pipeline run (once) and put alias `champion` on it.

    `max_drop` (percentage points): the deepest depth whose worst per-task drop is within budget.
    """
    import mlflow

    if (max_drop is None) == (depth is None):
        raise ValueError("promote needs exactly one of --max-drop PCT or --depth K")
    client = connect(params.tracking, Path(root))
    name = params.tracking.registered_model
    latest, candidates = _latest_complete_pipeline_run(client, params, root)
    if depth is not None:
        chosen = [m for m in candidates if int(m.tags["depth"]) == depth]
        if not chosen:
            raise ValueError(f"no depth {depth} in pipeline run {latest}; depths: {[_depth(m) for m in candidates]}")
    else:
        assert max_drop is not None  # checked above: exactly one of depth and max_drop
        chosen = [m for m in candidates if float(m.tags["max_drop_pp"]) <= max_drop]
        if not chosen:
            best = min(candidates, key=lambda m: float(m.tags["max_drop_pp"]))
            raise ValueError(
                f"no depth meets --max-drop {max_drop}: the smallest worst-task drop is "
                f"{float(best.tags['max_drop_pp']):.2f} points (depth {best.tags['depth']})"
            )
    pick = chosen[-1]
    version = next((v for v in client.search_model_versions(f"name='{name}'") if v.source == pick.model_uri), None)
    if version is None:
        tags = {k: v for k, v in pick.tags.items() if not k.startswith("mlflow.") and k != DESCRIPTION_TAG}
        version = mlflow.register_model(pick.model_uri, name, tags=tags)
        client.update_model_version(name, version.version, description=pick.tags.get(DESCRIPTION_TAG))
        _log_onnx(client, pick, name, version.version)
    client.set_registered_model_alias(name, ALIAS, version.version)
    result = {
        "name": name,
        "alias": ALIAS,
        "version": version.version,
        "depth": _depth(pick),
        "max_drop_pp": float(pick.tags["max_drop_pp"]),
        "uri": f"models:/{name}@{ALIAS}",
        "model_id": pick.model_id,
        "pipeline_run": latest,
    }
    log.info(
        "promoted depth %d (worst drop %.2f pp, model %s) of pipeline run %s: %s version %s @%s",
        result["depth"],
        result["max_drop_pp"],
        pick.model_id,
        latest,
        name,
        version.version,
        ALIAS,
    )
    return result


def _depth(model) -> int:
    return int(model.tags["depth"])


def _log_onnx(client, model, name: str, version: str) -> None:
    """A promoted depth as ONNX (checked against PyTorch), logged to its run; a version tag names the file."""
    import mlflow

    from .export import export

    with tempfile.TemporaryDirectory() as tmp:
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.model_uri, dst_path=tmp))
        onnx = Path(tmp) / f"{model.name}.onnx"
        export(next(files.glob("artifacts/*.pt")), onnx)
        client.log_artifact(model.source_run_id, str(onnx), "onnx")
    client.set_model_version_tag(name, version, "onnx", f"runs:/{model.source_run_id}/onnx/{onnx.name}")


def download_champion(params: Params, root: str | Path, dst: str | Path) -> tuple[int, Path]:
    """The `champion` version's depth and its own checkpoint file, downloaded from the registry into `dst`."""
    import mlflow

    client = connect(params.tracking, Path(root))
    name = params.tracking.registered_model
    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except mlflow.exceptions.MlflowException:
        raise ValueError(
            f"registered model {name!r} has no @{ALIAS} version yet: run `zipper promote` "
            "first, or name a depth (--depth K)"
        ) from None
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@{ALIAS}", dst_path=str(dst)))
    return int(version.tags["depth"]), next(model.glob("artifacts/*.pt"))


def _latest_complete_pipeline_run(client, params: Params, root: str | Path) -> tuple[str, list]:
    """The newest pipeline run that finished logging every depth, and its logged models by depth: an
    interrupted one (RUNNING, or FAILED by the next run) may lack depths or tags."""
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    models = _logged_models(client, experiment.experiment_id) if experiment is not None else []
    complete = [m for m in models if MODEL_TAGS <= m.tags.keys()]
    # A depth calibrated again within one pipeline run (its checkpoint lost, say): its newest model counts.
    complete = list({(m.tags["pipeline_run"], m.tags["depth"]): m for m in sorted(complete, key=_created)}.values())
    for run_id in dict.fromkeys(m.tags["pipeline_run"] for m in sorted(complete, key=_created, reverse=True)):
        if client.get_run(run_id).info.status == "FINISHED":
            return run_id, sorted((m for m in complete if m.tags["pipeline_run"] == run_id), key=_depth)
    raise ValueError(
        f"no complete pipeline run in experiment {params.tracking.experiment!r} at "
        f"{redacted(params.tracking.tracking_uri(root))}: run the pipeline (register stage) first"
    )


def _created(model) -> int:
    return model.creation_timestamp


def _logged_models(client, experiment_id: str) -> list:
    models, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        models += page
        token = page.token
        if not token:
            return models
