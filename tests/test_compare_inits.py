"""benchmarks/compare_inits.py: per-seed gap arithmetic, and a real tiny run through its process pool."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_inits  # noqa: E402


def _row(depth, init, seed, before, after):
    acc = lambda a, b: {"shapes": a, "textures": b}
    return {
        "depth": depth,
        "init": init,
        "seed": seed,
        "before": acc(*before),
        "after": acc(*after),
        "evals": [{"step": 0, "acc": acc(*before)}, {"step": 10, "acc": acc(*after)}],
    }


def test_gaps_pair_each_seed_with_its_own_average_and_the_claim_reads_the_means():
    rows = [
        _row(2, "average", 0, (0.5, 0.3), (0.9, 0.8)),
        _row(2, "weights", 0, (0.7, 0.5), (0.9, 0.7)),
        _row(2, "average", 1, (0.4, 0.2), (0.8, 0.8)),
        _row(2, "weights", 1, (0.6, 0.4), (0.9, 0.9)),
        _row(3, "average", 0, (0.2, 0.2), (0.6, 0.6)),
        _row(3, "weights", 0, (0.1, 0.1), (0.8, 0.8)),
    ]
    gaps = {g["depth"]: g for g in compare_inits.gaps(rows, ["average", "weights"])}
    assert gaps[2]["before_pp_seeds"] == pytest.approx([20.0, 20.0])
    assert gaps[2]["after_pp_seeds"] == pytest.approx([-5.0, 10.0])
    assert gaps[2]["after_pp"] == pytest.approx(2.5) and gaps[2]["after_pp_task"] == pytest.approx(
        {"shapes": 5.0, "textures": 0.0}
    )
    claim = compare_inits.claim(list(gaps.values()))["weights"]
    assert not claim["holds"] and [f["depth"] for f in claim["failures"]] == [3]  # worse before at depth 3
    means = {(r["depth"], r["init"]): r for r in compare_inits.mean_rows(rows)}
    assert means[(2, "weights")]["after"]["textures"] == pytest.approx(0.8)
    assert means[(2, "weights")]["seeds"] == [0, 1]


@pytest.mark.slow
def test_tiny_run_with_seeds_and_worker_processes(tmp_path):
    out = tmp_path / "docs" / "alignment-tiny"
    compare_inits.main(
        [
            "--params",
            str(ROOT / "tests/fixtures/params.tiny.yaml"),
            "--root",
            str(tmp_path / "root"),
            "--depths",
            "1",
            "--seeds",
            "0,1",
            "--jobs",
            "2",
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--set",
            "calibrate.lr=0.02",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["rows"]) == 2 * 3  # seeds x inits
    assert {(r["depth"], r["seed"]) for r in result["rows"]} == {(1, 0), (1, 1)}
    assert all([e["step"] for e in r["evals"]] == [0, 2, 4] for r in result["rows"])
    assert result["config"]["lr"] == 0.02
    assert len(result["gaps"]) == 2 and all(len(g["after_pp_seeds"]) == 2 for g in result["gaps"])
    text = out.with_suffix(".md").read_text()
    assert "--seeds 0,1" in text and "| 1 | weights |" in text
    assert "](alignment-tiny.png)" in text  # the plot written beside it
    assert out.with_suffix(".png").stat().st_size > 10_000
