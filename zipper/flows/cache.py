"""The flow's cache: each task's key from the stage graph (`zipper.graph`, the declaration dvc.yaml is made
from), and a cache policy that drops a record whose outputs are gone or changed.

A key is the sha256 of the files the stage run reads (paths relative to the project root), the params
keys it uses and the package code it runs: nothing per process, run, deployment or checkout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem

from zipper import stages
from zipper.config import Params
from zipper.graph import Layout, param_value, stage_io, stage_of
from zipper.io import sha256_file, sha256_json

log = logging.getLogger(__name__)

ZIPPER_SRC = Path(stages.__file__).resolve().parent


def pick_params(params: Params, keys: Iterable[str]) -> dict[str, Any]:
    """The values of dotted params keys (`calibrate`, `zipper.scope`, `data.tasks.shapes`)."""
    out: dict[str, Any] = {}
    for key in keys:
        if key == "*":
            out[key] = asdict(params)
            continue
        if key == "tasks":
            out[key] = params.tasks
            continue
        node = param_value(params, key)
        out[key] = asdict(node) if is_dataclass(node) and not isinstance(node, type) else node
    return out


# ------------------------------------------------------------------------------------- hashing
_sha_memo: dict[tuple, str] = {}


def _sha(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime, inode): reads and writes repeat within a run."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _sha_memo.get(memo_key)
    if digest is None:
        digest = _sha_memo[memo_key] = sha256_file(path)
    return digest


def _files(path: Path) -> list[Path]:
    """A file, or every file under a folder (skipping dot files: temp names of atomic writes in flight)."""
    if not path.is_dir():
        return [path] if path.is_file() else []
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts)
    )


def _rel(path: Path, root: Path) -> str:
    """A path under `root` relative to it; any other (an imported teacher) as params names it."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def hash_paths(paths: Iterable[Path], root: Path) -> dict[str, str | None]:
    """{path relative to root: sha256} for every file under `paths`; None for a missing file or empty folder."""
    out: dict[str, str | None] = {}
    for path in paths:
        files = _files(Path(path))
        if not files:
            out[_rel(path, root)] = None
        for f in files:
            out[_rel(f, root)] = _sha(f)
    return out


def stage_key(command: str, params: Params, layout: Layout, arg: str | int | None) -> str:
    """The cache key of one stage run, from the stage graph: what it reads (content hashes, paths relative
    to the root), the params and package code it uses. Nothing per process, run or checkout."""
    io = stage_io(stage_of(command, arg), params, layout, arg)
    return sha256_json(
        {
            "stage": command,
            "arg": arg,
            "params": pick_params(params, io.params),
            "reads": hash_paths(io.reads, layout.root),
            "code": hash_paths((ZIPPER_SRC / c for c in io.code), ZIPPER_SRC.parent),
        }
    )


def output_state(command: str, params: Params, layout: Layout, arg: str | int | None = None) -> dict[str, Any]:
    """What a finished stage left behind: its files' hashes and its entries in shared JSON files."""
    io = stage_io(stage_of(command, arg), params, layout, arg)
    entries = {}
    for path, key in io.shared:
        try:
            entries[f"{_rel(path, layout.root)}:{key}"] = key in json.loads(Path(path).read_text())
        except (OSError, ValueError):
            entries[f"{_rel(path, layout.root)}:{key}"] = False
    return {"files": hash_paths(io.writes, layout.root), "entries": entries}


def outputs_complete(state: Mapping[str, Any]) -> bool:
    return all(v is not None for v in state["files"].values()) and all(state["entries"].values())


@dataclass
class StageCache(CachePolicy):
    """Cache key = `stage_key`; a record whose outputs are gone or changed is dropped.

    Prefect looks a key up before running the task; dropping the stale record there makes the task
    run again and write a fresh record under the same key, exactly as if it had never been cached.
    """

    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        params, layout = inputs["params"], inputs["layout"]
        arg = inputs.get("name", inputs.get("depth"))
        key = stage_key(self.stage, params, layout, arg)
        store = getattr(task_ctx, "result_store", None)
        if store is None or not store.exists(key):
            return key
        current = output_state(self.stage, params, layout, arg)
        try:
            recorded = store.read(key).result.get("outputs")
        except Exception:  # unreadable record: treat as stale
            recorded = None
        if recorded == current and outputs_complete(current):
            return key
        log.info("%s %s: outputs missing or changed since it was cached; running it again", self.stage, arg)
        storage = store.result_storage
        if isinstance(storage, LocalFileSystem) and storage.basepath:
            Path(storage.basepath).expanduser().joinpath(key).unlink(missing_ok=True)
            return key
        return sha256_json([key, current])  # storage we cannot delete from: a key of its own for this state
