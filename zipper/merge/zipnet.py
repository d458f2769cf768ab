"""ZipperNet: one shared trunk (the first `depth` blocks) and one branch + head per task.

Every part is a `Backbone` of the same arch whose positions owned by another part are
`nn.Identity`, so parameter names are identical across teachers, trunk and branches, and
merging is a mapping between state_dict keys.

- scope "block": the trunk holds the stem and blocks[:depth] and runs once per input.
- scope "pointwise": the paper's literal scheme. Each task keeps a full network, but the
  pointwise convs of blocks[:depth] are one module shared by all branches (their BatchNorms
  stay per task, since each stream has its own statistics).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Mapping, cast

import torch
from torch import nn

from ..io import atomic_path, load_torch, save_torch
from ..models import Backbone, build_model, capture, pointwise_pairs
from ..runtime import cpu_state

SCOPES = ("block", "pointwise")
FORMAT = "zipper.ZipperNet/1"


@dataclass(frozen=True)
class ZipperSpec:
    """Everything needed to rebuild a ZipperNet's modules (weights live in the state_dict)."""

    arch: str
    tasks: tuple[tuple[str, int], ...]  # (task name, class count), in order
    depth: int
    scope: str = "block"
    width: float = 1.0
    input_size: int = 224

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple((str(t), int(n)) for t, n in self.tasks))
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; expected one of {SCOPES}")
        if len(self.tasks) < 1 or len({t for t, _ in self.tasks}) != len(self.tasks):
            raise ValueError(f"tasks must be unique names, got {[t for t, _ in self.tasks]}")

    @property
    def task_names(self) -> list[str]:
        return [t for t, _ in self.tasks]

    def backbone(self, num_classes: int) -> Backbone:
        return build_model(self.arch, num_classes, width=self.width, input_size=self.input_size)


class ZipperNet(nn.Module):
    """Multi-task network zipped at `spec.depth`; `forward(x) -> {task: logits}`."""

    def __init__(self, spec: ZipperSpec) -> None:
        super().__init__()
        self.spec = spec
        self.provenance: dict[str, object] = {}  # what made it, as its checkpoint records (filled by `load`)
        parts = {t: spec.backbone(n) for t, n in spec.tasks}
        self.num_blocks = next(iter(parts.values())).num_blocks
        if not 0 <= spec.depth <= self.num_blocks:
            raise ValueError(f"depth {spec.depth} out of range 0..{self.num_blocks} for {spec.arch}")
        k = spec.depth
        self.trunk: Backbone | None = None
        if spec.scope == "block" and k > 0:
            self.trunk = spec.backbone(spec.tasks[0][1])
            self.trunk.head = nn.Identity()
            for i in range(k, self.num_blocks):
                self.trunk.blocks[i] = nn.Identity()
            for part in parts.values():
                part.stem = nn.Identity()
                for i in range(k):
                    part.blocks[i] = nn.Identity()
        elif spec.scope == "pointwise":
            first = next(iter(parts.values()))
            for name in self.shared_pointwise_convs():
                for part in parts.values():
                    part.set_submodule(name, first.get_submodule(name))
        self.branches = nn.ModuleDict(parts)
        # Per task, the channel order of its pointwise taps relative to its teacher's, for taps
        # that alignment permuted: student_tap == teacher_tap[:, order]. Calibration must compare
        # in the student's order, else distillation undoes the alignment (merge/align.py).
        self.tap_orders: dict[str, dict[str, torch.Tensor]] = {t: {} for t in spec.task_names}

    @property
    def depth(self) -> int:
        return self.spec.depth

    def shared_pointwise_convs(self) -> list[str]:
        """Names (relative to a branch) of the pointwise convs shared under scope "pointwise"."""
        probe = self.spec.backbone(self.spec.tasks[0][1])
        return [f"blocks.{i}.{conv}" for i in range(self.spec.depth) for conv, _bn in pointwise_pairs(probe.blocks[i])]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_tasks(x, self.spec.task_names)

    def forward_tasks(self, x: torch.Tensor, tasks: Iterable[str]) -> dict[str, torch.Tensor]:
        """Logits of the named tasks only (calibration feeds each task its own images)."""
        branches = {t: self.branch(t) for t in tasks}
        if self.trunk is None:
            return {t: b(x) for t, b in branches.items()}
        z = self.trunk.forward_features(x, stop=self.depth)  # (N, C, H', W') computed once
        return {t: b.forward_head(b.forward_features(z, start=self.depth)) for t, b in branches.items()}

    def branch(self, task: str) -> Backbone:
        if task not in self.branches:
            raise KeyError(f"unknown task {task!r}; this ZipperNet has {self.spec.task_names}")
        return cast(Backbone, self.branches[task])

    def forward_intermediates(
        self, x: torch.Tensor, tasks: Iterable[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Logits per task and, per task, its pointwise taps under the teachers' names (trunk taps shared)."""
        tasks = list(tasks or self.spec.task_names)
        trunk_feats: dict[str, torch.Tensor] = {}
        branch_feats: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
        with ExitStack() as stack:
            if self.trunk is not None:
                stack.enter_context(capture(self.trunk, self.trunk.pointwise_taps(), trunk_feats))
            for t in tasks:
                branch = self.branch(t)
                stack.enter_context(capture(branch, branch.pointwise_taps(), branch_feats[t]))
            logits = self.forward_tasks(x, tasks)
        return logits, {t: {**trunk_feats, **branch_feats[t]} for t in tasks}

    def forward_per_task(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """Logits and pointwise taps per task, each task on its own images (calibration).

        The trunk runs once on all tasks' images together: at inference its BatchNorms normalise
        with statistics of the task mix, so training must normalise a mixed batch too. Task-pure
        trunk batches train the net on per-task statistics that inference never has (measured:
        a depth-8 merge at 80% with running stats was at 99% with per-task batch statistics).
        """
        if self.trunk is None:  # every BN belongs to one task: task-pure batches are right
            out = {t: self.forward_intermediates(x, [t]) for t, x in inputs.items()}
            return {t: o[0][t] for t, o in out.items()}, {t: o[1][t] for t, o in out.items()}
        tasks, sizes = list(inputs), [len(x) for x in inputs.values()]
        trunk_feats: dict[str, torch.Tensor] = {}
        with capture(self.trunk, self.trunk.pointwise_taps(), trunk_feats):
            z = self.trunk.forward_features(torch.cat(list(inputs.values())), stop=self.depth)
        trunk_split = {k: v.split(sizes) for k, v in trunk_feats.items()}
        logits, taps = {}, {}
        for i, (t, z_t) in enumerate(zip(tasks, z.split(sizes))):
            branch, feats = self.branch(t), dict[str, torch.Tensor]()
            with capture(branch, branch.pointwise_taps(), feats):
                logits[t] = branch.forward_head(branch.forward_features(z_t, start=self.depth))
            taps[t] = {**{k: v[i] for k, v in trunk_split.items()}, **feats}
        return logits, taps

    def in_student_order(self, task: str, teacher_taps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`task`'s teacher taps with their channels reordered as this net's (aligned) channels."""
        orders = self.tap_orders[task]
        return {k: v.index_select(1, orders[k].to(v.device)) if k in orders else v for k, v in teacher_taps.items()}

    def save(self, path: str | os.PathLike, **provenance: object) -> None:
        """One file: spec + state_dict + tap orders (+ what made it), written atomically."""
        save_torch(
            {
                "format": FORMAT,
                "spec": spec_to_dict(self.spec),
                "state_dict": cpu_state(self),
                "tap_orders": self.tap_orders,
                "provenance": dict(provenance),
            },
            path,
        )

    def export_onnx(self, path: str | os.PathLike) -> None:
        export_onnx(self, path)


class _TaskTuple(nn.Module):
    """ONNX wants positional outputs: one per task, in spec order."""

    def __init__(self, net: ZipperNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        return tuple(out[t] for t in self.net.spec.task_names)


def export_onnx(net: ZipperNet, path: str | os.PathLike, *, opset: int = 17) -> None:
    """Export to ONNX: input `images` (N, 3, S, S) with a dynamic batch, one output per task, named by task."""
    size = net.spec.input_size
    with atomic_path(path) as tmp:
        torch.onnx.export(
            _TaskTuple(net).eval(),
            (torch.randn(1, 3, size, size),),
            str(tmp),
            input_names=["images"],
            output_names=net.spec.task_names,
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"images": {0: "batch"}, **{t: {0: "batch"} for t in net.spec.task_names}},
        )


def spec_to_dict(spec: ZipperSpec) -> dict:
    d = asdict(spec)
    d["tasks"] = [list(t) for t in spec.tasks]
    return d


def load(path: str | os.PathLike) -> ZipperNet:
    """Load a ZipperNet saved by `ZipperNet.save` (weights-only unpickling)."""
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a ZipperNet checkpoint (expected format {FORMAT!r})")
    net = ZipperNet(ZipperSpec(**ckpt["spec"]))
    net.load_state_dict(ckpt["state_dict"])
    orders = ckpt.get("tap_orders") or {}
    _check_tap_orders(net, orders, path)
    net.tap_orders.update({t: dict(o) for t, o in orders.items()})
    net.provenance = dict(ckpt.get("provenance") or {})
    return net


def _check_tap_orders(net: ZipperNet, orders: Mapping, path: str | os.PathLike) -> None:
    """Every order must name a task and one of its pointwise taps, and permute that tap's channels."""
    for task, by_tap in orders.items():
        if task not in net.tap_orders:
            raise ValueError(f"{path}: tap_orders names unknown task {task!r}")
        parts = [p for p in (net.trunk, net.branch(task)) if p is not None]
        channels = {k: cast(nn.BatchNorm2d, p.get_submodule(k)).num_features for p in parts for k in p.pointwise_taps()}
        for tap, order in by_tap.items():
            if tap not in channels:
                raise ValueError(f"{path}: tap_orders[{task!r}] names layer {tap!r}, not a pointwise tap of this net")
            n = channels[tap]
            if not (
                isinstance(order, torch.Tensor)
                and order.dtype == torch.long
                and torch.equal(order.sort().values, torch.arange(n))
            ):
                raise ValueError(
                    f"{path}: tap_orders[{task!r}][{tap!r}] is not a permutation of the layer's {n} channels"
                )


def side_by_side(teachers: Mapping[str, Backbone], scope: str = "block") -> ZipperNet:
    """Depth 0: the teachers exactly, as branches of one ZipperNet."""
    check_compatible(teachers)
    first = next(iter(teachers.values()))
    spec = ZipperSpec(
        first.arch, tuple((t, m.num_classes) for t, m in teachers.items()), 0, scope, first.width, first.input_size
    )
    net = ZipperNet(spec)
    for t, m in teachers.items():
        net.branches[t].load_state_dict(m.state_dict())
    return net


def check_compatible(teachers: Mapping[str, nn.Module]) -> None:
    """Same arch, width and shapes everywhere except each task's head; names the first mismatch."""
    if len(teachers) < 2:
        raise ValueError(f"need at least two teachers to zip, got {len(teachers)}")
    (t0, m0), *rest = teachers.items()
    ref = m0.state_dict()
    for t, m in rest:
        if getattr(m, "arch", None) != getattr(m0, "arch", None):
            raise ValueError(
                f"teachers differ in architecture: {t0!r} is {getattr(m0, 'arch', type(m0).__name__)}, "
                f"{t!r} is {getattr(m, 'arch', type(m).__name__)}"
            )
        sd = m.state_dict()
        for key, value in ref.items():
            if key.startswith("head."):
                continue
            if key not in sd:
                raise ValueError(f"teacher {t!r} has no parameter {key!r} (teacher {t0!r} does)")
            if sd[key].shape != value.shape:
                raise ValueError(
                    f"teachers differ at parameter {key!r}: {t0!r} has shape {tuple(value.shape)}, "
                    f"{t!r} has {tuple(sd[key].shape)}"
                )


def deepen(net: ZipperNet, depth: int) -> ZipperNet:
    """The chain step: keep `net`'s trunk, average its branches' blocks [net.depth, depth)."""
    if not 0 <= depth <= net.num_blocks:
        raise ValueError(f"depth {depth} out of range 0..{net.num_blocks} for {net.spec.arch}")
    if depth < net.depth:
        raise ValueError(f"cannot zip from depth {net.depth} back to {depth}")
    new = ZipperNet(replace(net.spec, depth=depth))
    old = net.state_dict()
    tasks = net.spec.task_names
    shared = set(new.shared_pointwise_convs())

    def merged(sub: str) -> torch.Tensor:  # average over tasks of a branch-relative key
        values = [old[f"branches.{t}.{sub}"] for t in tasks]
        if not values[0].is_floating_point():  # BN's num_batches_tracked
            return values[0].clone()
        return torch.stack(values).mean(0)

    state = {}
    for key in new.state_dict():
        part, _, sub = key.partition(".")
        if part == "trunk":
            state[key] = old[key].clone() if key in old else merged(sub)
        else:  # branches.<task>.<sub>
            task, _, sub = sub.partition(".")
            shared_conv = sub.rpartition(".")[0] in shared
            state[key] = merged(sub) if shared_conv else old[key].clone()
    new.load_state_dict(state)
    new.tap_orders = {t: {k: v.clone() for k, v in o.items()} for t, o in net.tap_orders.items()}
    return new
