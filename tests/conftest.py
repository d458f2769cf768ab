"""Shared fixtures: tiny models and tiny class-conditional image tasks made on the fly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny forwards gain nothing from threads; tests/kernel_paths.py sets 2 to change reduction splits.
torch.set_num_threads(int(os.environ.get("ZIPPER_TEST_THREADS", "1")))

TINY = dict(width=0.25, input_size=32)
REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO / "tests" / "fixtures" / "params.tiny.yaml"


def blob_task(
    num_classes: int, n: int, seed: int, size: int = 32, kind: str = "colour"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a colour (kind="colour") or a stripe frequency (kind="stripes"), plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    if kind == "colour":
        palette = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(123)) * 2 - 1
        x = palette[y].expand(n, 3, size, size).clone()
    else:
        grid = torch.arange(size).float()
        freq = (y.float() + 1)[:, None, None] * 3.1416 / size
        x = torch.sin(grid[None, :, None] * freq).expand(n, size, size)[:, None].expand(n, 3, size, size).clone()
    return x + 0.6 * torch.randn(x.shape, generator=g), y


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0):
    """Endless shuffled (x, y) batches."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch_size + 1, batch_size):
            j = idx[i : i + batch_size]
            yield x[j], y[j]


@pytest.fixture
def tiny_teachers():
    import zipper

    torch.manual_seed(0)
    return {
        "a": zipper.build_model("mobilenet_v1", 5, **TINY).eval(),
        "b": zipper.build_model("mobilenet_v1", 3, **TINY).eval(),
    }


@contextlib.contextmanager
def holding_root(root: Path, command: str):
    """Another process holds `root`'s lock for the block (and is killed after it)."""
    code = (
        "import sys, time\nfrom zipper.locks import root_lock\n"
        "with root_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(root), command], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None  # stdout=PIPE
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ a real DVC project
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's zipper and dvc
    env.setdefault("MPLBACKEND", "Agg")
    env["DVC_NO_ANALYTICS"] = "1"  # no network here; the analytics daemon only costs time
    return env


def run_ok(cwd: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def stages_ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def git(cwd: Path, *args: str) -> str:
    return run_ok(
        cwd,
        "git",
        "-c",
        "user.name=zipper tests",
        "-c",
        "user.email=tests@zipper.invalid",
        "-c",
        "commit.gpgsign=false",
        *args,
    )


def digests(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (by relative path)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def checkpoint_digests(root: Path) -> dict[str, str]:
    """sha256 of every teacher and zipped checkpoint under a project root."""
    files = sorted([*root.glob("models/teachers/*.pt"), *root.glob("models/zip/depth_*.pt")])
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def copy_tiny_params(dst: Path, *, live: bool = False) -> None:
    """The tiny params; `live`: the stages log to MLflow as they finish (`tracking.live`)."""
    text = TINY_PARAMS.read_text()
    if live:
        text = text.replace("  live: false ", "  live: true  ", 1)
        assert "  live: true " in text, f"{TINY_PARAMS}: no tracking.live to turn on"
    dst.write_text(text)


def before_register(project: Path) -> Path:
    return project.with_name(f"{project.name}-before-register.db")  # beside the project: git adds it all


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory) -> Path:
    """A fresh git + DVC project holding our dvc.yaml, the tiny params and the code the stages depend on,
    after `dvc repro evaluate@1` (`before_register`: a copy of its MLflow store then) and `dvc repro`;
    `first_repro.json` keeps its checkpoints' digests (tests change the project)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    copy_tiny_params(root / "params.yaml", live=True)
    shutil.copytree(REPO / "zipper", root / "zipper", ignore=shutil.ignore_patterns("__pycache__"))
    run_ok(root, "git", "init", "-q")
    run_ok(root, "dvc", "init", "-q")
    # The repo's own ignore rules: what git commits (and so what a clone gets) and what DVC hashes.
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    out = run_ok(root, "dvc", "repro", "evaluate@1")  # depth 1 done, nothing registered yet:
    shutil.copy(root / "mlflow.db", before_register(root))  # what MLflow showed while it ran
    out += run_ok(root, "dvc", "repro")
    (root / "first_repro.log").write_text(out)
    (root / "first_repro.json").write_text(json.dumps(checkpoint_digests(root)))
    return root
