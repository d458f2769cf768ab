"""Every registered architecture through the whole chain: worst val drop against depth, per arch.

For each `arch:width`, the pipeline's own stage functions run in order under `<root>/<arch>-<width>`
with the params file's recipe (data, teachers, features, calibration), the chain set to every block
of the arch: `run_data`, `run_teachers`, `run_features`, `run_zip` for depth 0..L (each depth starting
from the calibrated one before it), `run_evaluate` per depth. Outputs already under the root are
reused, so a killed sweep resumes. `--teachers-from` another sweep's root reuses its shards, feature
caches (linked) and teachers (copied): a second recipe is compared on the same teachers. The
tasks are the params file's: `benchmarks/real_pair.py` writes one with a pair of real-image tasks.

    .venv/bin/python benchmarks/sweep_archs.py [--params params.yaml] [--root /tmp/zipper-sweep]
        [--archs mobilenet_v1:0.25,mobilenet_v2:0.5,mobilenet_v3_small:1.0,mobilenet_v3_large:0.5[:KEY=VALUE]]
        [--set KEY=VALUE ...] [--max-depth K] [--teachers-from ROOT] [--label TEXT] [--out docs/sweep-embedded]

Writes `<out>.json` (every row), `<out>.md` (tables + the command) and `<out>.png` (worst drop and
calibration steps against depth, one line per arch).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from compare_inits import ensure_teachers  # a sibling script: benchmarks/ is on sys.path

from zipper.config import Params, load_params, parse_overrides
from zipper.graph import Layout
from zipper.io import atomic_path, write_json, write_text
from zipper.models import build_model
from zipper.runtime import set_threads
from zipper.stages import run_evaluate, run_zip

log = logging.getLogger("sweep_archs")
ARCHS = "mobilenet_v1:0.25,mobilenet_v2:0.5,mobilenet_v3_small:1.0,mobilenet_v3_large:0.5"


def arch_params(path: str, arch: str, width: float, overrides: dict[str, Any], max_depth: int | None = None) -> Params:
    blocks = build_model(arch, 2, width=width, input_size=32).num_blocks
    chain = {str(d): d - 1 for d in range(1, min(blocks, max_depth or blocks) + 1)}
    return load_params(path, {**overrides, "teachers.arch": arch, "teachers.width": width, "zipper.chain": chain})


def run_arch(params: Params, layout: Layout, teachers_from: Layout | None) -> list[dict[str, Any]]:
    """The chain of one arch, every stage skipped whose output is already there."""
    tasks = params.tasks
    set_threads(params.runtime.threads)  # as `zipper <stage>` does
    if teachers_from is not None and not (layout.root / "data").exists():
        layout.root.mkdir(parents=True, exist_ok=True)
        (layout.root / "data").symlink_to((teachers_from.root / "data").resolve(), target_is_directory=True)
        for made in (teachers_from.teacher_metrics, *(teachers_from.teacher(t) for t in tasks)):
            target = layout.root / made.relative_to(teachers_from.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(made, target)
    ensure_teachers(params, layout)
    rows = []
    for depth in [0, *params.zipper.depths]:
        t0 = time.perf_counter()
        if not layout.zipped(depth).exists():
            run_zip(params, layout, depth)
        if not layout.metrics(depth).exists():
            run_evaluate(params, layout, depth)
        row = json.loads(layout.metrics(depth).read_text())
        log.info(
            "%s depth %d: worst drop %.2f pp after %d steps (%.0f s)",
            params.teachers.arch,
            depth,
            row["max_drop_pp"],
            row["steps"],
            time.perf_counter() - t0,
        )
        rows.append(row)
    return rows


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    runs = result["runs"]
    deepest = max(len(r["rows"]) for r in runs)
    lines = [
        f"# Worst val drop against depth, per architecture ({result['label']})",
        "",
        f"Made by `{result['command']}` (it reuses whatever an earlier run left under its root).",
        "",
        f"- tasks: {', '.join(result['tasks'])}; input size {result['input_size']} px; calibration: "
        f"{result['calibrate']}",
        "",
        "Worst drop (points below the teacher, the worse task) at each depth; in brackets the calibration "
        "steps the depth used.",
        "",
        "| depth | " + " | ".join(f"{r['arch']} {r['width']:g}" for r in runs) + " |",
        "|---:|" + "---:|" * len(runs),
    ]
    for depth in range(1, deepest):
        cells = []
        for r in runs:
            row = r["rows"][depth] if depth < len(r["rows"]) else None
            cells.append("" if row is None else f"{row['max_drop_pp']:.2f} ({row['steps']})")
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| arch | teachers (%) | worst drop, any depth (pp) | worst drop, depths 1-3 (pp) | total steps |",
        "|---|---|---:|---:|---:|",
    ]
    for r in runs:
        rows = r["rows"][1:]
        teachers = " / ".join(f"{100 * a:.2f}" for a in r["rows"][0]["teacher_acc"].values())
        lines.append(
            f"| {r['arch']} {r['width']:g} | {teachers} | {max(x['max_drop_pp'] for x in rows):.2f} | "
            f"{max(x['max_drop_pp'] for x in rows[:3]):.2f} | {sum(x['steps'] for x in rows)} |"
        )
    merged = [r for r in runs if "command" in r]  # runs of several sweeps, merged into one result
    if merged:
        lines += ["", "Each run's sweep:", ""]
        lines += [f"- {r['arch']} {r['width']:g} ({r['calibrate']}): `{r['command']}`" for r in merged]
    lines += ["", f"![worst drop against depth]({path.with_suffix('.png').name})", ""]
    write_text(path, "\n".join(lines))


def write_plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (drop_ax, steps_ax) = plt.subplots(1, 2, figsize=(13, 4.6))
    for r in result["runs"]:
        rows = r["rows"][1:]
        depths = [x["depth"] for x in rows]
        label = f"{r['arch']} {r['width']:g}"
        drop_ax.plot(depths, [x["max_drop_pp"] for x in rows], marker="o", label=label)
        steps_ax.plot(depths, [x["steps"] for x in rows], marker="o", label=label)
    drop_ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    drop_ax.set_ylabel("worst val drop (points)")
    steps_ax.set_ylabel("calibration steps used")
    for ax in (drop_ax, steps_ax):
        ax.set_xlabel("depth k (shared blocks)")
        ax.grid(alpha=0.3)
    steps_ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"{result['label']}: {', '.join(result['tasks'])}, {result['input_size']} px", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default="/tmp/zipper-sweep", help="scratch root, one folder per arch")
    ap.add_argument(
        "--archs",
        default=ARCHS,
        help="comma list of arch:width[:KEY=VALUE...], the settings for that "
        "arch alone (e.g. mobilenet_v3_small:1.0:teachers.lr=0.1)",
    )
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. calibrate.lr=0.03")
    ap.add_argument("--max-depth", type=int, help="stop the chain at this depth (a recipe probe of the first merges)")
    ap.add_argument("--teachers-from", help="another sweep's root: reuse its shards, caches and teachers")
    ap.add_argument("--label", default="default recipe", help="names the run in the table and plot titles")
    ap.add_argument("--out", default="docs/sweep-embedded", help="output prefix: writes .json, .md, .png")
    ap.add_argument("--render-only", action="store_true", help="rewrite <out>.md and <out>.png from <out>.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        result = json.loads(out.with_suffix(".json").read_text())
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
        wall0 = time.perf_counter()
        overrides = parse_overrides(args.set)
        runs, params = [], None
        for item in args.archs.split(","):
            arch, width, *arch_sets = item.split(":")
            params = arch_params(
                args.params, arch, float(width), {**overrides, **parse_overrides(arch_sets)}, args.max_depth
            )
            folder = f"{arch}-{width}"
            rows = run_arch(
                params,
                Layout(Path(args.root) / folder),
                Layout(Path(args.teachers_from) / folder) if args.teachers_from else None,
            )
            runs.append({"arch": arch, "width": params.teachers.width, "rows": rows})
        assert params is not None
        command = " ".join(
            [".venv/bin/python", "benchmarks/sweep_archs.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
        )
        result = {
            "command": command,
            "label": args.label,
            "tasks": params.tasks,
            "input_size": params.teachers.input_size,
            "calibrate": _recipe(params),
            "wall_s": time.perf_counter() - wall0,
            "runs": runs,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out.with_suffix(".json"), result)
    write_markdown(out.with_suffix(".md"), result)
    write_plot(out.with_suffix(".png"), result)
    print(out.with_suffix(".md").read_text())


def _recipe(params: Params) -> str:
    c = params.calibrate
    until = (
        "fixed budget"
        if c.until is None
        else (
            f"until every task is within {c.until.max_drop_pp:g} pt on the held-out split (checked every "
            f"{c.until.check_every} steps)"
        )
    )
    return f"{c.steps} steps at most, lr {c.lr:g}, batch {c.batch_size} per task, {until}"


if __name__ == "__main__":
    main()
