"""Compare how merged weights start: plain average (eq. 1) vs channel alignment (weights, activations).

For every depth k in a set, every seed and every init, starting from the teachers themselves (not
the chain); a seed fixes the calibration data order, the same for every init, so gaps are paired:

1. `zip_models(teachers, k, init=...)`, then BN running stats re-estimated on calibration data
   (`reestimate_bn`: all tasks' images through the trunk together, as in calibration)
   -> per-task val accuracy "before";
2. `zipper.calibrate.calibrate` for a fixed budget, paused every `--eval-every` steps to measure
   val accuracy (of a copy, BN statistics re-estimated on the same batches: `with_fresh_bn`)
   -> accuracy "after" and the first evaluated step at which every task is within 1 point of its teacher.

    .venv/bin/python benchmarks/compare_inits.py [--params params.yaml] [--root /tmp/zipper-compare]
        [--depths 1,2,3,5,7,9,11,13 | all] [--steps 150] [--eval-every 25] [--batch-size 64]
        [--inits average,weights,activations] [--seeds 0,1] [--jobs 2] [--threads 1] [--set KEY=VALUE]
        [--out docs/alignment]

`--jobs N` runs N (depth, seed) units at a time in worker processes of `--threads` torch threads.
Teachers, shards and the feature cache come from the real stage functions (`run_data`,
`run_teachers`, `run_features`) under `--root`, reused when already there. Writes
`<out>.json` (every number), `<out>.md` (tables + the command) and `<out>.png` (plot).

Evaluations run from calibrate()'s step callback (eval mode, no gradients): the calibration is the
one an unobserved run makes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import shlex
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from zipper.calibrate import BNBatches, CalibrateConfig, bn_batches, calibrate, reestimate_bn, with_fresh_bn
from zipper.config import Params, load_params, parse_overrides
from zipper.data import read_manifest, val_batches
from zipper.data.features import cache_matches
from zipper.evaluate import accuracy, evaluate_zipper
from zipper.graph import Layout
from zipper.io import atomic_path, sha256_file, write_text
from zipper.merge import INITS, ZipperNet, zip_models
from zipper.models import Backbone
from zipper.stages import alignment_batches, calibration_streams, load_teachers, run_data, run_features, run_teachers

log = logging.getLogger("compare_inits")
WITHIN_PP = 1.0  # "close to the teachers": every task within this many points
LOOSE_PP = (5.0, 10.0)  # looser bars, reported too: a short budget may reach no depth within WITHIN_PP


# ------------------------------------------------------------------------------------ setup
def ensure_teachers(params: Params, layout: Layout) -> None:
    """Shards, teachers and (when enabled) the feature cache under `layout.root`, made only if missing."""
    tasks = params.tasks
    if not all((layout.shards(t) / "manifest.json").exists() for t in tasks):
        log.info("writing shards under %s", layout.root)
        run_data(params, layout)
    missing = [t for t in tasks if not layout.teacher(t).exists()]
    if missing:
        log.info("training teachers %s (params.teachers: %d steps)", missing, params.teachers.steps)
        run_teachers(params, layout, missing)
    else:
        log.info("reusing teachers in %s", layout.teacher(tasks[0]).parent)
    if params.features.enabled:
        stale = [
            t
            for t in tasks
            if not cache_matches(
                layout.features(t), sha256_file(layout.teacher(t)), input_size=params.teachers.input_size
            )
        ]
        if stale:
            log.info("caching teacher targets for %s", stale)
            run_features(params, layout, stale)


# ------------------------------------------------------------------ calibration with evaluations
def calibrate_with_evals(
    net: ZipperNet,
    teachers: Mapping[str, Backbone],
    streams: Mapping[str, Iterator],
    cfg: CalibrateConfig,
    every: int,
    evaluate,
    bn: BNBatches,
) -> tuple[list, dict]:
    """Run `calibrate(net, ...)` for cfg.steps, evaluating after every `every` steps (and the last);
    returns ([(step, {task: acc})...], curves). Each evaluation before the last measures a copy with
    the BN statistics of its weights (re-estimated on `bn`), as calibration would end there; the copy
    leaves the calibration itself the one an unobserved run makes."""
    evals: list = []

    def on_step(step: int, n: ZipperNet) -> None:
        if step % every == 0 and step < cfg.steps:
            evals.append((step, evaluate(with_fresh_bn(n, bn))))

    curves = calibrate(net, teachers, streams, cfg, on_step=on_step)
    return evals + [(cfg.steps, evaluate(net))], curves


# ------------------------------------------------------------------------------------ sweep
def mean(d: Mapping[str, float]) -> float:
    return sum(d.values()) / len(d)


def steps_to_close(evals: list, teacher_acc: Mapping[str, float], within_pp: float = WITHIN_PP) -> int | None:
    """First evaluated step at which every task is within `within_pp` points of its teacher."""
    for step, acc in evals:
        if all(100 * (teacher_acc[t] - a) <= within_pp for t, a in acc.items()):
            return step
    return None


def run_one(ctx: dict, depth: int, init: str, align_data: list, cfg: CalibrateConfig, data_seed: int) -> dict[str, Any]:
    params, layout, teachers, val = ctx["params"], ctx["layout"], ctx["teachers"], ctx["val"]
    t0 = time.perf_counter()
    net = zip_models(
        teachers, depth, scope=params.zipper.scope, init=init, batches=align_data if init == "activations" else None
    )
    t_merge = time.perf_counter() - t0
    # Same data seed for every init of a (depth, seed) unit: identical calibration data order.
    streams, targets = calibration_streams(params, layout, seed=data_seed)
    bn = bn_batches(streams, ctx["bn_batches"])
    reestimate_bn(net, bn)
    evaluate = lambda n: evaluate_zipper(n, val)
    before = evaluate(net)
    t1 = time.perf_counter()
    evals, curves = calibrate_with_evals(net, teachers, streams, cfg, ctx["eval_every"], evaluate, bn)
    t_cal = time.perf_counter() - t1
    evals = [(0, before)] + evals
    row = {
        "depth": depth,
        "init": init,
        "seed": cfg.seed,
        "targets": targets,
        "before": before,
        "after": evals[-1][1],
        "evals": [{"step": s, "acc": a} for s, a in evals],
        "loss_first": curves["loss"][0] if curves.get("loss") else None,
        "loss_last": curves["loss"][-1] if curves.get("loss") else None,
        "merge_s": round(t_merge, 2),
        "calibrate_s": round(t_cal, 2),
    }
    log.info(
        "depth %2d seed %d %-11s before %s after %s  (merge %.1fs, calib %.1fs)",
        depth,
        cfg.seed,
        init,
        fmt_acc(before),
        fmt_acc(row["after"]),
        t_merge,
        t_cal,
    )
    return row


# ------------------------------------------------------------------- units (one per process)
_CTX: dict[str, Any] = {}


def load_context(params: Params, root: str, eval_every: int, inits: list[str]) -> dict[str, Any]:
    """Teachers and val batches (materialised once: every evaluation reads the same tensors)."""
    layout = Layout(Path(root))
    teachers = load_teachers(params, layout)
    size = params.teachers.input_size
    val = {
        t: list(val_batches(layout.shards(t), input_size=size, batch_size=params.evaluate.batch_size))
        for t in params.tasks
    }
    # BN stats are re-estimated in run_one (before the "before" measurement), so calibrate must not redo it.
    cfg = dataclasses.replace(params.calibrate, bn_reset_batches=0)
    return {
        "params": params,
        "layout": layout,
        "teachers": teachers,
        "val": val,
        "cfg": cfg,
        "inits": inits,
        "eval_every": eval_every,
        "bn_batches": params.calibrate.bn_reset_batches or 10,
    }


def init_worker(params: Params, root: str, eval_every: int, inits: list[str], threads: int) -> None:
    # A killed benchmark must not leave workers running the units already queued to them.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    _CTX.update(load_context(params, root, eval_every, inits))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)


def run_unit(depth: int, seed: int) -> list[dict[str, Any]]:
    """Every init at one depth, from one calibration data order (seed)."""
    ctx, params = _CTX, _CTX["params"]
    data_seed = params.calibrate.seed + depth + 1000 * seed
    cfg = dataclasses.replace(ctx["cfg"], seed=seed)
    # Activation matching reads calibration images of every task (as run_zip does); every init reads the same.
    align_data = list(alignment_batches(params, ctx["layout"], data_seed))
    return [run_one(ctx, depth, init, align_data, cfg, data_seed) for init in ctx["inits"]]


def fmt_acc(acc: Mapping[str, float]) -> str:
    return "/".join(f"{100 * a:.1f}" for a in acc.values())


# ---------------------------------------------------------------------------------- outputs
def mean_rows(rows: list[dict]) -> list[dict]:
    """Per (depth, init): accuracies averaged over seeds, at every evaluated step."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["depth"], r["init"]), []).append(r)
    out = []
    for (depth, init), rs in sorted(groups.items()):
        avg = lambda accs: {t: sum(a[t] for a in accs) / len(accs) for t in accs[0]}
        steps = [e["step"] for e in rs[0]["evals"]]
        out.append(
            {
                "depth": depth,
                "init": init,
                "seeds": sorted(r["seed"] for r in rs),
                "before": avg([r["before"] for r in rs]),
                "after": avg([r["after"] for r in rs]),
                "evals": [{"step": s, "acc": avg([r["evals"][i]["acc"] for r in rs])} for i, s in enumerate(steps)],
            }
        )
    return out


def _seed_gaps(pairs: list[tuple[dict, dict]], key: str) -> list[float]:
    """Per seed: the init's mean accuracy over tasks minus average's, in points."""
    return [100 * (mean(r[key]) - mean(b[key])) for r, b in pairs]


def _task_gaps(pairs: list[tuple[dict, dict]], key: str) -> dict[str, float]:
    """Per task: the init's accuracy minus average's, in points, averaged over seeds."""
    return {t: sum(100 * (r[key][t] - b[key][t]) for r, b in pairs) / len(pairs) for t in pairs[0][0][key]}


def gaps(rows: list[dict], inits: list[str]) -> list[dict]:
    """Per depth and aligned init: mean-over-tasks accuracy minus average's (same seed), in points;
    the mean over seeds, and each seed's."""
    by = {(r["depth"], r["init"], r["seed"]): r for r in rows}
    out = []
    for depth in sorted({r["depth"] for r in rows}):
        for init in inits:
            pairs = [
                (by[(depth, init, s)], by[(depth, "average", s)])
                for d, i, s in sorted(by)
                if d == depth and i == init != "average" and (depth, "average", s) in by
            ]
            if not pairs:
                continue
            before, after = _seed_gaps(pairs, "before"), _seed_gaps(pairs, "after")
            out.append(
                {
                    "depth": depth,
                    "init": init,
                    "seeds": len(pairs),
                    "before_pp": sum(before) / len(before),
                    "after_pp": sum(after) / len(after),
                    "before_pp_seeds": before,
                    "after_pp_seeds": after,
                    "before_pp_task": _task_gaps(pairs, "before"),
                    "after_pp_task": _task_gaps(pairs, "after"),
                }
            )
    return out


def claim(gap_rows: list[dict]) -> dict[str, Any]:
    """The alignment claim: at every depth >= 2, aligned init beats average before calibration (strictly) and is
    at least as accurate after the same budget (mean over tasks). Checked per aligned init."""
    out = {}
    for init in sorted({g["init"] for g in gap_rows}):
        gs = [g for g in gap_rows if g["init"] == init and g["depth"] >= 2]
        fails = [
            {"depth": g["depth"], "before_pp": round(g["before_pp"], 2), "after_pp": round(g["after_pp"], 2)}
            for g in gs
            if not (g["before_pp"] > 0 and g["after_pp"] >= 0)
        ]
        out[init] = {"holds": not fails and bool(gs), "failures": fails}
    return out


def write_markdown(path: Path, result: dict) -> None:
    tasks, inits = result["tasks"], result["inits"]
    ta = result["teacher_acc"]
    rows = {(r["depth"], r["init"]): r for r in mean_rows(result["rows"])}
    depths = sorted({d for d, _ in rows})
    seeds = sorted({r["seed"] for r in result["rows"]})
    c = result["config"]
    L = [
        "# Alignment vs plain average: merged accuracy per depth",
        "",
        "Made by (from the repository root):",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"- {result['arch']}; data: {result['data']}; teachers trained by `run_teachers` under `{result['root']}`, "
        f"val accuracy " + ", ".join(f"{t} {100 * ta[t]:.2f}%" for t in tasks) + ".",
        f"- every depth starts from the teachers (`zip_models(teachers, k, init=...)`, scope `{c['scope']}`), "
        "not from the chain;",
        f"- BN running stats re-estimated for every init on {c['bn_reset_batches']} calibration batches per task "
        "(`reestimate_bn`: all tasks' images through the trunk together, as in calibration) -> **before**;",
        f"- then `zipper.calibrate.calibrate`: {c['steps']} steps, batch {c['batch_size']} per task, {c['optimizer']} "
        f"lr {c['lr']} ({c['schedule']}), distill weight {c['distill_weight']}, teacher targets from the "
        f"{result['targets']} -> **after**; val accuracy every {c['eval_every']} steps "
        "(of a copy, BN statistics re-estimated on the same batches: `with_fresh_bn`);",
        f"- *steps to 1pp*: first evaluated step (0 = before calibration) at which every task is within "
        f"{WITHIN_PP:g} point of its teacher; `>{c['steps']}` = not within budget; the next columns: the same with "
        + " and ".join(f"{pp:g}" for pp in LOOSE_PP)
        + " points;",
        f"- activation matching uses {c['align_batches']} calibration batches per task;",
        f"- every (depth, init) cell is run with {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): a seed fixes "
        "the calibration data order (the same for every init), the batches for BN re-estimation and activation "
        "matching; numbers are means over seeds, gaps are taken per seed against `average` on the same data;",
        f"- wall time {result['wall_s'] / 60:.1f} min, {result['jobs']} process(es) of {result['machine']}.",
        "",
        "## Accuracy (%) per task, mean over seeds: " + " / ".join(tasks),
        "",
        f"Teachers: {fmt_acc(ta)}.",
        "",
        "| depth | init | before | after | " + " | ".join(f"steps to {pp:g}pp" for pp in (WITHIN_PP, *LOOSE_PP)) + " |",
        "|---:|---|---|---|" + "---:|" * (1 + len(LOOSE_PP)),
    ]
    for d in depths:
        for init in inits:
            r = rows.get((d, init))
            if r is None:
                continue
            ss = [steps_to_close([(e["step"], e["acc"]) for e in r["evals"]], ta, pp) for pp in (WITHIN_PP, *LOOSE_PP)]
            L.append(
                f"| {d} | {init} | {fmt_acc(r['before'])} | {fmt_acc(r['after'])} | "
                + " | ".join(str(s) if s is not None else f">{c['steps']}" for s in ss)
                + " |"
            )
    L += [
        "",
        "## Gap: aligned minus average (points, mean over tasks and seeds)",
        "",
        "Per task (" + " / ".join(tasks) + ") and per seed in the last columns.",
        "",
        "| depth | init | before | after | before per task | after per task | before per seed | after per seed |",
        "|---:|---|---:|---:|---|---|---|---|",
    ]
    signed = lambda vs: "/".join(f"{v:+.1f}" for v in vs)
    for g in result["gaps"]:
        L.append(
            f"| {g['depth']} | {g['init']} | {g['before_pp']:+.2f} | {g['after_pp']:+.2f} | "
            f"{signed(g['before_pp_task'].values())} | {signed(g['after_pp_task'].values())} | "
            f"{signed(g['before_pp_seeds'])} | {signed(g['after_pp_seeds'])} |"
        )
    L += [
        "",
        "## The alignment claim",
        "",
        '"At every depth >= 2, aligned init beats `average` before calibration, and is at least as accurate '
        'after the same calibration budget" (mean over tasks and seeds, over the depths measured):',
        "",
    ]
    for init, v in result["claim"].items():
        if v["holds"]:
            L.append(f"- `{init}`: holds.")
        else:
            fails = ", ".join(
                f"depth {f['depth']} (before {f['before_pp']:+.2f}, after {f['after_pp']:+.2f})" for f in v["failures"]
            )
            L.append(f"- `{init}`: does NOT hold at {fails}.")
    L += ["", f"![accuracy per depth before and after calibration]({path.with_suffix('.png').name})", ""]
    write_text(path, "\n".join(L))


def write_plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, inits, c = result["tasks"], result["inits"], result["config"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    rows = mean_rows(result["rows"])
    depths = sorted({r["depth"] for r in rows})
    shown = sorted({depths[len(depths) // 3], depths[(2 * len(depths)) // 3]})  # curves at two depths
    styles = {"average": "C0", "weights": "C1", "activations": "C2"}
    marks = ["o", "s", "^", "v"]
    for init in inits:
        rs = [r for r in rows if r["init"] == init]
        ds = [r["depth"] for r in rs]
        for ax, key in ((axes[0], "before"), (axes[1], "after")):
            for j, t in enumerate(tasks):
                ax.plot(
                    ds,
                    [100 * r[key][t] for r in rs],
                    color=styles.get(init),
                    marker=marks[j % 4],
                    linestyle="-" if j == 0 else "--",
                    label=f"{init} / {t}",
                )
        for r in rs:
            if r["depth"] in shown:
                axes[3].plot(
                    [e["step"] for e in r["evals"]],
                    [100 * mean(e["acc"]) for e in r["evals"]],
                    color=styles.get(init),
                    marker=".",
                    linestyle="-" if r["depth"] == shown[0] else "--",
                    label=f"{init}, depth {r['depth']}",
                )
        for pp, ls in ((WITHIN_PP, "-"), (LOOSE_PP[-1], ":")):
            steps = [steps_to_close([(e["step"], e["acc"]) for e in r["evals"]], result["teacher_acc"], pp) for r in rs]
            axes[2].plot(
                ds,
                [s if s is not None else c["steps"] * 1.15 for s in steps],
                color=styles.get(init),
                marker="o",
                linestyle=ls,
                label=f"{init}, {pp:g} pt",
            )
    for j, t in enumerate(tasks):
        for ax in axes[:2]:
            ax.axhline(100 * result["teacher_acc"][t], color="grey", linestyle="-" if j == 0 else "--", linewidth=0.8)
    axes[0].set_title("right after merge (BN stats re-estimated)")
    axes[1].set_title(f"after {c['steps']} calibration steps")
    axes[2].set_title(f"steps until every task within {WITHIN_PP:g} / {LOOSE_PP[-1]:g} pt of teacher")
    axes[2].axhline(c["steps"] * 1.15, color="grey", linewidth=0.8)
    axes[2].text(min(result["depths"]), c["steps"] * 1.17, "not reached", fontsize=8, color="grey")
    axes[2].set_ylim(-5, c["steps"] * 1.3)
    axes[3].axhline(100 * mean(result["teacher_acc"]), color="grey", linewidth=0.8)
    axes[3].set_title("mean val accuracy during calibration")
    axes[3].set_xlabel("calibration step")
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=7)
    for ax in axes[:3]:
        ax.set_xlabel("depth k (shared blocks)")
        ax.set_xticks(depths)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val accuracy (%)")
    fig.suptitle(f"solid: {tasks[0]}, dashed: {', '.join(tasks[1:])}; grey: teachers", fontsize=9)
    axes[2].set_ylabel("calibration steps")
    axes[1].legend(fontsize=7, loc="lower left")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- main
def parse_depths(text: str, num_blocks: int) -> list[int]:
    if text == "all":
        return list(range(1, num_blocks + 1))
    depths = sorted({int(d) for d in text.split(",") if d.strip()})
    bad = [d for d in depths if not 1 <= d <= num_blocks]
    if bad:
        raise SystemExit(f"--depths: {bad[0]} out of range 1..{num_blocks}")
    return depths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params file (data, teachers, features, calibrate)")
    ap.add_argument("--root", default="/tmp/zipper-compare", help="scratch root for shards, teachers, feature cache")
    ap.add_argument("--depths", default="1,2,3,5,7,9,11,13", help="comma list or 'all'")
    ap.add_argument("--inits", default=",".join(INITS))
    ap.add_argument("--steps", type=int, default=150, help="calibration budget per depth and init")
    ap.add_argument("--eval-every", type=int, default=25, help="evaluate val accuracy every N calibration steps")
    ap.add_argument("--batch-size", type=int, default=None, help="calibration batch per task (default: params)")
    ap.add_argument(
        "--targets",
        choices=("online", "cache", "params"),
        default="online",
        help="teacher targets: computed online (augmented batches; features.enabled=false), from the "
        "feature cache (features.enabled=true), or as params.yaml says. On this 2-core box the "
        "cache is the slower one (decoding 13 fp16 taps per sample costs more than a teacher forward)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (small matrices: more than 1 is far slower)"
    )
    ap.add_argument("--seeds", default="0", help="comma list: each seed reruns every cell with its own data order")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes, one (depth, seed) unit at a time each")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. calibrate.lr=0.03")
    ap.add_argument("--out", default="docs/alignment", help="output prefix: writes .json, .md, .png")
    ap.add_argument(
        "--render-only", action="store_true", help="rewrite <out>.md and <out>.png from <out>.json, run nothing"
    )
    args = ap.parse_args(argv)
    if args.render_only:
        out = Path(args.out)
        result: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())
        write_markdown(out.with_suffix(".md"), result)
        write_plot(out.with_suffix(".png"), result)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()

    overrides = {**parse_overrides(args.set), "calibrate.steps": args.steps}
    if args.batch_size:
        overrides["calibrate.batch_size"] = args.batch_size
    if args.targets != "params":
        overrides["features.enabled"] = args.targets == "cache"
    params = load_params(args.params, overrides)
    inits = [i for i in args.inits.split(",") if i]
    if any(i not in INITS for i in inits):
        raise SystemExit(f"--inits: expected a subset of {INITS}")
    if args.eval_every < 1 or args.steps < 1 or args.jobs < 1:
        raise SystemExit("--steps, --eval-every and --jobs must be >= 1")
    layout = Layout(Path(args.root))
    ensure_teachers(params, layout)
    ctx = load_context(params, args.root, args.eval_every, inits)
    tasks, teachers, val = params.tasks, ctx["teachers"], ctx["val"]
    depths = parse_depths(args.depths, next(iter(teachers.values())).num_blocks)
    seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    teacher_acc = {t: accuracy(teachers[t].eval(), val[t]) for t in tasks}
    log.info("teachers: %s", {t: f"{100 * a:.2f}%" for t, a in teacher_acc.items()})
    cfg = ctx["cfg"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        [".venv/bin/python", "benchmarks/compare_inits.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    result = {
        "command": command,
        "root": str(layout.root),
        "tasks": tasks,
        "inits": inits,
        "depths": depths,
        "seeds": seeds,
        "data": ", ".join(
            f"{t} ({read_manifest(layout.shards(t))['splits']['train']['count']} train / "
            f"{sum(len(y) for _, y in val[t])} val, {teachers[t].num_classes} classes)"
            for t in tasks
        ),
        "arch": f"{params.teachers.arch}-{params.teachers.width:g} at {params.teachers.input_size} px",
        "teacher_acc": teacher_acc,
        "targets": "feature cache" if params.features.enabled else "teachers online (augmented)",
        "config": {
            "scope": params.zipper.scope,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "optimizer": cfg.optimizer,
            "schedule": cfg.schedule,
            "distill_weight": cfg.distill_weight,
            "kd_weight": cfg.kd_weight,
            "grad_clip": cfg.grad_clip,
            "eval_every": args.eval_every,
            "bn_reset_batches": ctx["bn_batches"],
            "align_batches": params.zipper.align_batches,
            "threads": args.threads,
        },
        "machine": f"{args.threads} torch thread(s), CPU, torch {torch.__version__}",
        "jobs": args.jobs,
        "rows": [],
    }
    units = [(d, s) for s in seeds for d in depths]
    log.info("%d units (depth x seed), %d init(s) each, on %d process(es)", len(units), len(inits), args.jobs)

    def collect(rows: list[dict]) -> None:
        result["rows"] = sorted(result["rows"] + rows, key=lambda r: (r["depth"], r["seed"], inits.index(r["init"])))
        result["gaps"] = gaps(result["rows"], inits)
        result["claim"] = claim(result["gaps"])
        result["wall_s"] = time.perf_counter() - wall0
        write_text(out.with_suffix(".json"), json.dumps(result, indent=1))  # partial results survive a kill

    if args.jobs == 1:
        _CTX.update(ctx)
        for unit in units:
            collect(run_unit(*unit))
    else:
        # spawn: fresh interpreters (no forked torch thread pools); each loads teachers and val once.
        with ProcessPoolExecutor(
            args.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(params, args.root, args.eval_every, inits, args.threads),
        ) as pool:
            for future in as_completed([pool.submit(run_unit, *unit) for unit in units]):
                collect(future.result())
    write_markdown(out.with_suffix(".md"), result)
    write_plot(out.with_suffix(".png"), result)
    log.info("wrote %s.{json,md,png} in %.1f min", out, result["wall_s"] / 60)


if __name__ == "__main__":
    main()
