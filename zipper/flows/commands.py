"""The training stages (teachers, zip) run as their `zipper` command from a flow task, as under DVC: a
process of their own (torch's global RNG and thread settings are per process, so results do not depend
on what runs beside them; with runtime.nproc_per_node > 1 the command relaunches itself under torchrun),
its output streamed line by line to the task's log."""

from __future__ import annotations

import collections
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from zipper.locks import held_by_parent
from zipper.tracking import flow_run_env

log = logging.getLogger(__name__)

COMMAND_TAIL = 40  # lines of a failed stage command's output quoted in the task's error


class StageCommandError(RuntimeError):
    """A stage run as a `zipper` command exited non-zero (a RuntimeError: not retried)."""


def _yaml_value(value: Any) -> str:
    """One override value as `--set KEY=VALUE` text that `parse_overrides` reads back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def cli_args(
    params_path: str | os.PathLike, root: str | os.PathLike, overrides: Mapping[str, Any] | None
) -> tuple[str, ...]:
    """The options of every `zipper <stage>` command of a flow run: its params file, root and overrides."""
    args = ["--params", str(Path(params_path).resolve()), "--root", str(Path(root).resolve())]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={_yaml_value(value)}"]
    return tuple(args)


def stage_command(
    stage: str, cli: Iterable[str], arg: str | int | None = None, threads: int | None = None
) -> list[str]:
    """`zipper <stage> <cli> [--depth K | --task NAME] [--threads N]`, with this interpreter."""
    cmd = [sys.executable, "-m", "zipper.cli", stage, *cli]
    if stage in ("zip", "evaluate"):
        cmd += ["--depth", str(arg)]
    elif arg is not None:
        cmd += ["--task", str(arg)]
    return cmd + (["--threads", str(threads)] if threads is not None else [])


def _task_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a task run
        return log


def run_command(
    cmd: list[str],
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    tail: int = COMMAND_TAIL,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run `cmd`, each line of its output (stdout and stderr) logged as it comes, to the task's run
    logger by default, and passed to `on_line`; raise StageCommandError with its last `tail` lines if it
    exits non-zero.

    The command runs in a session of its own: a task that is cancelled or interrupted stops it and what
    it started (torchrun and its workers) instead of leaving them running.
    """
    logger = logger or _task_logger()
    logger.info("running %s", shlex.join(cmd))
    last: collections.deque[str] = collections.deque(maxlen=tail)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                last.append(line)
                logger.info("%s", line)
                if on_line is not None:
                    on_line(line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if returncode != 0:
        raise StageCommandError(
            f"`{shlex.join(cmd)}` exited with status {returncode}; its last lines:\n" + "\n".join(last)
        )


def run_stage_command(
    stage: str,
    cli: Iterable[str],
    arg: str | int,
    root: str | os.PathLike,
    threads: int | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run a stage's command for the flow run that holds `root`'s lock."""
    cli = tuple(cli)
    if not cli:
        raise ValueError(
            f"{stage} runs as its command, which needs the flow run's command-line options (cli=cli_args(...))"
        )
    env = {**held_by_parent(root), **flow_run_env()}
    run_command(stage_command(stage, cli, arg, threads), env=env, on_line=on_line)
