"""The MLflow store under concurrency and the credentials in its URI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import cli_env

# Two processes start one pipeline's registration each against the same new sqlite store.
_REGISTER_START = """
import sys
from pathlib import Path
from zipper.config import TrackingConfig
from zipper.tracking import connect
client = connect(TrackingConfig(uri=sys.argv[1], experiment="zipper"), Path("."), set_experiment=True)
print(client.get_experiment_by_name("zipper").experiment_id)
"""


@pytest.mark.spawns
def test_two_pipelines_create_one_new_sqlite_store_at_once(tmp_path):
    """Without the store lock, one of the two died in the schema migration in 10 of 10 tries."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REGISTER_START, uri],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0]  # one experiment, found by both


def test_a_pipeline_run_is_tagged_with_its_commit_changes_params_and_experiment(tmp_path, monkeypatch):
    from dataclasses import asdict
    from pathlib import Path

    from zipper.config import load_params
    from zipper.io import sha256_json
    from zipper.tracking import _made_by

    from .conftest import git

    params = load_params(Path(__file__).parent / "fixtures" / "params.tiny.yaml")
    assert _made_by(params, tmp_path) == {"zipper.params_sha256": sha256_json(asdict(params))}  # not a repo
    git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-qm", "first")
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-oars")
    tags = _made_by(params, tmp_path)
    assert (tags["mlflow.source.git.commit"], tags["zipper.git_dirty"], tags["zipper.dvc_experiment"]) == (
        head,
        "false",
        "bushy-oars",
    )
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert _made_by(params, tmp_path)["zipper.git_dirty"] == "true"
