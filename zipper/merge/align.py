"""Permutation alignment: reorder a teacher's channels to match another's before averaging.

Two independently trained nets put the same feature in different channels, so averaging
them channel by channel mixes unrelated filters. A hidden channel's
index is arbitrary: permuting it consistently everywhere it appears leaves the function
unchanged. This module

1. derives, by walking a `Backbone`'s modules in forward order, its *permutation spec*:
   the channel groups and, per group, which (parameter, axis) pairs one permutation moves
   (`permutation_spec`);
2. finds, for every model, the permutations that best match the first model's channels,
   by weight matching (Git Re-Basin, Ainsworth et al. 2023) or by activation correlation
   (ZipIt / Li et al. 2016) (`find_permutations`);
3. applies them (`permute_model`, `align_models`), and merges aligned branches
   (`deepen_aligned`, the depth-chain step).

How the walk assigns axes (the MobileNet rules, stated generically):

- a dense (groups=1) conv reads the current group on its input axis and *creates* a group
  on its output axis (the stem conv too);
- BatchNorm and depthwise convs (groups == in == out) are channel-wise: they follow the
  current group and create none;
- a squeeze-excitation module (children `fc1`, `fc2`): fc1's input and fc2's output axes
  follow the current group; fc1's outputs / fc2's inputs form a group of their own;
- a block with `use_res_connect` (torchvision's inverted residual) adds its input to its
  output, so its output group *is* its input group (one permutation across the skip);
- a Linear reads the current group (after global pooling + flatten) and creates a group,
  except the model's last layer, whose outputs are the classes and never move.

Groups created in the head are never aligned (heads stay per task and are never averaged)
but may be permuted (function preserved), which the tests use.
"""

from __future__ import annotations

import copy
import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence, cast

import torch
from torch import nn

from ..models import Backbone
from .zipnet import ZipperNet, deepen

METHODS = ("weights", "activations")
# Stats of BN are not weights: weight matching leaves them out of the cost (they are still permuted).
_STAT_SUFFIXES = (".running_mean", ".running_var")

Perms = dict[str, torch.Tensor]  # group name -> LongTensor p; new[..., i, ...] = old[..., p[i], ...]


@dataclass
class Group:
    """One set of channels that must move together."""

    name: str  # the module that creates it (its first creator for a residual chain)
    size: int
    position: int  # -1 stem, i block i, num_blocks head
    axes: list[tuple[str, int]] = field(default_factory=list)  # (state_dict key, axis)
    taps: list[str] = field(default_factory=list)  # modules whose output (channel dim 1) carries it


@dataclass
class PermSpec:
    """The channel groups of one architecture, in forward order."""

    groups: dict[str, Group]
    num_blocks: int

    def free(self, start_block: int = 0) -> list[str]:
        """Groups alignment may move: created at or after block `start_block` (the stem too when
        `start_block == 0`), never in the head."""
        return [
            n
            for n, g in self.groups.items()
            if g.position < self.num_blocks and (start_block == 0 or g.position >= start_block)
        ]

    def axes_by_key(self) -> dict[str, list[tuple[int, str]]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for n, g in self.groups.items():
            for key, axis in g.axes:
                out.setdefault(key, []).append((axis, n))
        return out


def _is_se(module: nn.Module) -> bool:
    return isinstance(getattr(module, "fc1", None), nn.Conv2d) and isinstance(getattr(module, "fc2", None), nn.Conv2d)


class _Walker:
    """Forward-order walk of a Backbone that records which weight axes each channel group moves."""

    def __init__(self, model: Backbone) -> None:
        self.groups: dict[str, Group] = {}
        self.current: str | None = None  # group of the tensor flowing at this point (None: fixed)
        self.just_created: str | None = None  # a dense conv's group whose BN output becomes its tap
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.final = layers[-1] if layers else None  # class outputs never permute

    def _add(
        self, group: str | None, module: str, param: nn.Parameter | torch.Tensor | None, attr: str, axis: int
    ) -> None:
        if group is None or param is None:
            return
        if param.shape[axis] != self.groups[group].size:
            raise ValueError(
                f"{module}.{attr}: axis {axis} has {param.shape[axis]} channels, "
                f"but its group {group!r} has {self.groups[group].size}"
            )
        self.groups[group].axes.append((f"{module}.{attr}", axis))

    def _new(self, name: str, size: int, position: int, tap: str) -> str:
        self.groups[name] = Group(name, size, position, taps=[tap])
        return name

    def visit(self, name: str, m: nn.Module, position: int) -> None:
        if isinstance(m, nn.Conv2d):
            self.conv(name, m, position)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                self._add(self.current, name, getattr(m, attr), attr, 0)
            if self.current is not None:
                taps = self.groups[self.current].taps
                if self.just_created == self.current:
                    taps[-1] = name  # post-BN is what the next layer sees
                else:  # after a depthwise conv: its filters matter to a match too
                    taps.append(name)
            self.just_created = None
        elif _is_se(m):
            self.squeeze_excitation(name, m, position)
        elif isinstance(m, nn.Linear):
            self._add(self.current, name, m.weight, "weight", 1)
            self.just_created = None
            if name == self.final:
                self.current = None
            else:
                self.current = self._new(name, m.out_features, position, name)
                self._add(self.current, name, m.weight, "weight", 0)
                self._add(self.current, name, m.bias, "bias", 0)
        elif any(True for _ in m.parameters(recurse=False)) or any(b is not None for b in m._buffers.values()):
            raise ValueError(
                f"alignment: layer {name!r} ({type(m).__name__}) holds weights "
                "the permutation walk does not know how to permute"
            )
        else:
            for child, sub in m.named_children():
                self.visit(f"{name}.{child}", sub, position)

    def conv(self, name: str, m: nn.Conv2d, position: int) -> None:
        self.just_created = None
        if m.groups == 1:
            self._add(self.current, name, m.weight, "weight", 1)
            if name == self.final:
                self.current = None
                return
            self.current = self.just_created = self._new(name, m.out_channels, position, name)
            self._add(self.current, name, m.weight, "weight", 0)
            self._add(self.current, name, m.bias, "bias", 0)
        elif m.groups == m.in_channels == m.out_channels:  # depthwise: channel-wise
            self._add(self.current, name, m.weight, "weight", 0)
            self._add(self.current, name, m.bias, "bias", 0)
        else:
            raise ValueError(
                f"alignment: grouped conv {name!r} (groups={m.groups}, {m.in_channels}->"
                f"{m.out_channels}) is neither dense nor depthwise"
            )

    def squeeze_excitation(self, name: str, m: nn.Module, position: int) -> None:
        # x * gate(fc2(act(fc1(pool(x))))): fc1 reads x's channels, fc2 writes x's channels.
        for sub_name, sub in m.named_children():
            if sub_name not in ("fc1", "fc2") and any(True for _ in sub.parameters()):
                raise ValueError(f"alignment: {name}.{sub_name} inside squeeze-excitation holds weights")
        fc1, fc2 = cast(nn.Conv2d, m.fc1), cast(nn.Conv2d, m.fc2)
        self._add(self.current, f"{name}.fc1", fc1.weight, "weight", 1)
        self._add(self.current, f"{name}.fc2", fc2.weight, "weight", 0)
        self._add(self.current, f"{name}.fc2", fc2.bias, "bias", 0)
        se = self._new(f"{name}.fc1", fc1.out_channels, position, f"{name}.fc1")
        self._add(se, f"{name}.fc1", fc1.weight, "weight", 0)
        self._add(se, f"{name}.fc1", fc1.bias, "bias", 0)
        self._add(se, f"{name}.fc2", fc2.weight, "weight", 1)
        self.just_created = None

    def block(self, i: int, block: nn.Module) -> None:
        name = f"blocks.{i}"
        g_in = self.current
        self.visit(name, block, i)
        if not getattr(block, "use_res_connect", False):
            return
        g_out = self.current  # created by the block's last dense conv
        if g_out == g_in:
            return
        if g_out is None:
            raise ValueError(f"alignment: residual block {name!r} ends in no channel group")
        out = self.groups.pop(g_out)
        if g_in is None:  # input fixed (shared trunk / Identity): the output is tied to it, fixed too
            self.current = None
            return
        if out.size != self.groups[g_in].size:
            raise ValueError(f"alignment: residual block {name!r} maps {self.groups[g_in].size} channels to {out.size}")
        self.groups[g_in].axes += out.axes
        self.groups[g_in].taps += out.taps + [name]
        self.current = g_in


def permutation_spec(model: Backbone) -> PermSpec:
    """The channel groups of `model` (positions that are `nn.Identity` break the chain: the
    channels entering the next real layer are then fixed)."""
    w = _Walker(model)
    w.visit("stem", model.stem, -1)
    for i, block in enumerate(model.blocks):
        w.block(i, block)
    w.visit("head", model.head, model.num_blocks)
    return PermSpec(w.groups, model.num_blocks)


def _tensor(model: nn.Module, key: str) -> torch.Tensor:
    module, _, attr = key.rpartition(".")
    return getattr(model.get_submodule(module), attr)


@torch.no_grad()
def _apply_(model: nn.Module, spec: PermSpec, perms: Perms) -> None:
    """Permute `model` in place (tensors written in place: modules tied elsewhere change too)."""
    for name, perm in perms.items():
        if name not in spec.groups:
            raise KeyError(
                f"no channel group {name!r} in {getattr(model, 'arch', type(model).__name__)}; "
                f"groups: {', '.join(spec.groups)}"
            )
        group = spec.groups[name]
        perm = torch.as_tensor(perm, dtype=torch.long)
        if sorted(perm.tolist()) != list(range(group.size)):
            raise ValueError(f"perms[{name!r}] is not a permutation of {group.size} channels")
        for key, axis in group.axes:
            t = _tensor(model, key)
            t.copy_(t.index_select(axis, perm.to(t.device)))


def permute_model(model: Backbone, perms: Perms, *, spec: PermSpec | None = None) -> Backbone:
    """A copy of `model` with the channel groups in `perms` reordered (same function)."""
    new = copy.deepcopy(model)
    _apply_(new, spec or permutation_spec(model), perms)
    return new


def random_permutations(
    model: Backbone, *, generator: torch.Generator | None = None, start_block: int = 0, include_head: bool = False
) -> Perms:
    """Random permutations of the groups alignment may move (and the head's, if asked)."""
    spec = permutation_spec(model)
    names = list(spec.groups) if include_head else spec.free(start_block)
    return {n: torch.randperm(spec.groups[n].size, generator=generator) for n in names}


# ----------------------------------------------------------------------------- matching


def _lsa(cost: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment  # here: scipy's import costs every stage half a second

    _rows, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


_THREADS = threading.Lock()


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small matrices: torch's thread pool costs far more than it saves.
    The lock keeps concurrent alignments from restoring each other's setting."""
    with _THREADS:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


def _weight_matching(
    ref: nn.Module, other: nn.Module, spec: PermSpec, free: list[str], max_iter: int, seed: int
) -> Perms:
    """Git Re-Basin weight matching: maximise sum_layers <W_ref, P W_other Q^T> over the groups'
    permutations. Coordinate ascent: each step solves one group's linear assignment with every
    other group held fixed; sweeps in a seeded random order until a sweep changes nothing.

    It starts from a forward pass that matches each group using only the tensors whose other axes
    are already matched (layer-wise matching, as in OT fusion): from the identity start, coordinate
    ascent alone gets stuck even on a shuffled copy of the same net (MobileNetV2)."""
    by_key = spec.axes_by_key()
    used = lambda key: not key.startswith("head.") and not key.endswith(_STAT_SUFFIXES)
    keys = {k for n in free for k, _ in spec.groups[n].axes if used(k)}
    wa = {k: _tensor(ref, k).detach().cpu().double() for k in keys}
    wb = {k: _tensor(other, k).detach().cpu().double() for k in keys}
    perms = {n: torch.arange(g.size) for n, g in spec.groups.items()}

    def cost_of(n: str, known: set[str] | None) -> torch.Tensor:
        size = spec.groups[n].size
        cost = torch.zeros(size, size, dtype=torch.float64)
        for key, axis in spec.groups[n].axes:
            if key not in keys:
                continue
            others = [(ax, g) for ax, g in by_key[key] if ax != axis]
            if known is not None and any(g not in known for _ax, g in others):
                continue
            b = wb[key]
            for ax, g in others:  # every other axis of this tensor in its current order
                b = b.index_select(ax, perms[g])
            cost += wa[key].movedim(axis, 0).reshape(size, -1) @ b.movedim(axis, 0).reshape(size, -1).T
        return cost

    def score(n: str, perm: torch.Tensor) -> float:
        """The objective's terms that involve group `n`, with `n` permuted by `perm`."""
        total = 0.0
        for key in dict.fromkeys(k for k, _ in spec.groups[n].axes if k in keys):
            b = wb[key]
            for ax, g in by_key[key]:
                b = b.index_select(ax, perm if g == n else perms[g])
            total += float((wa[key] * b).sum())
        return total

    with _one_thread():
        known = set(spec.groups) - set(free)
        for n in free:  # creation (forward) order
            cost = cost_of(n, known)
            if cost.any():
                perms[n] = _lsa(cost)
            known.add(n)
        rng = random.Random(seed)
        order = list(free)
        for _ in range(max_iter):
            progress = False
            rng.shuffle(order)
            for n in order:
                new = _lsa(cost_of(n, None))
                # Judge by the exact objective: a tensor with this group on two axes (a residual
                # block without expansion: project conv maps the skip's channels to themselves) makes
                # it quadratic in the permutation, and the linear step alone can cycle.
                old_score, new_score = score(n, perms[n]), score(n, new)
                if new_score > old_score + 1e-9 * max(1.0, abs(old_score)):
                    progress = True
                    perms[n] = new
            if not progress:
                break
    return {n: perms[n] for n in free}


def _inputs(batch: object) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"alignment batches must be tensors or (x, y) pairs, got {type(batch).__name__}")


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (N * ..., C) float64: every position is a sample of each channel."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]).double()


@torch.no_grad()
def _activation_matching(
    models: Sequence[nn.Module],
    spec: PermSpec,
    free: list[str],
    batches: Iterable[object],
    run: Callable[[torch.Tensor], object],
) -> list[Perms]:
    """Per group, the correlation between model 0's and model j's channels (summed over the
    group's taps), then the assignment maximising total correlation."""
    taps = sorted({t for n in free for t in spec.groups[n].taps})
    feats: list[dict[str, torch.Tensor]] = [{} for _ in models]
    handles = []
    for i, m in enumerate(models):
        for t in taps:
            # clone: the next layer may be an in-place activation
            handles.append(
                m.get_submodule(t).register_forward_hook(
                    lambda _m, _inp, out, i=i, t=t: feats[i].__setitem__(t, out.detach().clone())
                )
            )
    # per model j >= 1 and tap: n, sum a, sum b, sum a^2, sum b^2, sum a b^T
    stats: list[dict[str, list]] = [{} for _ in models]
    shifts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in models]
    seen = 0
    try:
        for batch in batches:
            seen += 1
            for f in feats:
                f.clear()
            run(_inputs(batch))
            a_all = {t: _as_rows(feats[0][t]) for t in taps}
            for j in range(1, len(models)):
                for t in taps:
                    a, b = a_all[t], _as_rows(feats[j][t]).to(a_all[t].device)
                    if t not in shifts[j]:  # centre on the first batch's means: one-pass sums stay exact
                        shifts[j][t] = (a.mean(0), b.mean(0))
                    a, b = a - shifts[j][t][0], b - shifts[j][t][1]
                    s = [a.shape[0], a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b]
                    if t in stats[j]:
                        stats[j][t] = [x + y for x, y in zip(stats[j][t], s)]
                    else:
                        stats[j][t] = s
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("activation matching got no calibration batches")
    out: list[Perms] = [{n: torch.arange(spec.groups[n].size) for n in free}]
    for j in range(1, len(models)):
        perms = {}
        for n in free:
            corr = 0.0
            for t in spec.groups[n].taps:
                cnt, sa, sb, saa, sbb, sab = stats[j][t]
                ma, mb = sa / cnt, sb / cnt
                cov = sab / cnt - torch.outer(ma, mb)
                sda = (saa / cnt - ma * ma).clamp_min(0).sqrt()
                sdb = (sbb / cnt - mb * mb).clamp_min(0).sqrt()
                corr = corr + cov / (torch.outer(sda, sdb) + 1e-12)
            perms[n] = _lsa(torch.as_tensor(corr))
        out.append(perms)
    return out


def _check_specs(models: Sequence[nn.Module], spec: PermSpec, free: list[str]) -> None:
    for j, m in enumerate(models[1:], 1):
        for n in free:
            for key, axis in spec.groups[n].axes:
                try:
                    t, r = _tensor(m, key), _tensor(models[0], key)
                except AttributeError as e:
                    raise ValueError(f"model {j} has no {key!r} (model 0 does)") from e
                if t.shape[axis] != r.shape[axis] or (not key.startswith("head.") and t.shape != r.shape):
                    raise ValueError(
                        f"models differ at {key!r}: model 0 has shape {tuple(r.shape)}, model {j} has {tuple(t.shape)}"
                    )


def find_permutations(
    models: Sequence[Backbone],
    method: str = "weights",
    *,
    batches: Iterable[object] | None = None,
    start_block: int = 0,
    max_iter: int = 100,
    seed: int = 0,
    run: Callable[[torch.Tensor], object] | None = None,
) -> list[Perms]:
    """Per model, the permutations (group name -> index tensor) that align it to `models[0]`
    (identities for `models[0]`). Only groups created at or after `start_block` move.

    method "weights": Git Re-Basin weight matching (`max_iter` sweeps, group order seeded by `seed`).
    method "activations": correlation of the models' activations on `batches` (tensors or (x, y)
    pairs; every one), matched by linear assignment. `run(x)` runs every model on `x` (default: each
    model in turn; a ZipperNet passes its own forward so branches see the trunk).
    """
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; expected one of {METHODS}")
    if len(models) < 1:
        raise ValueError("need at least one model to align")
    spec = permutation_spec(models[0])
    free = spec.free(start_block)
    _check_specs(models, spec, free)
    if method == "weights":
        return [{n: torch.arange(spec.groups[n].size) for n in free}] + [
            _weight_matching(models[0], m, spec, free, max_iter, seed) for m in models[1:]
        ]
    if batches is None:
        raise ValueError("alignment method 'activations' needs calibration batches (batches=...)")
    was_training = [m.training for m in models]
    for m in models:
        m.eval()  # BN must use (and keep) its running stats
    try:
        if run is None:
            device = next(models[0].parameters()).device
            run = lambda x: [m(x.to(device)) for m in models]
        return _activation_matching(models, spec, free, batches, run)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)


def align_models(
    models: Sequence[Backbone], method: str, *, batches: Iterable[object] | None = None, start_block: int = 0, **kwargs
) -> list[Backbone]:
    """Copies of `models`, each permuted to match `models[0]` (returned as a copy, unchanged);
    every copy computes exactly what its input did. `kwargs` go to `find_permutations`.

    To zip, prefer `zip_models(..., init=method)`: it also records the channel orders that
    calibration needs to compare against the original teachers. Distilling a merge of these
    copies from the *unpermuted* teachers would pull the channels back."""
    perms = find_permutations(models, method, batches=batches, start_block=start_block, **kwargs)
    spec = permutation_spec(models[0])
    return [copy.deepcopy(models[0])] + [permute_model(m, p, spec=spec) for m, p in zip(models[1:], perms[1:])]


def align_branches_(net: ZipperNet, method: str, *, batches: Iterable[object] | None = None, **kwargs) -> ZipperNet:
    """Permute, in place, every branch of `net` after the first to match the first, from block
    `net.depth` on (the trunk, and under scope "pointwise" the shared pointwise convs, lie before
    it and are never touched), and record the moves in `net.tap_orders`. Returns `net`."""
    branches = [net.branch(t) for t in net.spec.task_names]
    was_training = net.training
    run = None
    if method == "activations":
        device = next(net.parameters()).device
        run = lambda x: net(x.to(device))
        net.eval()
    try:
        perms = find_permutations(branches, method, batches=batches, start_block=net.depth, run=run, **kwargs)
    finally:
        net.train(was_training)
    spec = permutation_spec(branches[0])
    shared = tuple(f"{c}." for c in net.shared_pointwise_convs())
    taps = set(branches[0].pointwise_taps())
    for task, branch, p in zip(net.spec.task_names[1:], branches[1:], perms[1:]):
        touched = [k for n in p for k, _ in spec.groups[n].axes if k.startswith(shared)]
        if touched:  # cannot happen with start_block == depth; guards tied modules all the same
            raise RuntimeError(f"alignment would permute shared layer {touched[0]!r}")
        _apply_(branch, spec, p)
        orders = net.tap_orders[task]
        for n, perm in p.items():
            for tap in taps.intersection(spec.groups[n].taps):
                # new[:, i] = old[:, perm[i]] and old = teacher[:, order]: compose
                orders[tap] = orders.get(tap, torch.arange(len(perm)))[perm]
    return net


def deepen_aligned(
    net: ZipperNet, depth: int, method: str = "weights", *, batches: Iterable[object] | None = None, **kwargs
) -> ZipperNet:
    """The chain step with alignment: align a copy of `net`'s branches from block `net.depth` on,
    then average blocks [net.depth, depth) into the trunk (`deepen`). `net` is left unchanged.
    method "average" is plain `deepen`."""
    if method == "activations" and batches is None:
        raise ValueError("init 'activations' needs calibration batches (batches=...)")
    if method == "average" or depth == net.depth:
        return deepen(net, depth)
    if depth < net.depth:
        raise ValueError(f"cannot zip from depth {net.depth} back to {depth}")
    return deepen(align_branches_(copy.deepcopy(net), method, batches=batches, **kwargs), depth)


__all__ = [
    "METHODS",
    "Group",
    "PermSpec",
    "align_branches_",
    "align_models",
    "deepen_aligned",
    "find_permutations",
    "permutation_spec",
    "permute_model",
    "random_permutations",
]
