"""Bad inputs and faults, tried as a user would: each runs real `zipper` commands in a scratch copy of the
tiny project and reports the exit status, the error's last line and whether anything was written or lost.

    .venv/bin/python benchmarks/faults.py [--out docs/faults.md]

Prints a markdown table (one row per case, about 3 minutes on 2 cores). Every case must fail with a
clear error and leave the project as it was; the script exits 1 when one does not.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "params.tiny.yaml"
FAST = ["--set", "teachers.steps=12", "--set", "calibrate.steps=6", "--set", "evaluate.memory=false"]


def zipper(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "zipper.cli", *args, "--params", str(root / "params.yaml"), "--root", str(root)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg", **(env or {})})


def snapshot(root: Path) -> dict[str, int]:
    """Every file under the root with its mtime: what a failed command must leave alone."""
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".zipper")
    }


# ------------------------------------------------------------------------------------ the cases
SETTINGS = {  # a bad value for one key: refused when params.yaml loads, before any stage runs
    "calibrate.checkpoint_every=0": "0 steps between checkpoints",
    "evaluate.threads=0": "no threads to time with",
    "calibrate.lr=-0.1": "negative learning rate",
    "teachers.lr=.nan": "NaN learning rate",
    "teachers.momentum=1.5": "momentum above 1",
    "features.batch_size=0": "empty batches",
    "calibrate.kd_temperature=0": "zero KD temperature",
    "runtime.nproc_per_node=0": "no processes",
    "data.maxcount=0": "empty shards",
    "calibrate.learning_rate=0.1": "unknown key",
    "calibrate.lr=fast": "wrong type",
    "zipper.scope=layer": "unknown scope",
    "teachers.arch=vgg": "unregistered architecture",
    "runtime.device=tpu": "unknown device",
    "data.on_bad_sample=ignore": "unknown policy",
    "teachers.checkpoints={shape: t.pt}": "imported teacher for a task that does not exist",
    "zipper.chain={'1': 0, '2': 1, '3': 2, '4': 3, '5': 4, '6': 5, '7': 6, '8': 7, '9': 8, '10': 9, '11': 10, "
    "'12': 11, '13': 12, '14': 13}": "chain deeper than the architecture",
    "data.tasks.shapes={source: synthetic, name: shapes, n_trian: 5}": "typo in a source key",
    "data.tasks.shapes={source: imagefolder}": "image folder without its root",
    "tracking.uri=https://ann:s3cret@mlflow.example.com": "password in the tracking URI",
}


def setting_case(override: str) -> Callable[[Path], subprocess.CompletedProcess]:
    return lambda root: zipper(root, "data", "--task", "shapes", "--set", override)


def _image_folder(root: Path, extra: Callable[[Path], None]) -> Path:
    folder = root / "pets"
    for split in ("train", "val"):
        for i, cls in enumerate(("cat", "dog")):
            (folder / split / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), (40 * i, 90, 20)).save(folder / split / cls / "0.png")
    extra(folder)
    return folder


def folder_case(extra: Callable[[Path], None]) -> Callable[[Path], subprocess.CompletedProcess]:
    def run(root: Path) -> subprocess.CompletedProcess:
        folder = _image_folder(root, extra)
        return zipper(
            root, "data", "--task", "shapes", "--set", f"data.tasks.shapes={{source: imagefolder, root: {folder}}}"
        )

    return run


def _bomb(folder: Path) -> None:
    Image.new("1", (10_000, 10_000)).save(folder / "train" / "cat" / "bomb.png")


def _truncated(folder: Path) -> None:
    good = (folder / "train" / "dog" / "0.png").read_bytes()
    (folder / "train" / "dog" / "cut.png").write_bytes(good[: len(good) // 2])


def _stray_class(folder: Path) -> None:
    (folder / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "val" / "bird" / "0.png")


def _missing_root(folder: Path) -> None:
    shutil.rmtree(folder)


def manifest_case(edit: Callable[[Path], None]) -> Callable[[Path], subprocess.CompletedProcess]:
    def run(root: Path) -> subprocess.CompletedProcess:
        edit(root / "data" / "shards" / "shapes")
        return zipper(root, "teachers", *FAST)

    return run


def _escaping_name(shards: Path) -> None:
    text = (shards / "manifest.json").read_text().replace('"name": "train-000000.tar"', '"name": "../../../etc/passwd"')
    (shards / "manifest.json").write_text(text)


def _flipped_byte(shards: Path) -> None:
    tar = shards / "train-000000.tar"
    raw = bytearray(tar.read_bytes())
    raw[3000] ^= 0xFF
    tar.write_bytes(bytes(raw))


def _escaping_member(root: Path) -> subprocess.CompletedProcess:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    served = root / "evil"
    served.mkdir()
    with tarfile.open(served / "train.tar", "w") as tar:
        for name, data in (("../../evil.png", buf.getvalue()), ("../../evil.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shutil.copy(served / "train.tar", served / "val.tar")
    source = f"{{source: webdataset, train: {served / 'train.tar'}, val: {served / 'val.tar'}, classes: [a, b]}}"
    return zipper(root, "data", "--task", "shapes", "--set", f"data.tasks.shapes={source}")


def _pickle_teacher(root: Path) -> subprocess.CompletedProcess:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    torch.save({"state_dict": Payload()}, root / "evil.pt")
    return zipper(root, "teachers", "--set", f"teachers.checkpoints={{shapes: {root / 'evil.pt'}}}")


def _diverging_teacher(root: Path) -> subprocess.CompletedProcess:
    return zipper(root, "teachers", *FAST, "--set", "teachers.lr=1000000")


def _diverging_calibration(root: Path) -> subprocess.CompletedProcess:
    for args in (["teachers"], ["features"], ["zip", "--depth", "0"]):
        assert zipper(root, *args, *FAST).returncode == 0
    return zipper(root, "zip", "--depth", "1", *FAST, "--set", "calibrate.lr=1000000", "--set", "calibrate.grad_clip=0")


def _corrupt_teacher(root: Path) -> subprocess.CompletedProcess:
    assert zipper(root, "teachers", *FAST).returncode == 0
    path = root / "models" / "teachers" / "shapes.pt"
    path.write_bytes(path.read_bytes()[:1000])
    return zipper(root, "features", *FAST)


def _held_root(root: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys, time\nfrom zipper.locks import root_lock\n"
        "with root_lock(sys.argv[1], 'zipper zip --depth 3'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None  # stdout=PIPE
    try:
        holder.stdout.readline()
        return zipper(root, "data")
    finally:
        holder.kill()
        holder.wait()


CASES: dict[str, tuple[str, Callable[[Path], subprocess.CompletedProcess]]] = {
    **{f"`{k}`": (why, setting_case(k)) for k, why in SETTINGS.items()},
    "image folder: 100 Mpx PNG of a few KB": ("decompression bomb", folder_case(_bomb)),
    "image folder: truncated PNG": ("unreadable image", folder_case(_truncated)),
    "image folder: a class only in val": ("class sets differ", folder_case(_stray_class)),
    "image folder: root missing": ("no such folder", folder_case(_missing_root)),
    "manifest: shard name `../../../etc/passwd`": ("path traversal", manifest_case(_escaping_name)),
    "shard: one byte flipped": ("corrupt shard", manifest_case(_flipped_byte)),
    "tar member `../../evil.png`": ("path traversal", _escaping_member),
    "imported teacher: pickle with a code payload": ("code execution", _pickle_teacher),
    "`teachers.lr=1e6`": ("diverging teacher", _diverging_teacher),
    "`calibrate.lr=1e6`, no grad clip": ("diverging calibration", _diverging_calibration),
    "teacher checkpoint truncated": ("corrupt checkpoint", _corrupt_teacher),
    "a second pipeline on a held root": ("concurrent runs", _held_root),
}
NEEDS_DATA = {"manifest", "shard", "imported", "`teachers.lr=1e6`", "`calibrate.lr=1e6`, no grad clip", "teacher"}


def prepared(scratch: Path) -> Path:
    """The tiny project with its shards written once (copied for each case that needs them)."""
    base = scratch / "base"
    base.mkdir()
    shutil.copy(TINY, base / "params.yaml")
    assert zipper(base, "data").returncode == 0
    return base


def run_case(name: str, case: Callable, scratch: Path, base: Path, i: int) -> dict:
    root = scratch / f"case-{i}"
    if any(name.startswith(prefix) for prefix in NEEDS_DATA):
        shutil.copytree(base, root)
    else:
        root.mkdir()
        shutil.copy(TINY, root / "params.yaml")
    before = snapshot(root)
    t0 = time.perf_counter()
    proc = case(root)
    after = snapshot(root)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    edited_by_the_case = ("data/shards", "pets", "evil", "models/teachers")
    lost = sorted(p for p in before if after.get(p) != before[p] and not p.startswith(edited_by_the_case))
    errors = [ln for ln in lines if ln.startswith("zipper: error:")] or lines
    error = (errors[-1] if errors else "").replace(str(root), "<root>")
    return {
        "case": name,
        "rc": proc.returncode,
        "error": error,
        "lost": lost,
        "executed": (root / "PWNED").exists(),
        "seconds": time.perf_counter() - t0,
    }


def markdown(rows: list[dict]) -> str:
    out = ["| case | what it tests | exit | error | lost or changed |", "|---|---|---:|---|---|"]
    for r in rows:
        error = r["error"].replace("|", "\\|")[:220]
        out.append(f"| {r['case']} | {r['why']} | {r['rc']} | {error} | {', '.join(r['lost']) or 'nothing'} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="zipper-faults-") as tmp:
        scratch = Path(tmp)
        base = prepared(scratch)
        for i, (name, (why, case)) in enumerate(CASES.items()):
            row = run_case(name, case, scratch, base, i)
            rows.append({**row, "why": why})
            print(f"{row['rc']:>3} {row['seconds']:5.1f} s  {name}: {row['error'][:150]}", file=sys.stderr)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table)
    bad = [r["case"] for r in rows if r["rc"] == 0 or r["lost"] or r["executed"]]
    if bad:
        print(f"not refused cleanly: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
