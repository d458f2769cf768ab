"""One pipeline per project root; no latency measured beside a training."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import pytest

from zipper import locks

from .conftest import TINY_PARAMS, cli_env, holding_root


def _stage(root, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zipper.cli", *args, "--params", str(root / "params.yaml"), "--root", str(root)],
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
    )


@pytest.mark.spawns
def test_a_stage_command_refuses_a_held_root_and_names_the_holder(tmp_path):
    shutil.copy(TINY_PARAMS, tmp_path / "params.yaml")
    with holding_root(tmp_path, "zipper zip --depth 3") as holder:
        refused = _stage(tmp_path, "data", "--task", "shapes")
        assert refused.returncode != 0
        assert f"is in use by pid {holder.pid}: zipper zip --depth 3" in refused.stderr
        assert not (tmp_path / "data").exists()  # refused before anything ran
        # A process its holder started (the flow's stage commands, per-task processes) runs under its lock.
        child = _stage(tmp_path, "data", "--task", "shapes", env=locks.held_by_parent(tmp_path))
        assert child.returncode == 0, child.stderr[-2000:]
    with locks.root_lock(tmp_path, "next"):  # the lock went with its (killed) holder
        pass


def test_the_lock_is_released_and_reusable_after_the_block(tmp_path):
    with locks.root_lock(tmp_path, "first"):
        pass
    with locks.root_lock(tmp_path, "second"):
        assert (tmp_path / locks.ROOT_LOCK).read_text().endswith(": second\n")


def test_measuring_waits_for_the_computations_to_end(tmp_path) -> None:
    order: list[str] = []
    training_started, release = threading.Event(), threading.Event()

    def train() -> None:
        with locks.computing(tmp_path):
            training_started.set()
            release.wait(30)
            order.append("training done")

    def measure() -> None:
        with locks.measuring(tmp_path):
            order.append("measured")

    trainer = threading.Thread(target=train)
    trainer.start()
    assert training_started.wait(30)
    measurer = threading.Thread(target=measure)
    measurer.start()
    measurer.join(0.5)
    assert measurer.is_alive() and order == []  # still waiting
    release.set()
    trainer.join(30)
    measurer.join(30)
    assert order == ["training done", "measured"]


@pytest.mark.parametrize("mode", ["computing", "measuring"])
def test_measure_locks_go_with_their_block(tmp_path, mode):
    with getattr(locks, mode)(tmp_path):
        pass
    with locks.measuring(tmp_path):  # free again: an exclusive lock is granted at once
        pass
