"""The pipeline's stage graph, declared once: where every file lives (`Layout`) and what each stage reads,
writes and uses (params keys, package code).

dvc.yaml is rendered from it (`zipper dvc-yaml`, zipper/dvc_yaml.py) and the Prefect flow derives each
task's cache key from it, so the two front ends cannot disagree about what a stage depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

# Paths relative to the project root: {task} is filled per task, {depth} per depth, {prev} with the
# calibrated depth that {depth} starts from (zipper.chain).
SHARDS = "data/shards/{task}"
TEACHER = "models/teachers/{task}.pt"
TEACHER_METRICS = "metrics/teachers.json"
FEATURES = "data/features/{task}"
ZIPPED = "models/zip/depth_{depth}.pt"
PREV_ZIPPED = "models/zip/depth_{prev}.pt"
CURVES = "models/zip/depth_{depth}.curves.json"
PARTIAL = "models/zip/depth_{depth}.partial.pt"  # mid-calibration state, removed when the depth completes
METRICS = "metrics/depth_{depth}.json"
REPORTS = "reports"
TABLE, SUMMARY, DEPTHS, ACCURACY_PLOT, RATIOS_PLOT = (
    f"{REPORTS}/{name}" for name in ("table.md", "summary.json", "depths.json", "accuracy.png", "ratios.png")
)
PLOTS = (ACCURACY_PLOT, RATIOS_PLOT)  # each also as .svg beside it
REPORT_FILES = (TABLE, SUMMARY, DEPTHS, *PLOTS, *(p.replace(".png", ".svg") for p in PLOTS))
MLFLOW_RUNS = f"{REPORTS}/mlflow.json"  # run ids of this machine's MLflow store: not committed
PIPELINE_RUN = ".zipper-mlflow.json"  # the open MLflow pipeline run, found there by each stage process of it
COMMITTED = (TEACHER_METRICS, METRICS, *REPORT_FILES)  # small outputs that live in git, not the DVC cache

DATA_PARALLEL_STAGES = ("teachers", "zip")  # the stages that train (torchrun); the rest run in one process

# Every stage runs these (the stage functions, params validation and defaults, file and device helpers).
COMMON_CODE = ("stages.py", "config.py", "io.py", "runtime.py", "locks.py")


@dataclass(frozen=True)
class Layout:
    """Where every stage's inputs and outputs live under the project root."""

    root: Path = Path(".")

    def path(self, template: str, **fill: object) -> Path:
        return self.root / template.format(**fill)

    def shards(self, task: str) -> Path:
        return self.path(SHARDS, task=task)

    def teacher(self, task: str) -> Path:
        return self.path(TEACHER, task=task)

    @property
    def teacher_metrics(self) -> Path:
        return self.path(TEACHER_METRICS)

    def features(self, task: str) -> Path:
        return self.path(FEATURES, task=task)

    def zipped(self, depth: int) -> Path:
        return self.path(ZIPPED, depth=depth)

    def curves(self, depth: int) -> Path:
        return self.path(CURVES, depth=depth)

    def partial(self, depth: int) -> Path:
        return self.path(PARTIAL, depth=depth)

    def metrics(self, depth: int) -> Path:
        return self.path(METRICS, depth=depth)

    @property
    def reports(self) -> Path:
        return self.path(REPORTS)

    @property
    def report_files(self) -> tuple[Path, ...]:
        return tuple(self.path(f) for f in REPORT_FILES)

    @property
    def mlflow_runs(self) -> Path:
        return self.path(MLFLOW_RUNS)

    @property
    def pipeline_run(self) -> Path:
        return self.path(PIPELINE_RUN)


@dataclass(frozen=True)
class Stage:
    """One stage of the graph. `each`: "task" (the flow runs it per task, DVC once for all tasks), "depth"
    (once per depth of zipper.chain, depth 0 excluded) or "once" (`depth` then fixes the depth, if any).

    `params` are dotted keys of params.yaml; `{task}` in a key means that task's entry, and the pseudo-key
    "tasks" the task names in order (DVC, which cannot name that, tracks data.tasks); "*" means all.
    `code` names files or folders of the package. `imports` is a params key mapping tasks to files the
    stage also reads (teachers imported instead of trained).
    """

    name: str  # dvc.yaml's stage name
    command: str  # `zipper <command>`
    each: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    params: tuple[str, ...]
    code: tuple[str, ...]
    depth: int | None = None
    shared: tuple[str, ...] = ()  # JSON files the stage adds its task's entry to (others write them too)
    imports: str | None = None

    @property
    def all_code(self) -> tuple[str, ...]:
        return (*COMMON_CODE, *self.code)


# Package code by what it imports (a test checks these against the stages' import closures).
_DATA = ("data", "models", "preprocess.py")
_NETS = (*_DATA, "merge", "teachers.py", "evaluate.py", "parallel.py", "guard.py")  # train, load and evaluate nets
_ZIP = (*_NETS, "calibrate.py")
_MEASURE = (*_NETS, "profiling.py", "memory.py")
_EVALUATE_PARAMS = ("evaluate", "teachers.input_size", "tasks")

STAGES: tuple[Stage, ...] = (
    Stage(
        "data",
        "data",
        "task",
        reads=(),
        writes=(SHARDS,),
        params=("data.tasks.{task}", "data.maxcount", "data.on_bad_sample", "teachers.input_size"),
        code=_DATA,
        imports="data.tasks",
    ),
    Stage(
        "teachers",
        "teachers",
        "task",
        reads=(SHARDS,),
        writes=(TEACHER,),
        shared=(TEACHER_METRICS,),
        params=("teachers", "data.holdout", "tasks"),
        code=_NETS,
        imports="teachers.checkpoints",
    ),
    Stage(
        "features",
        "features",
        "task",
        reads=(SHARDS, TEACHER),
        writes=(FEATURES,),
        params=("features", "teachers.input_size"),
        code=_NETS,
    ),
    Stage(
        "zip0",
        "zip",
        "once",
        depth=0,
        reads=(TEACHER,),
        writes=(ZIPPED, CURVES),
        params=("zipper.scope", "tasks"),
        code=_ZIP,
    ),
    Stage(
        "zip",
        "zip",
        "depth",
        reads=(PREV_ZIPPED, TEACHER, FEATURES, SHARDS),
        writes=(ZIPPED, CURVES),
        params=(
            "zipper.scope",
            "zipper.init",
            "zipper.align_batches",
            "calibrate",
            "teachers.input_size",
            "teachers.augment",
            "features.enabled",
            "data.holdout",
            "tasks",
        ),
        code=_ZIP,
    ),
    Stage(
        "evaluate0",
        "evaluate",
        "once",
        depth=0,
        reads=(ZIPPED, CURVES, TEACHER, TEACHER_METRICS, SHARDS),
        writes=(METRICS,),
        params=_EVALUATE_PARAMS,
        code=_MEASURE,
    ),
    # Deeper depths read the teachers' side (size, latency, memory), measured once at depth 0.
    Stage(
        "evaluate",
        "evaluate",
        "depth",
        reads=(ZIPPED, CURVES, TEACHER, TEACHER_METRICS, SHARDS, METRICS.format(depth=0)),
        writes=(METRICS,),
        params=_EVALUATE_PARAMS,
        code=_MEASURE,
    ),
    Stage("report", "report", "once", reads=(METRICS,), writes=REPORT_FILES, params=("tasks",), code=("report.py",)),
    Stage(
        "register",
        "register",
        "once",
        reads=(*REPORT_FILES, ZIPPED, CURVES, METRICS, f"{SHARDS}/manifest.json"),
        writes=(MLFLOW_RUNS,),
        params=("*",),
        code=("tracking.py", "mlflow_model.py", "export.py", "preprocess.py", "data", "models", "merge"),
    ),
)


def stage_of(command: str, arg: str | int | None = None) -> Stage:
    """The stage that `zipper <command>` runs for one task or depth (`zip --depth 0` is zip0)."""
    matches = [s for s in STAGES if s.command == command]
    if not matches:
        raise ValueError(f"unknown stage command {command!r}")
    return next((s for s in matches if s.depth is not None and s.depth == arg), matches[-1])


@dataclass(frozen=True)
class StageIO:
    """One run of a stage (a task, a depth, or the whole stage): concrete paths, params keys, code."""

    reads: tuple[Path, ...]
    writes: tuple[Path, ...]  # files or folders this run alone writes (hashed after it runs)
    params: tuple[str, ...]
    code: tuple[str, ...]
    shared: tuple[tuple[Path, str], ...] = ()  # (JSON file, the key this run adds to it)


def _expand(
    templates: Iterable[str], layout: Layout, tasks: list[str], depths: list[int], prev: int | None
) -> tuple[Path, ...]:
    """Each template filled for every task and depth it names (in that order), duplicates dropped."""
    out: dict[Path, None] = {}
    for template in templates:
        for task in tasks if "{task}" in template else [None]:
            for depth in depths if "{depth}" in template else [None]:
                out[layout.path(template, task=task, depth=depth, prev=prev)] = None
    return tuple(out)


def param_value(params: Any, key: str) -> Any:
    """The value a dotted params key names (`calibrate.lr`, `data.tasks.shapes`), through the config
    dataclasses and the mappings inside them."""
    node = params
    for part in key.split("."):
        node = node[part] if isinstance(node, Mapping) else getattr(node, part)
    return node


def imported_files(s: Stage, params) -> Mapping[str, str]:
    """Task -> the user's file or folder a stage reads, where the params key `s.imports` names it: an
    imported teacher checkpoint, or the folder a data source reads (an image folder, a torchvision
    dataset that is not downloaded). Edit or replace one and the stage runs again."""
    if not s.imports:
        return {}
    return {
        task: value["root"] if isinstance(value, Mapping) else value
        for task, value in param_value(params, s.imports).items()
        if not isinstance(value, Mapping) or _reads_local_folder(value)
    }


def _reads_local_folder(source: Mapping[str, Any]) -> bool:
    return source.get("source") == "imagefolder" or (
        source.get("source") == "torchvision" and not source.get("download", False)
    )


def stage_io(s: Stage, params, layout: Layout, arg: str | int | None = None) -> StageIO:
    """What one run of `s` reads and writes: `arg` is its task ("task" stages) or depth ("depth" stages)."""
    depths: list[int] = [0, *params.zipper.depths]
    tasks: list[str] = params.tasks
    prev: int | None = None
    if s.each in ("task", "depth"):
        if arg is None:
            raise ValueError(f"stage {s.name} runs once per {s.each}: name one")
        if s.each == "task":
            tasks, run_depths = [str(arg)], depths
        else:
            run_depths, prev = [int(arg)], params.zipper.chain[str(arg)]
    else:
        run_depths = depths if s.depth is None else [s.depth]
    imported = imported_files(s, params)
    reads = _expand(s.reads, layout, tasks, run_depths, prev) + tuple(Path(imported[t]) for t in tasks if t in imported)
    keys = tuple(k.format(task=arg) if "{task}" in k else k for k in s.params)
    shared = tuple((layout.path(f), t) for f in s.shared for t in tasks)
    return StageIO(
        reads=reads,
        writes=_expand(s.writes, layout, tasks, run_depths, prev),
        params=keys,
        code=s.all_code,
        shared=shared,
    )
