"""Calibration: fine-tune a merged ZipperNet by distillation from the frozen teachers.

Per task and step: cross-entropy on the task's labels + `distill_weight` x the sum over every
pointwise tap of the mean |student - teacher| (the authors' release), optionally + logit KD.
Teacher targets come from a feature cache (fixed preprocessing) or are computed online. Each step
runs the shared trunk once on all tasks' batches (`ZipperNet.forward_per_task`), so its BatchNorms
train on the task mix they normalise at inference.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .io import load_torch, save_torch, sha256_json
from .merge import ZipperNet
from .merge.bn import reset_bn_stats

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class CalibrateConfig:
    steps: int = 300
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    distill_weight: float = 1.0  # lambda on the per-layer L1 loss
    kd_weight: float = 0.0  # logit distillation (0 = off)
    kd_temperature: float = 4.0
    grad_clip: float = 5.0  # max global grad norm (0 = off)
    bn_reset_batches: int = 10  # re-estimate BN stats on this many batches per task first (0 = off)
    checkpoint_every: int = 100  # steps between resumable partial checkpoints
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"calibrate.optimizer: unknown {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"calibrate.schedule: unknown {self.schedule!r}; expected one of {SCHEDULES}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("calibrate.steps must be >= 0 and calibrate.batch_size >= 1")


# A stream yields (x, y) for online targets or (x, y, teacher_logits, teacher_taps) from the cache.
Stream = Iterator[tuple]


def teacher_targets(teacher: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x, y, teacher logits, teacher taps): from the cache when the batch carries them, else online."""
    if len(batch) == 4:
        return batch
    x, y = batch
    with torch.no_grad():
        logits, feats = teacher.forward_intermediates(x)
    taps = set(teacher.pointwise_taps())
    return x, y, logits, {k: v for k, v in feats.items() if k in taps}


def task_loss(cfg: CalibrateConfig, logits: torch.Tensor, taps: Mapping[str, torch.Tensor], y: torch.Tensor,
              t_logits: torch.Tensor, t_taps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy [+ KD], summed per-layer L1) for one task's batch."""
    if taps.keys() != t_taps.keys():
        missing = sorted(set(t_taps) ^ set(taps))
        raise KeyError(f"student and teacher taps differ, e.g. layer {missing[0]!r}")
    ce = F.cross_entropy(logits, y)
    if cfg.kd_weight:
        T = cfg.kd_temperature
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t_logits / T, 1), log_target=True,
                      reduction="batchmean") * T * T
        ce = ce + cfg.kd_weight * kd
    l1 = sum(F.l1_loss(taps[k], t_taps[k].to(taps[k].dtype)) for k in t_taps)
    return ce, l1


def reset_bn_on_streams(net: ZipperNet, streams: Mapping[str, Stream], batches: int) -> None:
    """Re-estimate BN running stats on `batches` steps of calibration data, the tasks mixed as in
    calibration (`forward_per_task`)."""
    steps = ({t: next(streams[t])[0] for t in net.spec.task_names} for _ in range(batches))
    reset_bn_stats(net, steps, net.forward_per_task, max_batches=batches)


def make_optimizer(cfg: CalibrateConfig, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
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


def calibrate(net: ZipperNet, teachers: Mapping[str, nn.Module], streams: Mapping[str, Stream],
              cfg: CalibrateConfig, *, partial_path: str | os.PathLike | None = None) -> dict[str, list[float]]:
    """Calibrate `net` in place; returns per-step curves {loss, ce, distill, lr}.

    With `partial_path`, a resumable checkpoint is written every `cfg.checkpoint_every` steps and
    picked up by a rerun with the same config; a non-finite loss stops with an error and leaves
    that last good checkpoint in place.
    """
    torch.manual_seed(cfg.seed)
    for t in teachers.values():
        t.eval().requires_grad_(False)
    tasks = net.spec.task_names
    params = list(net.parameters())
    opt, sched = make_optimizer(cfg, params)
    curves: dict[str, list[float]] = {"loss": [], "ce": [], "distill": [], "lr": []}
    key = sha256_json({"cfg": asdict(cfg), "spec": asdict(net.spec)})
    start = _resume(partial_path, key, net, opt, sched, curves)
    if start == 0 and cfg.bn_reset_batches:
        reset_bn_on_streams(net, streams, cfg.bn_reset_batches)
    net.train()
    bar = tqdm(range(start, cfg.steps), desc=f"calibrate depth {net.depth}", initial=start, total=cfg.steps,
               disable=None, leave=False)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        batches = {t: teacher_targets(teachers[t], next(streams[t])) for t in tasks}
        logits, taps = net.forward_per_task({t: b[0] for t, b in batches.items()})
        loss, ce_sum, l1_sum = 0.0, 0.0, 0.0
        for t, (_x, y, t_logits, t_taps) in batches.items():
            ce, l1 = task_loss(cfg, logits[t], taps[t], y, t_logits, net.in_student_order(t, t_taps))
            total = ce + cfg.distill_weight * l1
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"non-finite calibration loss at depth {net.depth}, step {step}, task {t!r} "
                    f"(ce={ce.item()}, l1={l1.item()}); last good checkpoint: {partial_path or 'none kept'} "
                    f"- lower calibrate.lr or raise calibrate.grad_clip")
            loss = loss + total
            ce_sum, l1_sum = ce_sum + ce.item(), l1_sum + l1.item()
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        curves["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        curves["ce"].append(ce_sum)
        curves["distill"].append(l1_sum)
        curves["loss"].append(ce_sum + cfg.distill_weight * l1_sum)
        bar.set_postfix(loss=f"{curves['loss'][-1]:.3f}")
        if partial_path and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_torch({"key": key, "step": step + 1, "net": net.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "curves": curves}, partial_path)
    net.eval()
    if partial_path:
        Path(partial_path).unlink(missing_ok=True)
    if curves["loss"]:
        log.info("depth %d calibrated: loss %.4f -> %.4f over %d steps", net.depth, curves["loss"][0],
                 curves["loss"][-1], cfg.steps)
    return curves


def _resume(partial_path, key: str, net: ZipperNet, opt, sched, curves: dict) -> int:
    """Load a matching partial checkpoint; return the step to start from."""
    if not partial_path or not Path(partial_path).exists():
        return 0
    state = load_torch(partial_path)
    if state.get("key") != key:
        log.warning("ignoring %s: written by another calibration config", partial_path)
        return 0
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    curves.update(state["curves"])
    log.info("resuming calibration of depth %d at step %d from %s", net.depth, state["step"], partial_path)
    return int(state["step"])
