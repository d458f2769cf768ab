"""The real pipeline: `dvc repro` on the tiny params in a temporary git repo, MLflow registry, promote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import zipper
from zipper.preprocess import normalise, resize_center

from .conftest import REPO, before_register, cli_env, digests, git, run_ok, stages_ran

DEPTHS = [0, 1, 2, 3]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(dvc_project) -> Path:
    return dvc_project


def test_repro_writes_every_depth_and_logs_it_to_mlflow(project):
    import mlflow

    for depth in DEPTHS:
        assert (project / f"models/zip/depth_{depth}.pt").is_file()
        metrics = json.loads((project / f"metrics/depth_{depth}.json").read_text())
        assert metrics["depth"] == depth and set(metrics["acc"]) == {"shapes", "textures"}
        assert metrics["comp_conv"] >= 1.0 and metrics["speedup"] > 0
    side = json.loads((project / "metrics/depth_0.json").read_text())["teachers_side"]  # measured once, here
    deepest = json.loads((project / "metrics/depth_3.json").read_text())
    assert deepest["macs_ratio"] == pytest.approx(side["teacher_macs"] / deepest["macs"])
    assert "| 3 |" in (project / "reports/table.md").read_text()
    summary = json.loads((project / "reports/summary.json").read_text())
    assert set(summary) == {"teacher_acc", "depth_1", "depth_2", "depth_3"}
    assert set(summary["depth_3"]) == {"worst_drop", "acc_shapes", "acc_textures", "speedup", "macs_ratio"}
    shown = json.loads(run_ok(project, "dvc", "metrics", "show", "--json"))
    assert list(next(iter(shown.values()))["data"]) == ["reports/summary.json"]  # the one metrics file
    for figure in ("accuracy", "ratios"):
        assert (project / f"reports/{figure}.png").stat().st_size > 1000
        assert "<svg" in (project / f"reports/{figure}.svg").read_text()
    depth_rows = json.loads((project / "reports/depths.json").read_text())
    teacher = summary["teacher_acc"]["shapes"]  # rounded to 0.01 point there
    assert all(row["teacher_shapes"] == pytest.approx(teacher, abs=0.005) for row in depth_rows)
    summary = json.loads((project / "reports/mlflow.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    assert summary["tracking_uri"] == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(int(r.data.params["depth"]) for r in children) == DEPTHS
    deepest = next(r for r in children if r.data.params["depth"] == "3")
    loss = client.get_metric_history(deepest.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(10))  # calibrate.steps, each logged once, as it came
    times = [m.timestamp for m in loss]
    assert deepest.info.start_time <= times[0] and times == sorted(times) and times[-1] <= deepest.info.end_time
    models = client.search_logged_models([parent.info.experiment_id])
    assert sorted((m.name, m.tags["pipeline_run"]) for m in models) == [
        (f"depth-{d}", parent.info.run_id) for d in DEPTHS
    ]
    assert not client.search_model_versions(f"name='{summary['registered_model']}'")  # only promoted depths are
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "max_drop_pp")] == DEPTHS  # chart by depth


def test_train_val_drop_reads_the_drops_evaluate_wrote(project):
    """benchmarks/train_val_drop.py measures val as the evaluate stage does, and train beside it."""
    out = run_ok(project, sys.executable, str(REPO / "benchmarks/train_val_drop.py"), str(project))
    lines = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    header, rows = [c.strip() for c in lines[0]], {r[0].strip(): r for r in lines[1:]}
    assert header[1:] == ["shapes train", "shapes val", "textures train", "textures val"]
    assert sorted(rows) == ["1", "2", "3", "teacher accuracy"]
    teacher_acc = json.loads((project / "metrics/depth_0.json").read_text())["teacher_acc"]
    for task in ("shapes", "textures"):
        teacher = rows["teacher accuracy"][header.index(f"{task} val")]
        assert float(teacher) == pytest.approx(100 * teacher_acc[task], abs=0.006)
    for depth in DEPTHS[1:]:
        metrics = json.loads((project / f"metrics/depth_{depth}.json").read_text())
        for task in ("shapes", "textures"):
            drop, agree = rows[str(depth)][header.index(f"{task} val")].replace("(", "").replace(")", "").split()
            assert float(drop) == pytest.approx(metrics["drop_pp"][task], abs=0.006)
            assert 0 <= float(agree) <= 100


def test_each_depth_is_in_mlflow_as_soon_as_it_is_evaluated(project):
    """While `dvc repro` runs, before register: the pipeline run is open, depths 0 and 1 (zip, evaluate) are
    finished nested runs with their curves and logged models, deeper ones not there yet; register then
    completes that same pipeline run instead of starting another."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{before_register(project)}")
    experiment = client.get_experiment_by_name("zipper").experiment_id
    [parent] = client.search_runs([experiment], "tags.`zipper.root` != ''")
    assert parent.info.status == "RUNNING"
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    depth = {r.data.tags["zipper.depth"]: r for r in runs}
    assert sorted(depth) == ["0", "1"] and depth["0"].info.status == "FINISHED"  # evaluate@1 needs depth 0's
    done = depth["1"].info
    assert done.status == "FINISHED" and done.end_time - done.start_time > 0
    assert done.start_time > 1.7e12  # 2023 on: real timestamps
    assert "acc_shapes" in depth["1"].data.metrics and len(client.get_metric_history(done.run_id, "loss")) == 10
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "acc_shapes")) == [0, 1]  # by depth
    assert sorted(m.name for m in client.search_logged_models([experiment])) == ["depth-0", "depth-1"]
    summary = json.loads((project / "reports/mlflow.json").read_text())
    assert summary["parent_run_id"] == parent.info.run_id and summary["depths"]["1"]["run_id"] == done.run_id


def test_promote_and_load_the_champion_with_pyfunc(project, monkeypatch):
    import mlflow
    import onnxruntime

    promote = ["zipper", "promote", "--depth", "2"]
    promoted, again = (
        json.loads(
            subprocess.run(promote, cwd=project, env=cli_env(), capture_output=True, text=True, check=True).stdout
        )
        for _ in range(2)
    )
    assert promoted["depth"] == 2 and again["version"] == promoted["version"]  # registered once
    bad = subprocess.run(
        ["zipper", "promote", "--max-drop", "-1000"], cwd=project, env=cli_env(), capture_output=True, text=True
    )
    assert bad.returncode == 2 and "no depth meets --max-drop -1000" in bad.stderr
    summary = json.loads((project / "reports/mlflow.json").read_text())
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # mlflow exports them: gone after the test
        monkeypatch.setenv(name, summary["tracking_uri"])
    mlflow.set_tracking_uri(summary["tracking_uri"])
    mlflow.set_registry_uri(summary["tracking_uri"])  # other tests in this process may have set another
    version = mlflow.MlflowClient().get_model_version(summary["registered_model"], promoted["version"])
    assert version.source == f"models:/{promoted['model_id']}" and version.description.startswith(
        "Depth 2 of shapes + textures"
    )
    assert {"acc_pct_shapes", "acc_pct_textures", "max_drop_pp", "pipeline_run"} <= version.tags.keys()
    onnx = onnxruntime.InferenceSession(mlflow.artifacts.download_artifacts(version.tags["onnx"]))
    assert [o.name for o in onnx.get_outputs()] == ["shapes", "textures"]  # the ONNX graph beside the version
    model = mlflow.pyfunc.load_model(f"models:/{summary['registered_model']}@champion")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pred = model.predict(images)
    classes = {
        t: json.loads((project / f"data/shards/{t}/manifest.json").read_text())["classes"]
        for t in ("shapes", "textures")
    }
    assert list(pred.columns) == ["shapes", "textures"] and len(pred) == 5
    assert all(c in classes[t] for t in pred.columns for c in pred[t])
    assert model.metadata.get_input_schema().inputs[0].type == np.dtype(np.uint8)
    # Any image size, preprocessed as the validation stream does (shorter side, centre crop), and probabilities.
    wide = np.random.default_rng(1).integers(0, 256, (3, 40, 64, 3), dtype=np.uint8)
    probs = model.predict(wide, params={"output": "probabilities"})
    net = zipper.load(project / "models/zip/depth_2.pt").eval()
    crops = np.stack([np.asarray(resize_center(Image.fromarray(img), 16)) for img in wide])
    with torch.no_grad():
        expected = net(normalise(crops))
    for t in ("shapes", "textures"):
        got = np.stack(probs[t].to_list())
        assert got.shape == (3, len(classes[t])) and np.allclose(got, expected[t].softmax(1).numpy(), atol=1e-6)


# Loads a logged model in a process where the installed zipper is hidden: what it needs must ship inside it.
_LOAD_WITHOUT_ZIPPER = """
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
assert importlib.util.find_spec("zipper") is None, "zipper is still importable"
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
pred = model.predict(np.zeros((2, 40, 50, 3), np.uint8))
import zipper
print(zipper.__file__, *pred.columns)
"""


def test_the_champion_loads_where_zipper_is_not_installed(project, tmp_path):
    import mlflow

    summary = json.loads((project / "reports/mlflow.json").read_text())
    model = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{summary['registered_model']}@champion",
        dst_path=str(tmp_path),
        tracking_uri=summary["tracking_uri"],
        registry_uri=summary["tracking_uri"],
    )
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_ZIPPER, model], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin, *columns = proc.stdout.split()
    assert Path(origin).is_relative_to(model) and columns == ["shapes", "textures"]
    requirements = (Path(model) / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in [r.split("+")[0] for r in requirements]


def test_export_writes_the_champion_as_onnx_that_matches_pytorch(project, tmp_path):
    import onnxruntime

    def export(*args: str) -> dict:
        proc = subprocess.run(["zipper", "export", *args], cwd=project, env=cli_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    champion = export()  # depth 2, promoted above: its checkpoint comes from the registry
    assert champion["depth"] == 2 and champion["onnx"] == str((project / "models/onnx/depth_2.onnx").resolve())
    assert max(champion["max_abs_diff"].values()) < 1e-3
    named = export("--depth", "2", "--onnx", str(tmp_path / "d2.onnx"))
    images = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    outputs = [
        onnxruntime.InferenceSession(path).run(None, {"images": images}) for path in (champion["onnx"], named["onnx"])
    ]
    assert [o.name for o in onnxruntime.InferenceSession(named["onnx"]).get_outputs()] == ["shapes", "textures"]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(*outputs))  # the registry's checkpoint is the file's


def test_second_repro_runs_nothing(project):
    out = run_ok(project, "dvc", "repro")
    assert stages_ran(out) == set(), out


def test_a_clone_pulls_every_output_from_the_remote_and_reproduces_nothing(project, tmp_path):
    """Push to a DVC remote, commit, clone: `dvc pull` gives the clone every output and `dvc repro` runs nothing.

    Runs on the project as `dvc repro` left it, so it comes before the tests that change it.
    """
    remote = tmp_path / "remote"
    run_ok(project, "dvc", "remote", "add", "--default", "--force", "shared", str(remote))
    run_ok(project, "dvc", "push")
    assert "in sync" in run_ok(project, "dvc", "status", "--cloud")
    git(project, "add", "--all")
    git(project, "commit", "-q", "-m", "pipeline results")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))  # code, params, dvc.yaml/.lock, metrics, reports
    run_ok(clone, "dvc", "pull")

    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    outs = sorted({o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])})
    assert {
        "data/shards",
        "models/teachers",
        "data/features",
        "metrics/teachers.json",
        "models/zip/depth_3.pt",
        "metrics/depth_3.json",
        "reports/table.md",
        "reports/depths.json",
        "reports/mlflow.json",
    } <= set(outs)
    missing = [o for o in outs if not (clone / o).exists()]
    assert not missing, (
        f"a clone cannot get {missing} (neither committed to git nor pushed to the remote): "
        "make them cached outputs (no `cache: false`) or commit them"
    )
    for out in outs:
        assert digests(clone / out) == digests(project / out), out

    status = run_ok(clone, "dvc", "status")
    assert "Data and pipelines are up to date" in status, status
    out = run_ok(clone, "dvc", "repro")
    assert "Running stage" not in out and stages_ran(out) == set(), out


def test_deleting_the_last_depth_reruns_only_it_and_what_follows(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["zip@3"]["outs"] if o["path"] == "models/zip/depth_3.pt")
    (project / "models/zip/depth_3.pt").unlink()
    # Lose the cached copy too, else DVC just checks the file out of its cache again.
    (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()
    ran = stages_ran(run_ok(project, "dvc", "repro"))
    # Recalibrated to the same bytes (seeded, and no timestamps in a checkpoint): nothing after it reruns.
    assert ran == {"zip@3"}, ran


def test_changing_init_reruns_every_depth_and_its_evaluation(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["zipper"]["init"] = "weights"
    params["tracking"]["live"] = False  # register logs the new run: seven stages spared an MLflow import each
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = stages_ran(run_ok(project, "dvc", "repro"))
    assert {"zip@1", "zip@2", "zip@3", "evaluate@1", "evaluate@2", "evaluate@3", "report"} <= ran, ran
    assert not ran & {"data", "teachers", "features", "zip0", "evaluate0"}, ran
    # Each row says the init its checkpoint was made with; the report says it too.
    assert [json.loads((project / f"metrics/depth_{d}.json").read_text())["init"] for d in DEPTHS] == [
        None,
        "weights",
        "weights",
        "weights",
    ]
    assert "init `weights`" in (project / "reports/table.md").read_text()


def test_an_interrupted_register_is_marked_failed_and_never_promoted(project):
    """A kill inside `register` leaves a RUNNING pipeline run and logged models without their tags: promote
    picks the last complete run (and says which); the next register marks the killed one FAILED."""
    import mlflow

    from zipper.tracking import ROOT_TAG, fail_interrupted_runs

    summary = json.loads((project / "reports/mlflow.json").read_text())
    client = mlflow.MlflowClient(summary["tracking_uri"], summary["tracking_uri"])
    experiment = client.get_experiment_by_name("zipper").experiment_id
    killed = client.create_run(experiment, tags={ROOT_TAG: str(project.resolve())}).info.run_id
    client.create_logged_model(experiment, name="depth-0", source_run_id=killed, tags={"pipeline_run": killed})
    client.create_logged_model(  # newer and complete, but of a run that never finished
        experiment,
        name="depth-1",
        source_run_id=killed,
        tags={"pipeline_run": killed, "depth": "1", "max_drop_pp": "0"},
    )
    promoted = subprocess.run(
        ["zipper", "promote", "--max-drop", "100"], cwd=project, env=cli_env(), capture_output=True, text=True
    )
    picked = json.loads(promoted.stdout)
    assert picked["pipeline_run"] == summary["parent_run_id"] != killed
    fail_interrupted_runs(client, experiment, project.resolve())  # what `zipper register` does first
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
