"""The code passes the linter and the formatter configured in pyproject.toml (ruff)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_finds_nothing(command):
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run(
        [str(ruff), *command, "zipper", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
