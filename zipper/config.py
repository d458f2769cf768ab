"""params.yaml -> frozen dataclasses, one per stage section; the only config source.

Unknown keys, wrong types and values out of range (`RANGES`) are errors that name the key
(`calibrate.lr: expected float, got 'fast'`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import yaml

from .calibrate import CalibrateConfig
from .data.sources import resolve
from .graph import param_value
from .io import sha256_json
from .merge import INITS, SCOPES
from .models import ARCHS, build_model
from .runtime import RuntimeConfig


@dataclass(frozen=True)
class DataConfig:
    tasks: dict[str, dict[str, Any]]  # task name -> source spec (see zipper.data.write_shards)
    maxcount: int = 1000  # samples per shard
    on_bad_sample: str = "error"  # or "skip"
    holdout: float = 0.0  # fraction of each task's train samples no stage trains on (what calibrate.until checks)

    def __post_init__(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(f"data.tasks: zippering needs at least two tasks, got {list(self.tasks)}")
        for task, src in self.tasks.items():
            try:
                resolve(src)  # keys and source kinds now: a typo must not wait for the data stage
            except ValueError as e:
                raise ValueError(f"data.tasks.{task}: {e}") from None
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample: expected 'error' or 'skip', got {self.on_bad_sample!r}")


@dataclass(frozen=True)
class TeachersConfig:
    arch: str = "mobilenet_v1"
    width: float = 0.25
    input_size: int = 32
    steps: int = 1200
    batch_size: int = 64
    lr: float = 0.4
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: bool = True
    label_smoothing: float = 0.1
    seed: int = 0
    checkpoints: dict[str, str] = field(default_factory=dict)  # task -> file to import instead of training

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"teachers.arch: unknown {self.arch!r}; registered: {', '.join(sorted(ARCHS))}")


@dataclass(frozen=True)
class FeaturesConfig:
    enabled: bool = True  # cache teacher targets; off = calibration computes them online
    budget_mb: float = 1024.0
    batch_size: int = 128


@dataclass(frozen=True)
class ZipperConfig:
    scope: str = "block"
    init: str = "activations"
    align_batches: int = 8  # calibration batches per task seen by init "activations"
    # The depth chain for DVC's foreach (stages zip@<depth>): depth -> the depth it starts from.
    # Keys are quoted strings: DVC's foreach silently drops a mapping with integer keys.
    chain: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"zipper.scope: unknown {self.scope!r}; expected one of {SCOPES}")
        if self.init not in INITS:
            raise ValueError(f"zipper.init: unknown {self.init!r}; expected one of {INITS}")
        for i, (depth, prev) in enumerate(self.chain.items(), 1):
            if (depth, prev) != (str(i), i - 1):
                raise ValueError(
                    f"zipper.chain: entry {i} must be '\"{i}\": {i - 1}' (depth: previous depth), "
                    f"got '{depth!r}: {prev!r}'"
                )

    @property
    def depths(self) -> list[int]:
        return [int(depth) for depth in self.chain]


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 256
    latency_repeats: int = 100
    threads: int = 1
    memory: bool = True  # measure peak forward memory in child processes


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite file mlflow.db at the project root (made absolute)
    experiment: str = "zipper"
    registered_model: str = "zipper"
    live: bool = True  # zip and evaluate log each depth as they finish; false: register logs them all at the end

    def __post_init__(self) -> None:
        if urlsplit(self.uri).password:  # params are committed, logged, and copied into dvc.lock
            raise ValueError(
                "tracking.uri: holds a password; leave it empty and set MLFLOW_TRACKING_URI (or "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) in the environment instead"
            )

    def tracking_uri(self, root: str | os.PathLike) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class Params:
    data: DataConfig
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    zipper: ZipperConfig = field(default_factory=ZipperConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        for key, interval in RANGES.items():
            section, _, name = key.rpartition(".")
            holder = param_value(self, section)
            if holder is not None:  # None: an optional section left out (calibrate.until)
                _check_range(key, getattr(holder, name), interval)
        unknown = sorted(set(self.teachers.checkpoints) - set(self.data.tasks))
        if unknown:
            raise ValueError(
                f"teachers.checkpoints: {unknown[0]!r} is not a task (tasks: {', '.join(self.data.tasks)})"
            )
        self._check_chain_fits()
        if self.calibrate.until is not None and not self.data.holdout:
            raise ValueError(
                "calibrate.until: stops on the held-out split, but data.holdout is 0; hold out a "
                "fraction of the train samples (e.g. data.holdout: 0.2)"
            )

    def _check_chain_fits(self) -> None:
        """The deepest depth of the chain must exist in the architecture: found now, not after hours of
        calibrating the depths before it."""
        if not self.zipper.chain:
            return
        t = self.teachers
        # The block count depends on the architecture alone: the narrowest build reads it cheapest.
        blocks = build_model(t.arch, 2, width=0.25, input_size=t.input_size).num_blocks
        if self.zipper.depths[-1] > blocks:
            raise ValueError(
                f"zipper.chain: depth {self.zipper.depths[-1]} is deeper than {t.arch}, which has "
                f'{blocks} blocks; the chain can go up to "{blocks}": {blocks - 1}'
            )

    @property
    def tasks(self) -> list[str]:
        return list(self.data.tasks)

    def section_hash(self, name: str) -> str:
        """What a stage's outputs record as the config that made them."""
        return sha256_json(dataclasses.asdict(getattr(self, name)))


# Every numeric setting's valid range, as an interval: checked when params.yaml is loaded, so a bad
# value fails before any stage runs rather than as a traceback (or a silent NaN) hours later.
RANGES: dict[str, str] = {
    "data.maxcount": "[1, inf)",
    "data.holdout": "[0, 1)",
    "teachers.width": "(0, inf)",
    "teachers.input_size": "[8, inf)",
    "teachers.steps": "[1, inf)",
    "teachers.batch_size": "[1, inf)",
    "teachers.lr": "(0, inf)",
    "teachers.weight_decay": "[0, inf)",
    "teachers.momentum": "[0, 1)",
    "teachers.label_smoothing": "[0, 1)",
    "features.budget_mb": "[0, inf)",
    "features.batch_size": "[1, inf)",
    "zipper.align_batches": "[1, inf)",
    "calibrate.steps": "[0, inf)",
    "calibrate.batch_size": "[1, inf)",
    "calibrate.lr": "(0, inf)",
    "calibrate.momentum": "[0, 1)",
    "calibrate.weight_decay": "[0, inf)",
    "calibrate.warmup_steps": "[0, inf)",
    "calibrate.distill_weight": "[0, inf)",
    "calibrate.kd_weight": "[0, inf)",
    "calibrate.kd_temperature": "(0, inf)",
    "calibrate.grad_clip": "[0, inf)",
    "calibrate.bn_reset_batches": "[0, inf)",
    "calibrate.checkpoint_every": "[1, inf)",
    "calibrate.until.max_drop_pp": "[0, inf)",
    "calibrate.until.check_every": "[1, inf)",
    "calibrate.until.plateau": "[0, 1)",
    "calibrate.until.holdout_samples": "[1, inf)",
    "evaluate.batch_size": "[1, inf)",
    "evaluate.latency_repeats": "[1, inf)",
    "evaluate.threads": "[1, inf)",
    "runtime.num_workers": "[0, inf)",
    "runtime.threads": "[0, inf)",
    "runtime.nproc_per_node": "[1, inf)",
}


def _check_range(key: str, value: float, interval: str) -> None:
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below and math.isfinite(value)):
        raise ValueError(f"{key}: expected a value in {interval}, got {value!r}")


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings (the `--set` option) -> {dotted key: YAML-parsed value}."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def load_params(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; `overrides` are dotted keys (`calibrate.steps`) applied on top."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"params file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return _build(Params, raw, "")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")
    node[last] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where.rstrip('.') or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown key {where + unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {name: _convert(hints[name], value, f"{where}{name}") for name, value in raw.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing key {where + missing[0]!r}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint) or hint
    if origin in (dict, list):
        if not isinstance(value, origin):
            raise ValueError(f"{key}: expected a {origin.__name__}, got {value!r}")
        return value
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin in (int, str, bool) and type(value) is origin:
        return value
    if origin is types.UnionType or origin is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        return _convert(options[0], value, key) if len(options) == 1 else value
    raise ValueError(f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r}")
