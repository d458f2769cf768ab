"""Calibration: fine-tune a merged ZipperNet by distillation from the frozen teachers.

Per task and step: cross-entropy on the task's labels + `distill_weight` x the sum over every
pointwise tap of the mean |student - teacher| (the authors' release), optionally + logit KD.
Teacher targets come from a feature cache (fixed preprocessing) or are computed online. Each step
runs the shared trunk once on all tasks' batches (`ZipperNet.forward_per_task`), so its BatchNorms
train on the task mix they normalise at inference.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .guard import check_loss
from .io import load_torch, save_torch, sha256_json
from .merge import ZipperNet
from .merge.bn import reset_bn_stats
from .models import Backbone
from .parallel import data_parallel, mean_over_processes
from .preprocess import compact, expand
from .runtime import CPU, Runtime, cpu_state

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
# Logged every tenth of the step budget: a progress line for logs, and what the Prefect flow's progress reads.
PROGRESS_LINE = "depth %d: calibration step %d/%d, loss %.4f"
PROGRESS_PATTERN = re.compile(r"depth (\d+): calibration step (\d+)/(\d+)")
SCHEDULES = ("cosine", "constant")
RECOVERED_PP = 1.0  # "recovered": every task within this many points of its teacher on the held-out split


@dataclass(frozen=True)
class UntilConfig:
    """Stop a depth's calibration early: checked every `check_every` steps on the held-out split
    (`data.holdout` of each task's train samples, on which neither teachers nor calibration train)."""

    max_drop_pp: float = 0.5  # stop once every task is within this many points of its teacher
    check_every: int = 25
    # or once the loss of the last check_every steps fell less than this fraction; off (0) by default: stopped
    # mid-schedule, at a still high learning rate, depths ended worse (docs/adaptive.md)
    plateau: float = 0.0
    holdout_samples: int = 1024  # at most this many per task, evaluated at each check


@dataclass(frozen=True)
class CalibrateConfig:
    steps: int = 120
    batch_size: int = 32  # per task
    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    distill_weight: float = 1.0  # lambda on the per-layer L1 loss
    kd_weight: float = 0.0  # logit distillation (0 = off)
    kd_temperature: float = 4.0
    grad_clip: float = 5.0  # max global grad norm (0 = off)
    bn_reset_batches: int = 10  # re-estimate BN stats on this many batches per task before and after (0 = off)
    checkpoint_every: int = 50  # steps between resumable partial checkpoints
    seed: int = 0
    until: UntilConfig | None = None  # None: always `steps`; else `steps` is the most a depth may take

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"calibrate.optimizer: unknown {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"calibrate.schedule: unknown {self.schedule!r}; expected one of {SCHEDULES}")


# A stream yields (x, y) for online targets or (x, y, teacher_logits, teacher_taps) from the cache.
Stream = Iterator[tuple]


def teacher_targets(
    teacher: Backbone, batch: tuple, runtime: Runtime = CPU
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x, y, teacher logits, teacher taps) on the runtime's device: from the cache when the batch
    carries them, else from the teacher's forward (online)."""
    # cached: the taps keep their layout (converting them to channels_last costs more than it saves)
    if len(batch) == 4:
        x, y, logits, taps = batch
        return (
            runtime.tensor(x),
            runtime.tensor(y),
            runtime.tensor(logits),
            {k: v.to(runtime.device, non_blocking=True) for k, v in taps.items()},
        )
    x, y = runtime.batch(batch)
    with torch.no_grad(), runtime.autocast():
        logits, feats = teacher.forward_intermediates(x)
    taps = set(teacher.pointwise_taps())
    return x, y, logits, {k: v for k, v in feats.items() if k in taps}


def task_loss(
    cfg: CalibrateConfig,
    logits: torch.Tensor,
    taps: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    t_logits: torch.Tensor,
    t_taps: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy [+ KD], summed per-layer L1) for one task's batch."""
    if taps.keys() != t_taps.keys():
        missing = sorted(set(t_taps) ^ set(taps))
        raise KeyError(f"student and teacher taps differ, e.g. layer {missing[0]!r}")
    logits, t_logits = logits.float(), t_logits.float()  # losses in fp32 under any autocast dtype
    ce = F.cross_entropy(logits, y)
    if cfg.kd_weight:
        T = cfg.kd_temperature
        kd = (
            F.kl_div(
                F.log_softmax(logits / T, 1), F.log_softmax(t_logits / T, 1), log_target=True, reduction="batchmean"
            )
            * T
            * T
        )
        ce = ce + cfg.kd_weight * kd
    l1 = sum((F.l1_loss(taps[k].float(), t_taps[k].float()) for k in t_taps), logits.new_zeros(()))
    return ce, l1


# One calibration step's images per task (`zipper.preprocess.compact`): what BN running statistics are estimated on.
BNBatches = list[dict[str, torch.Tensor]]


def bn_batches(streams: Mapping[str, Stream], batches: int) -> BNBatches:
    """The next `batches` steps' images, held for the whole calibration: as uint8, a quarter of the
    normalised floats (at 224 px, 38.5 MB of floats per batch of 64 images)."""
    return [{t: compact(next(stream)[0]) for t, stream in streams.items()} for _ in range(batches)]


def reestimate_bn(net: ZipperNet, batches: BNBatches, runtime: Runtime = CPU) -> None:
    """Reset BN running stats and re-estimate them on `batches`, the tasks mixed as in calibration
    (`forward_per_task`)."""
    steps = ({t: runtime.tensor(expand(x)) for t, x in step.items()} for step in batches)
    with runtime.autocast():
        reset_bn_stats(net, steps, net.forward_per_task, max_batches=len(batches))


def with_fresh_bn(net: ZipperNet, batches: BNBatches, runtime: Runtime = CPU) -> ZipperNet:
    """A copy of `net` with the BN statistics of its current weights, as calibration ends (`net` as it is
    when `batches` is empty)."""
    if not batches:
        return net
    fresh = copy.deepcopy(net)
    reestimate_bn(fresh, batches, runtime)
    return fresh.eval()


def make_optimizer(cfg: CalibrateConfig, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    else:
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


StepCallback = Callable[[int, ZipperNet], None]
# step index -> that step's {loss, ce, distill, lr}, on the main process as each step ends (live tracking)
ProgressCallback = Callable[[int, Mapping[str, float]], None]
# net -> per-task drop (points) on the held-out split, measured in eval mode (no BN update, no gradients)
HeldOutDrop = Callable[[ZipperNet], Mapping[str, float]]


def calibrate(
    net: ZipperNet,
    teachers: Mapping[str, Backbone],
    streams: Mapping[str, Stream],
    cfg: CalibrateConfig,
    *,
    partial_path: str | os.PathLike | None = None,
    runtime: Runtime = CPU,
    resume_key: Mapping[str, object] | None = None,
    on_step: StepCallback | None = None,
    on_progress: ProgressCallback | None = None,
    held_out_drop: HeldOutDrop | None = None,
) -> dict[str, list]:
    """Calibrate `net` in place on `runtime`'s device (left on the CPU after); returns per-step
    curves {loss, ce, distill, lr} of the global batch, and {checks} of the held-out split.

    With `cfg.until`, `held_out_drop(net)` runs every `until.check_every` steps; calibration stops
    once every task is within `until.max_drop_pp` of its teacher there, or once the loss plateaus.

    With `partial_path`, a resumable checkpoint is written every `cfg.checkpoint_every` steps
    (by the main process) and picked up by a rerun whose config, net and `resume_key` (what else
    determines the result: start checkpoint, teachers, targets) match; the rerun fast-forwards
    the streams and restores the RNG, so it ends where an uninterrupted run ends. A non-finite
    or exploded loss (`zipper.guard`) stops with an error and leaves that last good checkpoint in place.
    Under torch.distributed
    each process holds its rows of every global batch (`zipper.parallel`). `on_step(step, net)`
    runs after every optimizer step (evaluation, early stopping); `on_progress(index, values)` gets the
    step's curve values on the main process.
    """
    torch.manual_seed(cfg.seed)
    for t in teachers.values():
        runtime.module(t).eval().requires_grad_(False)
    runtime.module(net)
    params = list(net.parameters())
    opt, sched = make_optimizer(cfg, params)
    scaler = runtime.grad_scaler()
    if cfg.until is not None and held_out_drop is None:
        raise ValueError("calibrate.until needs the held-out split's drop (held_out_drop)")
    curves: dict[str, list] = {"loss": [], "ce": [], "distill": [], "lr": [], "checks": []}
    key = sha256_json(
        {
            "cfg": asdict(cfg),
            "spec": asdict(net.spec),
            "inputs": dict(resume_key or {}),
            "world_size": runtime.world_size,
        }
    )
    with data_parallel(net, runtime, "forward_per_task") as forward:
        # The same images estimate BN statistics before calibration, at each held-out check and after it.
        bn_data = bn_batches(streams, cfg.bn_reset_batches)
        start = _resume(partial_path, key, net, opt, sched, scaler, curves)
        if start:  # the streams and RNG where the interrupted run had them
            _skip(streams, start)
        elif bn_data:
            reestimate_bn(net, bn_data, runtime)
        net.train()
        bar = tqdm(
            range(start, cfg.steps),
            desc=f"calibrate depth {net.depth}",
            initial=start,
            total=cfg.steps,
            disable=None if runtime.is_main else True,
            leave=False,
        )
        for step in bar:
            ce_sum, l1_sum = _step(net, forward, teachers, streams, cfg, opt, scaler, runtime, step, partial_path)
            curves["lr"].append(opt.param_groups[0]["lr"])
            sched.step()
            curves["ce"].append(ce_sum)
            curves["distill"].append(l1_sum)
            curves["loss"].append(ce_sum + cfg.distill_weight * l1_sum)
            check_loss(
                curves["loss"][-1],
                curves["loss"][0],
                where=f"calibration of depth {net.depth}, step {step}",
                hint=_hint(partial_path),
            )
            bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}")
            if on_progress is not None and runtime.is_main:
                on_progress(step, {k: curves[k][-1] for k in ("loss", "ce", "distill", "lr")})
            if runtime.is_main and ((step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps):
                log.info(PROGRESS_LINE, net.depth, step + 1, cfg.steps, curves["loss"][-1])
            stop = _check(net, cfg, step + 1, curves, held_out_drop, bn_data, runtime)
            if partial_path and runtime.is_main and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_torch(
                    {
                        "key": key,
                        "step": step + 1,
                        "net": cpu_state(net),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "scaler": scaler.state_dict(),
                        "curves": curves,
                        "rng": torch.get_rng_state(),
                    },
                    partial_path,
                )
            if on_step is not None:
                on_step(step + 1, net)
            if stop:
                break
        # Running stats are an average over the whole calibration, most of it of earlier weights (torchvision's
        # MobileNetV3 BNs keep 99% per step): the calibrated weights get their own (docs/sweep.md).
        if bn_data:
            reestimate_bn(net, bn_data, runtime)
    net.eval().cpu()
    if partial_path and runtime.is_main:
        Path(partial_path).unlink(missing_ok=True)
    if curves["loss"]:
        log.info(
            "depth %d calibrated: loss %.4f -> %.4f over %d steps",
            net.depth,
            curves["loss"][0],
            curves["loss"][-1],
            len(curves["loss"]),
        )
    return curves


def _check(
    net: ZipperNet,
    cfg: CalibrateConfig,
    step: int,
    curves: dict,
    held_out_drop: HeldOutDrop | None,
    bn_data: BNBatches,
    runtime: Runtime,
) -> str | None:
    """At every `until.check_every` steps: record the held-out drops of the net as it would end here (on a
    copy, BN statistics re-estimated: the calibration run is not altered); the reason to stop, if any."""
    until = cfg.until
    if until is None or held_out_drop is None or step % until.check_every:
        return None
    drops = dict(held_out_drop(with_fresh_bn(net, bn_data, runtime)))
    # every process decides on the same numbers (each one's BN statistics may differ in the last bits)
    drops = dict(zip(drops, mean_over_processes(list(drops.values()), runtime)))
    w = until.check_every
    window, before = curves["loss"][-w:], curves["loss"][-2 * w : -w]
    reason = (
        "target"
        if max(drops.values()) <= until.max_drop_pp
        else "plateau"
        if until.plateau and len(before) == w and sum(window) > (1 - until.plateau) * sum(before)
        else None
    )
    curves["checks"].append({"step": step, "drop_pp": drops, "stop": reason})
    log.info(
        "depth %d, step %d: held-out drop %s%s",
        net.depth,
        step,
        {t: round(d, 2) for t, d in drops.items()},
        f"; stopping ({reason})" if reason else "",
    )
    return reason


def steps_to_recover(checks: list[Mapping], within_pp: float = RECOVERED_PP) -> int | None:
    """The first checked step at which every task is within `within_pp` points of its teacher on the
    held-out split (None: never, or no checks)."""
    return next((c["step"] for c in checks if max(c["drop_pp"].values()) <= within_pp), None)


def _step(
    net: ZipperNet,
    forward: Callable,
    teachers: Mapping[str, Backbone],
    streams: Mapping[str, Stream],
    cfg: CalibrateConfig,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    step: int,
    partial_path,
) -> tuple[float, float]:
    """One optimizer step on one batch per task; returns the global batch's (ce, distill) sums."""
    opt.zero_grad(set_to_none=True)
    batches = {t: teacher_targets(teachers[t], next(streams[t]), runtime) for t in net.spec.task_names}
    with runtime.autocast():
        logits, taps = forward({t: b[0] for t, b in batches.items()})
    loss = torch.zeros((), device=runtime.device)
    parts: list[torch.Tensor] = []
    for t, (_x, y, t_logits, t_taps) in batches.items():
        ce, l1 = task_loss(cfg, logits[t], taps[t], y, t_logits, net.in_student_order(t, t_taps))
        loss = loss + ce + cfg.distill_weight * l1
        parts += [ce.detach(), l1.detach()]
    # One reduction per step: every process sees the same values, so all stop together on a bad loss.
    values = mean_over_processes(torch.stack(parts).tolist(), runtime)
    for i, value in enumerate(values):  # before the step: a non-finite loss must not reach the weights
        check_loss(
            value,
            math.nan,
            where=f"calibration of depth {net.depth}, step {step}, task "
            f"{net.spec.task_names[i // 2]!r} (ce, l1 per task: {values})",
            hint=_hint(partial_path),
        )
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return sum(values[0::2]), sum(values[1::2])


def _hint(partial_path) -> str:
    return (
        f"lower calibrate.lr or raise calibrate.grad_clip (last good checkpoint: "
        f"{partial_path if partial_path and Path(partial_path).exists() else 'none kept'})"
    )


def _skip(streams: Mapping[str, Stream], batches: int) -> None:
    for stream in streams.values():
        for _ in range(batches):
            next(stream)


def _resume(partial_path, key: str, net: ZipperNet, opt, sched, scaler, curves: dict) -> int:
    """Load a matching partial checkpoint; return the step to start from."""
    if not partial_path or not Path(partial_path).exists():
        return 0
    state = load_torch(partial_path)
    if state.get("key") != key:
        log.warning("discarding %s: written by a calibration with other inputs or settings", partial_path)
        return 0
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    curves.update(state["curves"])
    log.info("resuming calibration of depth %d at step %d from %s", net.depth, state["step"], partial_path)
    return int(state["step"])
