"""The real pipeline: `dvc repro` on the tiny params in a temporary git repo, MLflow registry, promote."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "params.tiny.yaml"
DEPTHS = [0, 1, 2, 3]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's zipper and dvc
    env.setdefault("MPLBACKEND", "Agg")
    env["DVC_NO_ANALYTICS"] = "1"  # no network here; the analytics daemon only costs time
    return env


def _run(cwd: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _git(cwd: Path, *args: str) -> str:
    return _run(cwd, "git", "-c", "user.name=zipper tests", "-c", "user.email=tests@zipper.invalid",
                "-c", "commit.gpgsign=false", *args)


def _digests(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (by relative path)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC project holding our dvc.yaml, the tiny params and the code the stages depend on."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(TINY, root / "params.yaml")
    shutil.copytree(REPO / "zipper", root / "zipper", ignore=shutil.ignore_patterns("__pycache__"))
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    # The repo's own ignore rules: what git commits (and so what a clone gets) and what DVC hashes.
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    out = _run(root, "dvc", "repro")
    (root / "first_repro.log").write_text(out)
    return root


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
    shown = json.loads(_run(project, "dvc", "metrics", "show", "--json"))
    assert list(next(iter(shown.values()))["data"]) == ["reports/summary.json"]  # the one metrics file
    assert (project / "reports/accuracy.png").stat().st_size > 1000
    summary = json.loads((project / "reports/mlflow.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"], registry_uri=summary["tracking_uri"])
    assert summary["tracking_uri"] == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(r.data.params["depth"]) for r in children) == DEPTHS
    deepest = next(r for r in children if r.data.params["depth"] == "3")
    assert len(client.get_metric_history(deepest.info.run_id, "loss")) == 10  # calibrate.steps
    versions = client.search_model_versions(f"name='{summary['registered_model']}'")
    assert sorted(int(v.tags["depth"]) for v in versions) == DEPTHS


def test_promote_and_load_the_champion_with_pyfunc(project):
    import mlflow

    out = _run(project, "zipper", "promote", "--depth", "2")
    assert '"depth": 2' in out
    bad = subprocess.run(["zipper", "promote", "--max-drop", "-1000"], cwd=project, env=_env(), capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "no depth meets --max-drop -1000" in bad.stderr
    summary = json.loads((project / "reports/mlflow.json").read_text())
    mlflow.set_tracking_uri(summary["tracking_uri"])
    mlflow.set_registry_uri(summary["tracking_uri"])  # other tests in this process may have set another
    model = mlflow.pyfunc.load_model(f"models:/{summary['registered_model']}@champion")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pred = model.predict(images)
    classes = {t: json.loads((project / f"data/shards/{t}/manifest.json").read_text())["classes"]
               for t in ("shapes", "textures")}
    assert list(pred.columns) == ["shapes", "textures"] and len(pred) == 5
    assert all(c in classes[t] for t in pred.columns for c in pred[t])


def test_second_repro_runs_nothing(project):
    out = _run(project, "dvc", "repro")
    assert _ran(out) == set(), out


def test_a_clone_pulls_every_output_from_the_remote_and_reproduces_nothing(project, tmp_path):
    """Push to a DVC remote, commit, clone: `dvc pull` gives the clone every output and `dvc repro` runs nothing.

    Runs on the project as `dvc repro` left it, so it comes before the tests that change it.
    """
    remote = tmp_path / "remote"
    _run(project, "dvc", "remote", "add", "--default", "--force", "shared", str(remote))
    _run(project, "dvc", "push")
    assert "in sync" in _run(project, "dvc", "status", "--cloud")
    _git(project, "add", "--all")
    _git(project, "commit", "-q", "-m", "pipeline results")

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(project), str(clone))  # code, params, dvc.yaml/.lock, metrics, reports
    _run(clone, "dvc", "pull")

    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    outs = sorted({o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])})
    assert {"data/shards", "models/teachers", "data/features", "metrics/teachers.json", "models/zip/depth_3.pt",
            "metrics/depth_3.json", "reports/table.md", "reports/depths.json", "reports/mlflow.json"} <= set(outs)
    missing = [o for o in outs if not (clone / o).exists()]
    assert not missing, (f"a clone cannot get {missing} (neither committed to git nor pushed to the remote): "
                         "make them cached outputs (no `cache: false`) or commit them")
    for out in outs:
        assert _digests(clone / out) == _digests(project / out), out

    status = _run(clone, "dvc", "status")
    assert "Data and pipelines are up to date" in status, status
    out = _run(clone, "dvc", "repro")
    assert "Running stage" not in out and _ran(out) == set(), out


def test_deleting_the_last_depth_reruns_only_it_and_what_follows(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["zip@3"]["outs"] if o["path"] == "models/zip/depth_3.pt")
    (project / "models/zip/depth_3.pt").unlink()
    # Lose the cached copy too, else DVC just checks the file out of its cache again.
    (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).unlink()
    ran = _ran(_run(project, "dvc", "repro"))
    # evaluate@3 and what follows rerun only if the recomputed checkpoint differs from the lost one.
    assert "zip@3" in ran and ran <= {"zip@3", "evaluate@3", "report", "register"}, ran


def test_changing_init_reruns_every_depth_and_its_evaluation(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["zipper"]["init"] = "weights"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _ran(_run(project, "dvc", "repro"))
    assert {"zip@1", "zip@2", "zip@3", "evaluate@1", "evaluate@2", "evaluate@3", "report"} <= ran, ran
    assert not ran & {"data", "teachers", "features", "zip0", "evaluate0"}, ran
    # Each row says the init its checkpoint was made with; the report says it too.
    assert [json.loads((project / f"metrics/depth_{d}.json").read_text())["init"] for d in DEPTHS] == \
        [None, "weights", "weights", "weights"]
    assert "init `weights`" in (project / "reports/table.md").read_text()
