"""Atomic file writes and content hashes: a killed run never leaves half a file behind."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` atomically, byte-identical for identical content (an unchanged rerun leaves what
    follows cached); refuses non-finite weights, so a diverged run never leaves a checkpoint behind."""
    bad = _non_finite(obj)
    if bad is not None:
        raise ValueError(f"refusing to write {path}: tensor {bad!r} holds non-finite values")
    buffer = io.BytesIO()  # torch.save names the archive inside after a file's name: the temp name would differ
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def _non_finite(obj: Any, where: str = "") -> str | None:
    """The key path of the first floating-point tensor in `obj` with a NaN or inf, else None."""
    if isinstance(obj, torch.Tensor):
        return (where or "<tensor>") if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        bad = _non_finite(value, f"{where}.{key}" if where else str(key))
        if bad is not None:
            return bad
    return None


def load_torch(path: str | os.PathLike) -> Any:
    """Load a checkpoint safely (`weights_only=True`), naming the file when it is not one."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:  # unpickling refused or corrupt file
        raise ValueError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {e})") from e


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
