"""The `runtime` section at work on the tiny pipeline: data-parallel calibration under real torchrun +
gloo (`runtime.nproc_per_node: 2` makes `zipper zip` launch itself on 2 processes, which must end where
1 process on the same global batch ends, and resume after a kill), bf16 autocast on the CPU, and a
feature cache over budget that steps aside for online targets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from zipper.cli import main as zipper

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# BN re-estimation on 2 batches, then 2 steps. Two processes sum in another order than one, and
# tiny nets on 16 px images amplify that rounding step after step (near-constant BN channels
# divide it by sqrt(eps)); in float64 the two agree to 1e-11 after one step, 1e-9 after two. In
# float32 here: 7e-7 after one step, 2e-4 after two, so 1e-3 still catches any real mismatch
# (unsynchronised statistics, or gradients summed instead of averaged, are off by far more).
CALIBRATE = {"steps": 2, "batch_size": 32, "lr": 0.01, "bn_reset_batches": 2, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Shards, teachers, feature caches and depth 0 of the tiny pipeline, made once."""
    root = tmp_path_factory.mktemp("ddp")
    params = yaml.safe_load((REPO / "tests/fixtures/params.tiny.yaml").read_text())
    params["calibrate"].update(CALIBRATE)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in (["data"], ["teachers"], ["features"], ["zip", "--depth", "0"]):
        assert zipper([*stage, "--root", str(root), "--params", str(root / "params.yaml")]) == 0
    return root


def _zip_command(root: Path, nproc: int, *sets: str) -> list[str]:
    overrides = [f"runtime.nproc_per_node={nproc}", *sets]
    return [
        sys.executable,
        "-m",
        "zipper.cli",
        "zip",
        "--depth",
        "1",
        "--root",
        str(root),
        "--params",
        str(root / "params.yaml"),
        *(a for s in overrides for a in ("--set", s)),
    ]


def _zip(root: Path, nproc: int, *sets: str) -> dict[str, torch.Tensor]:
    proc = subprocess.run(_zip_command(root, nproc, *sets), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "models/zip/depth_1.pt", weights_only=True)["state_dict"]


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    diffs = {
        k: ((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp(min=1e-3)).item()
        for k in a
        if a[k].is_floating_point()
    }
    worst = max(diffs, key=diffs.__getitem__)
    return diffs[worst], worst


def test_two_processes_end_where_one_process_ends(project):
    one = _zip(project, 1)
    two = _zip(project, 2)
    assert one.keys() == two.keys()
    assert all(v.device.type == "cpu" for v in two.values())
    diff, where = _max_rel_diff(one, two)  # BN running statistics included
    assert diff < 1e-3, f"{where}: relative difference {diff:.2e}"


def test_a_killed_data_parallel_run_resumes_to_the_uninterrupted_result(project):
    longer = ("calibrate.steps=16", "calibrate.checkpoint_every=2")
    uninterrupted = _zip(project, 2, *longer)
    partial = project / "models/zip/depth_1.partial.pt"
    proc = subprocess.Popen(
        _zip_command(project, 2, *longer), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial.exists(), "no partial checkpoint before the run ended"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-calibration
        proc.wait()
    step = torch.load(partial, weights_only=True)["step"]
    assert 0 < step < 16
    resumed = _zip(project, 2, *longer)
    assert not partial.exists()
    diff, where = _max_rel_diff(uninterrupted, resumed)
    assert diff < 1e-6, f"resumed at step {step}: {where} differs by {diff:.2e}"


def test_bf16_autocast_calibrates_on_the_cpu(project, tmp_path):
    root = tmp_path / "bf16"
    shutil.copytree(project, root)
    args = [
        "zip",
        "--depth",
        "1",
        "--root",
        str(root),
        "--params",
        str(root / "params.yaml"),
        "--set",
        "runtime.device=cpu",
        "--set",
        "runtime.precision=bf16",
        "--set",
        "features.enabled=false",
    ]
    assert zipper(args) == 0
    ckpt = torch.load(root / "models/zip/depth_1.pt", weights_only=True)
    assert all(
        v.dtype != torch.bfloat16 and torch.isfinite(v).all()
        for v in ckpt["state_dict"].values()
        if v.is_floating_point()
    )
    curves = json.loads((root / "models/zip/depth_1.curves.json").read_text())
    assert curves["targets"] == "online" and all(map(torch.isfinite, torch.tensor(curves["loss"])))


def test_a_feature_cache_over_budget_steps_aside_for_online_targets(project, tmp_path, caplog):
    root = tmp_path / "budget"
    shutil.copytree(project, root)
    common = ["--root", str(root), "--params", str(root / "params.yaml"), "--set", "features.budget_mb=0.5"]
    assert zipper(["features", *common]) == 0
    assert "calibration computes teacher targets online" in caplog.text
    assert (root / "data/features/shapes/ONLINE").read_text().startswith("feature cache for 'shapes' needs")
    assert zipper(["zip", "--depth", "1", *common]) == 0
    assert json.loads((root / "models/zip/depth_1.curves.json").read_text())["targets"] == "online"
