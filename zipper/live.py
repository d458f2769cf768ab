"""MLflow while the pipeline runs: the zip stage logs its depth's calibration curves as the steps come, the
evaluate stage the depth's results and logged model, each into that depth's nested run of the root's open
pipeline run (`zipper.tracking`), so the UI shows every depth as soon as it is done.

Best effort: a tracking store out of reach costs a warning, never a stage's result; `zipper register` logs
whatever is missing and closes the pipeline run. `tracking.live: false` leaves it all to register.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypeVar

from . import tracking
from .config import Params
from .graph import Layout

log = logging.getLogger(__name__)
T = TypeVar("T")


def _best_effort(what: str, fn: Callable[..., T], *args: Any) -> T | None:
    try:
        return fn(*args)
    except Exception as e:  # tracking must never cost a computed result: register catches up
        _warn(what, e)
        return None


def _warn(what: str, error: Exception) -> None:
    log.warning(
        "MLflow: %s not logged as it ran (%s: %s); `zipper register` logs it", what, type(error).__name__, error
    )


def _enabled(params: Params) -> bool:
    return params.tracking.live and int(os.environ.get("RANK", "0")) == 0  # one logger under torchrun


class CalibrationLog:
    """A depth's curves into its run as they come, a tenth of the steps at a time (one store write each);
    after a failed write it stops trying, so a store out of reach stalls calibration once at most."""

    def __init__(self, client, run_id: str, steps: int) -> None:
        self.client, self.run_id, self.every = client, run_id, max(1, steps // 10)
        self.pending: list = []
        self.failed = False

    def __call__(self, index: int, values: Mapping[str, float]) -> None:
        self.pending += tracking.metric_points(dict(values), step=index)
        if (index + 1) % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if self.pending and not self.failed:
            pending, self.pending = self.pending, []
            try:
                self.client.log_batch(self.run_id, metrics=pending)
            except Exception as e:  # as _best_effort, then no more tries
                self.failed = True
                _warn("calibration curves", e)

    def end(self, status: str) -> None:
        self.flush()
        if not self.failed:
            _best_effort(f"the calibration's end ({status})", self.client.set_terminated, self.run_id, status)


def _pipeline_run(params: Params, layout: Layout) -> tuple[Any, str]:
    """A client on the store and the root's open pipeline run."""
    client = tracking.connect(params.tracking, layout.root, set_experiment=True)
    return client, tracking.open_pipeline_run(client, params, layout)


def _calibration_log(params: Params, layout: Layout, depth: int) -> CalibrationLog:
    client, parent = _pipeline_run(params, layout)
    run = tracking.depth_run(client, parent, depth, new=True)
    return CalibrationLog(client, run.info.run_id, params.calibrate.steps)


@contextmanager
def calibration_logged(params: Params, layout: Layout, depth: int) -> Iterator[CalibrationLog | None]:
    """The zip stage's `on_progress` (None when nothing is logged live); a failed calibration fails its run."""
    logger = _best_effort(f"depth {depth}", _calibration_log, params, layout, depth) if _enabled(params) else None
    try:
        yield logger
    except BaseException:
        if logger is not None:
            logger.end("FAILED")
        raise
    if logger is not None:
        logger.end("FINISHED")  # evaluate reopens it to add the depth's results


def log_evaluation(params: Params, layout: Layout, row: dict[str, Any]) -> None:
    """The evaluate stage's row (zipper.stages.run_evaluate) into the depth's run, which it then finishes."""

    def log_row() -> None:
        client, parent = _pipeline_run(params, layout)
        tracking.log_depth(client, parent, params, layout, row)

    if _enabled(params):
        _best_effort(f"depth {row['depth']}", log_row)
