"""MLflow: one parent run per pipeline run, one nested run per depth, one registry version per depth.

Promotion uses aliases (`champion`), never the deprecated stages.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from .config import Params, TrackingConfig

log = logging.getLogger(__name__)

ALIAS = "champion"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def _client(cfg: TrackingConfig, root: Path):
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri(root))
    mlflow.set_registry_uri(cfg.tracking_uri(root))
    return mlflow.MlflowClient()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_pipeline(params: Params, layout, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Log a finished pipeline: parent run (params, report), nested run + registered version per depth."""
    import mlflow
    from mlflow.entities import Metric

    from .data import read_manifest

    root = Path(layout.root).resolve()
    client = _client(params.tracking, root)
    mlflow.set_experiment(params.tracking.experiment)
    name = params.tracking.registered_model
    classes = {t: read_manifest(layout.shards(t), verify=False)["classes"] for t in params.tasks}
    summary: dict[str, Any] = {"tracking_uri": params.tracking.tracking_uri(root), "registered_model": name, "depths": {}}
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"zipper {'+'.join(params.tasks)}") as parent:
        summary["parent_run_id"] = parent.info.run_id
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(asdict(params)).items()})
        mlflow.log_metrics({f"teacher_acc_{t}": a for t, a in rows[0]["teacher_acc"].items()})
        for path in sorted(layout.reports.glob("*")):
            if path.suffix in (".md", ".png", ".json") and path.name != "mlflow.json":
                mlflow.log_artifact(str(path), artifact_path="report")
        classes_path = Path(tmp) / "classes.json"
        classes_path.write_text(json.dumps(classes))
        for row in rows:
            depth = row["depth"]
            with mlflow.start_run(run_name=f"depth {depth}", nested=True) as run:
                mlflow.log_params({"depth": depth, "scope": row["scope"], "init": row["init"],
                                   "targets": row["targets"]})
                mlflow.log_metrics({k: float(v) for k, v in _depth_metrics(row).items() if v is not None})
                curves = json.loads(layout.curves(depth).read_text())
                metrics = [Metric(key, float(v), 0, step) for key in ("loss", "ce", "distill", "lr")
                           for step, v in enumerate(curves[key])]
                for i in range(0, len(metrics), 1000):
                    client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000])
                mlflow.log_artifact(str(layout.curves(depth)), artifact_path="calibration")
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(MODEL_CODE), registered_model_name=name,
                    artifacts={"checkpoint": str(layout.zipped(depth)), "classes": str(classes_path)},
                    pip_requirements=["torch", "torchvision", "numpy", "pandas"])
                version = str(info.registered_model_version)
                tags = {"depth": depth, "scope": row["scope"], "init": row["init"],
                        "max_drop_pp": f"{row['max_drop_pp']:.4f}", "pipeline_run": parent.info.run_id,
                        **{f"acc_{t}": f"{a:.4f}" for t, a in row["acc"].items()}}
                for k, v in tags.items():
                    client.set_model_version_tag(name, version, k, str(v))
                summary["depths"][str(depth)] = {"run_id": run.info.run_id, "version": version}
                log.info("depth %d logged as run %s, %s version %s", depth, run.info.run_id, name, version)
    return summary


def _depth_metrics(row: dict[str, Any]) -> dict[str, Any]:
    m = {k: row[k] for k in ("comp_conv", "comp_params", "macs_ratio", "speedup", "memory_comp", "max_drop_pp",
                             "final_loss")}
    m.update({f"acc_{t}": a for t, a in row["acc"].items()})
    m.update({f"drop_pp_{t}": d for t, d in row["drop_pp"].items()})
    return m


def promote(params: Params, root: str | Path, *, max_drop: float | None = None, depth: int | None = None) -> dict[str, Any]:
    """Put alias `champion` on the chosen depth of the latest pipeline run's versions.

    `max_drop` (percentage points): the deepest depth whose worst per-task drop is within budget.
    """
    if (max_drop is None) == (depth is None):
        raise ValueError("promote needs exactly one of --max-drop PCT or --depth K")
    client = _client(params.tracking, Path(root))
    name = params.tracking.registered_model
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise ValueError(f"registered model {name!r} has no versions at {params.tracking.tracking_uri(root)}; "
                         "run the pipeline (register stage) first")
    latest = max(versions, key=lambda v: int(v.version)).tags.get("pipeline_run")
    candidates = sorted((v for v in versions if v.tags.get("pipeline_run") == latest), key=lambda v: int(v.tags["depth"]))
    if depth is not None:
        chosen = [v for v in candidates if int(v.tags["depth"]) == depth]
        if not chosen:
            raise ValueError(f"no version of {name!r} with depth {depth}; depths: {[int(v.tags['depth']) for v in candidates]}")
    else:
        chosen = [v for v in candidates if float(v.tags["max_drop_pp"]) <= max_drop]
        if not chosen:
            best = min(candidates, key=lambda v: float(v.tags["max_drop_pp"]))
            raise ValueError(f"no depth meets --max-drop {max_drop}: the smallest worst-task drop is "
                             f"{float(best.tags['max_drop_pp']):.2f} points (depth {best.tags['depth']})")
    pick = chosen[-1]
    client.set_registered_model_alias(name, ALIAS, pick.version)
    result = {"name": name, "alias": ALIAS, "version": pick.version, "depth": int(pick.tags["depth"]),
              "max_drop_pp": float(pick.tags["max_drop_pp"]), "uri": f"models:/{name}@{ALIAS}"}
    log.info("promoted %s version %s (depth %d, worst drop %.2f pp) as @%s", name, pick.version, result["depth"],
             result["max_drop_pp"], ALIAS)
    return result
