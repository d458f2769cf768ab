"""Locks on a project root (fcntl, so they go with the process that holds them, killed or not).

- `root_lock`: one pipeline at a time per root. Every stage command and every flow run takes it; the
  processes they start (per-task stage processes, torchrun workers, a flow's stage commands) run under
  their parent's lock, which they learn from the environment.
- `computing` / `measuring`: latency and memory are measured while nothing else computes in the root
  (a flow evaluates depth k while it calibrates depth k+1, and evaluations overlap each other):
  training, feature caching and accuracy passes take the lock shared, measuring exclusive.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT_LOCK = ".zipper.lock"
MEASURE_LOCK = ".zipper-measure.lock"
HELD_ENV = "ZIPPER_ROOT_LOCK"  # the lock file a parent process holds for its children


class RootLocked(RuntimeError):
    """Another zipper run holds this project root."""


def lock_path(root: str | os.PathLike) -> Path:
    return (Path(root) / ROOT_LOCK).resolve()


def held_by_parent(root: str | os.PathLike) -> dict[str, str]:
    """The environment that tells a child process its parent holds `root`'s lock (for processes that
    do not inherit the holder's environment, such as a flow's stage commands started by Dask workers)."""
    return {HELD_ENV: str(lock_path(root))}


@contextmanager
def root_lock(root: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold `root` for the block, or fail at once naming the holder's pid and command."""
    path = lock_path(root)
    if os.environ.get(HELD_ENV) == str(path):  # started by the holder
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            raise RootLocked(
                f"{Path(root).resolve()} is in use by {holder} (lock {path}); wait for it to finish or stop it"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}: {command}\n")
        f.flush()
        outer, os.environ[HELD_ENV] = os.environ.get(HELD_ENV), str(path)
        try:
            yield
        finally:
            if outer is None:
                del os.environ[HELD_ENV]
            else:
                os.environ[HELD_ENV] = outer
            f.truncate(0)  # the lock itself goes with the file's closing


@contextmanager
def _flock(root: str | os.PathLike, mode: int) -> Iterator[None]:
    path = Path(root) / MEASURE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, mode)  # released when the file closes
        yield


def computing(root: str | os.PathLike):
    """Shared: any number of computations (training, accuracy passes) at once, but no measurement beside them."""
    return _flock(root, fcntl.LOCK_SH)


def measuring(root: str | os.PathLike):
    """Exclusive: waits until nothing computes in the root (and keeps new computations waiting)."""
    return _flock(root, fcntl.LOCK_EX)
