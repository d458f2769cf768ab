"""Orchestration overhead: the same zipper stages run bare, by `dvc repro` and by the Prefect flow.

Each variant runs as a fresh command in its own temporary project on the same params (default: the
tiny fixture), one after the other, then once more with nothing to do:

- bare:    one Python process calling zipper.stages.run_* in order (no orchestrator: the floor);
- dvc:     `dvc repro` in a fresh git + DVC project holding dvc.yaml (every stage its own `zipper <stage>`
           process, as tests/test_pipeline.py sets it up);
- prefect: `zipper flow run` (thread runner; the process starts its own temporary Prefect server).

Overhead = (time - bare) / bare, for wall time and for CPU time (user + system of the command and its
children: steadier than wall time on a shared machine); the Prefect flow against DVC likewise.
Usage: python benchmarks/bench_orchestration.py [--params P] [--set KEY=VALUE ...] [--json OUT] [--no-bare]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "params.tiny.yaml"

BARE = """
import sys, yaml
from pathlib import Path
from zipper import stages
from zipper.graph import Layout
from zipper.config import load_params
root = Path(sys.argv[1]); overrides = yaml.safe_load(sys.argv[2]) or {}
params = load_params(root / "params.yaml", overrides); layout = Layout(root)
stages.run_data(params, layout); stages.run_teachers(params, layout); stages.run_features(params, layout)
for depth in [0, *params.zipper.depths]:
    stages.run_zip(params, layout, depth)
for depth in [0, *params.zipper.depths]:
    stages.run_evaluate(params, layout, depth)
stages.run_report(params, layout); stages.run_register(params, layout)
"""


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's zipper and dvc
    env.update(
        MPLBACKEND="Agg",
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    )
    env.pop("PREFECT_API_URL", None)  # a temporary server per process, as a user without one gets
    return env


def _timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and all its children) of one command.

    CPU time is the steadier number on a shared machine: it does not grow when other jobs take the cores.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed (exit {proc.returncode}); log: {log}\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _project(base: Path, name: str, params: Path, overrides: dict) -> Path:
    root = base / name
    root.mkdir()
    import yaml

    raw = yaml.safe_load(params.read_text())
    for key, value in overrides.items():  # DVC reads params.yaml only: bake the overrides into it
        *parents, last = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def main(argv: list[str] | None = None) -> dict:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=TINY, help="params file (default: the tiny fixture)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare (no orchestrator) run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = ap.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}

    base = Path(tempfile.mkdtemp(prefix="zipper-bench-orch-"))
    env = _env(base / "prefect-home")
    py = sys.executable
    runs: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        # Warm the page cache (torch, prefect, mlflow) so the first variant does not pay for a cold disk.
        subprocess.run(
            [py, "-c", "import torch, torchvision, prefect, mlflow, dvc, zipper.stages"], env=env, check=True
        )
        if not args.no_bare:
            root = _project(base, "bare", args.params, overrides)
            runs["bare"] = {"first": _timed([py, "-c", BARE, str(root), "{}"], root, env, base / "bare.log")}

        root = _project(base, "dvc", args.params, overrides)
        shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
        shutil.copytree(REPO / "zipper", root / "zipper", ignore=shutil.ignore_patterns("__pycache__"))
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
            subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
        runs["dvc"] = {
            "first": _timed(["dvc", "repro"], root, env, base / "dvc.log"),
            "noop": _timed(["dvc", "repro"], root, env, base / "dvc.noop.log"),
        }

        root = _project(base, "prefect", args.params, overrides)
        cmd = [
            str(Path(py).parent / "zipper"),
            "flow",
            "run",
            "--runner",
            "thread",
            "--params",
            str(root / "params.yaml"),
            "--root",
            str(root),
        ]
        runs["prefect"] = {
            "first": _timed(cmd, REPO, env, base / "prefect.log"),
            "noop": _timed(cmd, REPO, env, base / "prefect.noop.log"),
        }
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    result: dict = {
        "params": str(args.params),
        "overrides": overrides,
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "wall_s": {n: {k: v[0] for k, v in r.items()} for n, r in runs.items()},
        "cpu_s": {n: {k: v[1] for k, v in r.items()} for n, r in runs.items()},
    }
    bare = runs.get("bare", {}).get("first")
    print(
        f"{'variant':<9} {'wall':>8} {'cpu':>8} {'wall vs bare':>13} {'cpu vs bare':>12} "
        f"{'no-op wall':>11} {'no-op cpu':>10}"
    )
    for name, r in runs.items():
        (wall, cpu), noop = r["first"], r.get("noop")
        vs = (
            (f"{100 * (wall - bare[0]) / bare[0]:+.1f}%", f"{100 * (cpu - bare[1]) / bare[1]:+.1f}%")
            if bare
            else ("-", "-")
        )
        print(
            f"{name:<9} {wall:>6.1f} s {cpu:>6.1f} s {vs[0]:>13} {vs[1]:>12} "
            f"{f'{noop[0]:.1f} s' if noop else '-':>11} {f'{noop[1]:.1f} s' if noop else '-':>10}"
        )
    (dw, dc), (pw, pc) = runs["dvc"]["first"], runs["prefect"]["first"]
    result["prefect_vs_dvc_pct"] = {"wall": 100 * (pw - dw) / dw, "cpu": 100 * (pc - dc) / dc}
    print(
        f"Prefect flow (thread runner) vs dvc repro: wall {result['prefect_vs_dvc_pct']['wall']:+.1f}% "
        f"({pw:.1f} s vs {dw:.1f} s), cpu {result['prefect_vs_dvc_pct']['cpu']:+.1f}% ({pc:.1f} s vs {dc:.1f} s); "
        f"no-op rerun {runs['prefect']['noop'][0]:.1f} s vs {runs['dvc']['noop'][0]:.1f} s wall"
    )
    if bare:
        result["overhead_vs_bare_pct"] = {
            n: {"wall": 100 * (r["first"][0] - bare[0]) / bare[0], "cpu": 100 * (r["first"][1] - bare[1]) / bare[1]}
            for n, r in runs.items()
            if n != "bare"
        }
    print(f"(load average over the last minute: {result['load_avg_1m']:.1f} on {os.cpu_count()} cores)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":  # guard needed: zipper.memory's forkserver re-imports the main module
    main()
