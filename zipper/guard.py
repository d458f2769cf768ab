"""Stop training that has gone wrong: a non-finite loss, or one that has exploded.

A diverged run must fail with an error that says where and what to change, never end "successfully"
and hand its weights to the next stage (or the model registry).
"""

from __future__ import annotations

import math

# A loss this many times its first step's has exploded: calibration starts near its optimum and a
# teacher's cross-entropy starts at its highest (log of the class count), so a sound run never gets there.
DIVERGENCE_FACTOR = 100.0


class DivergedError(FloatingPointError):
    """Training stopped: its loss became non-finite or exploded."""


def check_loss(loss: float, first: float, *, where: str, hint: str) -> None:
    """Raise DivergedError when `loss` is non-finite or more than DIVERGENCE_FACTOR x `first` (the first
    step's loss); `where` names the run and step, `hint` the setting to change."""
    if not math.isfinite(loss):
        raise DivergedError(f"{where}: the loss is {loss}; {hint}")
    if math.isfinite(first) and first > 0 and loss > DIVERGENCE_FACTOR * first:
        raise DivergedError(
            f"{where}: the loss exploded from {first:.4g} (first step) to {loss:.4g}, more than "
            f"{DIVERGENCE_FACTOR:g}x; {hint}"
        )
