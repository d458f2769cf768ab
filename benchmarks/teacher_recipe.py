"""Teacher recipe sweep: does val accuracy plateau, and is it the same across seeds and float kernels?

Trains teachers with `zipper.teachers.train_teacher` for every recipe x step count x task, then
for every step count also the other seeds and kernel paths (one factor at a time):

- seeds:  every `--seeds` value on the base kernel path (`teachers.seed`; as in the pipeline, task i
          trains with seed + i);
- paths:  the first `--seeds` value on the base path (first value of each of `--threads`, `--isa`,
          `--onednn`) and on each single change of it: other torch thread counts, `ATEN_CPU_CAPABILITY`
          (ATen's vectorised kernels), `ONEDNN_MAX_CPU_ISA` (oneDNN convolutions). These stand in for
          other machines; the env vars are read at `import torch`, so every unit is a subprocess.

    .venv/bin/python benchmarks/teacher_recipe.py [--params params.yaml] [--root /tmp/zipper-teacher-recipe]
        [--recipe NAME:KEY=VALUE,... ...] [--steps 450,900,1800] [--seeds 0] [--threads 1] [--isa avx2]
        [--onednn AVX2] [--tasks shapes,textures] [--jobs 2] [--out /tmp/zipper-teacher-recipe/teachers]

A recipe starts from params.yaml (`teachers` and `data.tasks`) and overrides teacher keys
(batch_size, lr, weight_decay, momentum, augment, label_smoothing, deterministic = torch
deterministic algorithms), synthetic-source keys (n_train, n_val) or difficulty knobs of
zipper/data/synthetic.py (`NOISE_SIGMA=[0.02,0.3]`). `--recipe today:` is params.yaml as is.
Shards are written once per data setting under `--root` and reused. Results accumulate in
`<out>.json` (a unit already there is not rerun), `<out>.md` holds the tables and the commands,
`<out>.logs/` the workers' progress.
`--jobs` slots run at once; a unit with T threads holds T slots.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEACHER_KEYS = ("batch_size", "lr", "weight_decay", "momentum", "augment", "label_smoothing", "deterministic")
DATA_KEYS = ("n_train", "n_val")
ENV = {"isa": "ATEN_CPU_CAPABILITY", "onednn": "ONEDNN_MAX_CPU_ISA"}


# ------------------------------------------------------------------------------------ worker
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One teacher (runs in a subprocess whose env already holds the kernel settings)."""
    import torch

    from zipper.teachers import train_teacher

    torch.set_num_threads(spec["threads"])
    torch.use_deterministic_algorithms(bool(spec.pop("deterministic", False)))
    t0 = time.perf_counter()
    model, acc = train_teacher(spec.pop("shards"), **{k: v for k, v in spec.items() if k not in ("threads",)})
    wall = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(v.detach().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
    return {
        "acc": 100 * acc,
        "wall_s": wall,
        "weights_sha256": digest[:16],
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


# ------------------------------------------------------------------------------------ planning
def is_knob(key: str) -> bool:
    """A difficulty knob of the synthetic generator (a module constant such as NOISE_SIGMA)."""
    from zipper.data import synthetic

    return key.isupper() and isinstance(getattr(synthetic, key, None), (int, float, tuple))


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    over = {}
    for item in filter(None, re.split(r",(?![^\[]*\])", rest)):  # commas inside [...] belong to a value
        key, sep, value = item.partition("=")
        if not sep or not (key in TEACHER_KEYS + DATA_KEYS or is_knob(key)):
            raise SystemExit(
                f"--recipe {text!r}: expected KEY=VALUE with KEY in {', '.join(TEACHER_KEYS + DATA_KEYS)} "
                "or a knob of zipper/data/synthetic.py"
            )
        over[key] = yaml.safe_load(value)
    return name, over


@contextmanager
def knobs(values: dict[str, Any]) -> Iterator[None]:
    """Set synthetic-generator knobs for the block (lists become tuples), then restore them."""
    from zipper.data import synthetic

    old = {k: getattr(synthetic, k) for k in values}
    try:
        for k, v in values.items():
            setattr(synthetic, k, tuple(v) if isinstance(v, list) else v)
        yield
    finally:
        for k, v in old.items():
            setattr(synthetic, k, v)


def kernel_paths(threads: list[int], isa: list[str], onednn: list[str]) -> list[dict[str, Any]]:
    """The base path, then each single change of it."""
    base = {"threads": threads[0], "isa": isa[0], "onednn": onednn[0]}
    paths = [base]
    for key, values in (("threads", threads), ("isa", isa), ("onednn", onednn)):
        paths += [{**base, key: v} for v in values[1:]]
    return paths


def path_name(p: dict[str, Any]) -> str:
    return f"threads={p['threads']} aten={p['isa']} onednn={p['onednn']}"


def plan(args: argparse.Namespace, params: dict[str, Any]) -> list[dict[str, Any]]:
    paths = kernel_paths(args.threads, args.isa, args.onednn)
    units = []
    for name, over in args.recipe:
        for steps in args.steps:
            runs = [(s, paths[0]) for s in args.seeds] + [(args.seeds[0], p) for p in paths[1:]]
            for seed, path in runs:
                for i, task in enumerate(args.tasks):
                    units.append(
                        {
                            "recipe": name,
                            "overrides": over,
                            "task": task,
                            "steps": steps,
                            "seed": seed,
                            **path,
                            "data": {
                                **params["data"]["tasks"][task],
                                **{k: v for k, v in over.items() if k in DATA_KEYS},
                            },
                            "knobs": {k: v for k, v in over.items() if is_knob(k)},
                            "task_seed": seed + params["tasks"].index(task),
                        }
                    )
    return units


def unit_key(u: dict[str, Any]) -> str:
    keys = ("recipe", "overrides", "task", "steps", "seed", "threads", "isa", "onednn")
    return json.dumps({k: u[k] for k in keys}, sort_keys=True)


def shard_dir(root: Path, task: str, data: dict[str, Any], knob_values: dict[str, Any]) -> Path:
    """One folder per data setting (and per version of the synthetic generator and its knobs)."""
    from zipper.data import synthetic

    h = hashlib.sha256(json.dumps([data, knob_values], sort_keys=True).encode() + Path(synthetic.__file__).read_bytes())
    return root / "shards" / f"{task}-{h.hexdigest()[:12]}"


# ------------------------------------------------------------------------------------ running
class Slots:
    """`n` CPU slots; `hold(k)` waits until k are free."""

    def __init__(self, n: int) -> None:
        self.free, self.cv = n, threading.Condition()

    @contextmanager
    def hold(self, k: int) -> Iterator[None]:
        with self.cv:
            self.cv.wait_for(lambda: self.free >= k)
            self.free -= k
        try:
            yield
        finally:
            with self.cv:
                self.free += k
                self.cv.notify_all()


def run_unit(
    u: dict[str, Any], teachers: dict[str, Any], shards: Path, slots: Slots, jobs: int, log_dir: Path
) -> dict[str, Any]:
    spec = {
        k: teachers[k]
        for k in ("arch", "width", "input_size", "batch_size", "lr", "weight_decay", "momentum", "augment")
    }
    spec.update({k: v for k, v in u["overrides"].items() if k in TEACHER_KEYS})
    spec.update(shards=str(shards), steps=u["steps"], seed=u["task_seed"], threads=u["threads"])
    env = {**os.environ, ENV["isa"]: u["isa"], ENV["onednn"]: u["onednn"], "OMP_NUM_THREADS": str(u["threads"])}
    name = f"{u['recipe']}-{u['task']}-{u['steps']}-s{u['seed']}-t{u['threads']}-{u['isa']}-{u['onednn']}"
    log_file = log_dir / f"{name}.log"  # the worker's stderr: tqdm progress, tracebacks
    with slots.hold(min(u["threads"], jobs)), open(log_file, "w") as err:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({unit_key(u)}):\n{log_file.read_text()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ report
def spread(values: list[float]) -> float:
    return max(values) - min(values)


def markdown(results: list[dict[str, Any]], commands: list[str], base_path: dict[str, Any]) -> str:
    tasks = sorted({r["task"] for r in results})
    recipes: dict[str, dict[str, Any]] = {}
    for r in results:
        recipes.setdefault(r["recipe"], r["overrides"])
    base_seed = min(r["seed"] for r in results)

    def on_base_path(r: dict[str, Any]) -> bool:
        return all(r[k] == v for k, v in base_path.items())

    def base(r: dict[str, Any]) -> bool:
        return r["seed"] == base_seed and on_base_path(r)

    lines = [
        "Val accuracy (%) of MobileNetV1-0.25 teachers; recipes override params.yaml `teachers` / `data.tasks`:",
        "",
    ]
    lines += [
        f"- `{n}`: {', '.join(f'{k}={v}' for k, v in o.items()) or 'params.yaml as is'}" for n, o in recipes.items()
    ]
    lines += [
        "",
        f"### Steps (seed {base_seed}, {path_name(base_path)})",
        "",
        "| recipe | steps | " + " | ".join(f"{t} | Δ vs half" for t in tasks) + " | s/teacher |",
        "|---|---:|" + "---:|---:|" * len(tasks) + "---:|",
    ]
    for name in recipes:
        rows = {(r["steps"], r["task"]): r for r in results if r["recipe"] == name and base(r)}
        for steps in sorted({s for s, _ in rows}):
            cells = []
            for t in tasks:
                row, half = rows.get((steps, t)), rows.get((steps // 2, t)) if steps % 2 == 0 else None
                cells += [
                    f"{row['acc']:.2f}" if row else "",
                    f"{row['acc'] - half['acc']:+.2f}" if row and half else "",
                ]
            walls = [r["wall_s"] for (s, _), r in rows.items() if s == steps]
            lines.append(f"| {name} | {steps} | " + " | ".join(cells) + f" | {sum(walls) / len(walls):.0f} |")
    for title, varies in (("Seeds (base kernel path)", "seed"), ("Kernel paths (seed %d)" % base_seed, "path")):
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in results:
            if (varies == "seed" and on_base_path(r)) or (varies == "path" and r["seed"] == base_seed):
                groups.setdefault((r["recipe"], r["steps"], r["task"]), []).append(r)
        groups = {k: v for k, v in groups.items() if len(v) > 1}
        if not groups:
            continue
        lines += [
            "",
            f"### {title}",
            "",
            "| recipe | steps | task | " + varies + ": accuracy | spread | distinct weights |",
            "|---|---:|---|---|---:|---:|",
        ]
        for (name, steps, task), rs in sorted(
            groups.items(), key=lambda kv: (list(recipes).index(kv[0][0]), *kv[0][1:])
        ):
            label = (lambda r: f"{r['seed']}") if varies == "seed" else path_name
            accs = ", ".join(f"{label(r)}: {r['acc']:.2f}" for r in rs)
            lines.append(
                f"| {name} | {steps} | {task} | {accs} | {spread([r['acc'] for r in rs]):.2f} | "
                f"{len({r['weights_sha256'] for r in rs})}/{len(rs)} |"
            )
    lines += ["", "Made with:", "", "```"] + commands + ["```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--root", default="/tmp/zipper-teacher-recipe", help="scratch: shards")
    p.add_argument("--recipe", action="append", type=parse_recipe, help="NAME:KEY=VALUE,... (repeatable)")
    ints = lambda s: [int(x) for x in s.split(",")]
    strs = lambda s: s.split(",")
    p.add_argument("--steps", type=ints, default=[450, 900, 1800])
    p.add_argument("--seeds", type=ints, default=[0])
    p.add_argument("--threads", type=ints, default=[1])
    p.add_argument("--isa", type=strs, default=["avx2"], help="ATEN_CPU_CAPABILITY values (default, avx2, avx512)")
    p.add_argument("--onednn", type=strs, default=["AVX2"], help="ONEDNN_MAX_CPU_ISA values (SSE41, AVX2, ...)")
    p.add_argument("--tasks", type=strs, default=None)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="/tmp/zipper-teacher-recipe/teachers", help="writes <out>.json and <out>.md")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from zipper.data import write_shards
    from zipper.io import write_json, write_text

    raw = yaml.safe_load(Path(args.params).read_text())
    params = {"data": raw["data"], "tasks": list(raw["data"]["tasks"]), "teachers": raw["teachers"]}
    args.tasks = args.tasks or params["tasks"]
    args.recipe = args.recipe or [("today", {})]
    out_json = Path(args.out + ".json")
    state = json.loads(out_json.read_text()) if out_json.exists() else {"results": [], "commands": []}
    command = ".venv/bin/python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    if command not in state["commands"]:
        state["commands"].append(command)
    done = {unit_key(r) for r in state["results"]}
    units = [u for u in plan(args, params) if unit_key(u) not in done]
    print(f"{len(units)} teachers to train ({len(done)} already in {out_json})", flush=True)

    root = Path(args.root)
    shards = {}
    for u in units:
        d = shard_dir(root, u["task"], u["data"], u["knobs"])
        if not (d / "manifest.json").exists():
            print(f"writing shards {d}", flush=True)
            with knobs(u["knobs"]):
                write_shards(u["data"], u["task"], d, maxcount=params["data"].get("maxcount", 1000))
        shards[unit_key(u)] = d

    log_dir = Path(args.out + ".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    base_path = kernel_paths(args.threads, args.isa, args.onednn)[0]
    slots, lock, t0, failed = Slots(args.jobs), threading.Lock(), time.perf_counter(), 0
    units.sort(key=lambda u: -u["steps"] * u["threads"])  # longest first: less idle time at the end
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            pool.submit(run_unit, u, params["teachers"], shards[unit_key(u)], slots, args.jobs, log_dir): u
            for u in units
        }
        for n, fut in enumerate(as_completed(futures), 1):
            u = futures[fut]
            try:
                res = {**u, **fut.result()}
            except RuntimeError as e:  # report it, keep the others going
                failed += 1
                print(f"[{n}/{len(units)}] FAILED {e}", file=sys.stderr, flush=True)
                continue
            with lock:
                state["results"].append(res)
                write_json(out_json, state)
                write_text(args.out + ".md", markdown(state["results"], state["commands"], base_path))
            print(
                f"[{n}/{len(units)} {time.perf_counter() - t0:5.0f}s] {u['recipe']} {u['task']} steps={u['steps']} "
                f"seed={u['seed']} {path_name(u)}: {res['acc']:.2f}% in {res['wall_s']:.0f} s",
                flush=True,
            )
    write_text(args.out + ".md", markdown(state["results"], state["commands"], base_path))
    print(f"wrote {out_json} and {args.out}.md" + (f"; {failed} teachers FAILED" if failed else ""), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
