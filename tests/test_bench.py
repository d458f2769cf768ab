"""`zipper bench table1` and `zipper bench calibrate` end to end with tiny settings (the real ones
are MobileNetV1-1.0 at 224 px)."""

from __future__ import annotations

import json
import math
import os

import pytest

from zipper import bench, build_model
from zipper.bench_calibrate import MODES, BenchConfig, parse_workers, write_caches
from zipper.cli import main
from zipper.runtime import CPU

REQUIRED = {
    "depth",
    "scope",
    "comp_conv",
    "comp_params",
    "macs_ratio",
    "speedup",
    "memory_comp",
    "paper_comp",
    "paper_speedup",
    "paper_memory",
}


@pytest.mark.spawns
def test_table1_runs_end_to_end_and_writes_json_and_markdown(tmp_path, capsys):
    path, page = tmp_path / "table1.json", tmp_path / "table1.md"
    rows = bench.table1(
        repeats=2,
        json_path=str(path),
        depths=(0, 13),
        width=0.25,
        input_size=32,
        classes=(5, 3),
        warmup=1,
        markdown_path=str(page),
        command="zipper bench table1 --x",
    )
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    assert [(r["scope"], r["depth"]) for r in rows] == [
        ("block", 0),
        ("block", 13),
        ("pointwise", 0),
        ("pointwise", 13),
    ]
    for row in rows:
        assert REQUIRED <= set(row)
        assert row["paper_comp"] is None  # not the paper's setup: no reference numbers beside it
        assert row["memory_comp"] > 0 and row["peak_bytes"] > 0
    block13 = rows[1]
    assert block13["macs_ratio"] > 1.9 and block13["comp_conv"] > 1.9
    assert rows[3]["macs_ratio"] == 1.0  # pointwise scope saves storage, not compute
    out = capsys.readouterr().out
    assert "comp_conv" in out and "pointwise" in out and "ours keeps growing" in out
    printed = out.removesuffix("\n")
    assert page.read_text() == (
        f"# Table 1: the paper's columns beside ours\n\nMade by `zipper bench table1 --x`.\n\n```text\n{printed}\n```\n"
    )  # the page holds what was printed


def test_paper_columns_and_checks():
    # One row per depth 0..num_blocks; every ratio starts at 1 and never falls with depth (a typo would).
    assert sorted(bench.PAPER_TABLE1) == list(range(build_model("mobilenet_v1", 10).num_blocks + 1))
    columns = list(zip(*(bench.PAPER_TABLE1[d] for d in sorted(bench.PAPER_TABLE1))))
    assert all(col[0] == 1.0 and list(col) == sorted(col) for col in columns)
    row = lambda d, scope, comp, speed, macs: dict(
        depth=d,
        scope=scope,
        comp_conv=comp,
        speedup=speed,
        macs_ratio=macs,
        paper_comp=bench.PAPER_TABLE1[d][0],
        paper_speedup=bench.PAPER_TABLE1[d][1],
    )
    rows = [
        row(0, "block", 1.0, 1.0, 1.0),
        row(13, "block", 2.0, 1.95, 2.0),
        row(0, "pointwise", 1.0, 1.0, 1.0),
        row(10, "pointwise", 1.2575, 1.0, 1.0),
    ]
    lines = bench.check_table1(rows)
    assert all(line.endswith("yes") for line in lines), lines
    rows[1]["speedup"] = 1.5
    assert any("NO" in line for line in bench.check_table1(rows))


CALIBRATE_FIELDS = {
    "mode",
    "images_per_s",
    "workers",
    "device",
    "precision",
    "arch",
    "width",
    "input_size",
    "batch",
    "channels_last",
}


@pytest.mark.trains
def test_bench_calibrate_runs_end_to_end_and_writes_json(tmp_path, capsys):
    path = tmp_path / "calibrate.json"
    assert (
        main(
            [
                "bench",
                "calibrate",
                "--arch",
                "mobilenet_v1",
                "--width",
                "0.25",
                "--input-size",
                "32",
                "--batch",
                "8",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--workers",
                "0,1",
                "--device",
                "cpu",
                "--tmp",
                str(tmp_path),
                "--json",
                str(path),
            ]
        )
        == 0
    )
    rows = json.loads(path.read_text())
    assert sorted({r["mode"] for r in rows}) == sorted(MODES)
    assert [r["workers"] for r in rows if r["mode"] == "data"] == [0, 1]
    for r in rows:
        assert CALIBRATE_FIELDS <= set(r), CALIBRATE_FIELDS - set(r)
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0, r
        assert (r["device"], r["precision"], r["arch"], r["width"], r["input_size"], r["batch"]) == (
            "cpu",
            "fp32",
            "mobilenet_v1",
            0.25,
            32,
            8,
        )
    online = next(r for r in rows if r["mode"] == "calibrate_online")
    assert online["images_per_step"] == 2 * 8  # both tasks' images get a student forward and backward
    assert next(r for r in rows if r["mode"] == "calibrate_cached")["cache_kib_per_sample"] > 0
    out = capsys.readouterr().out
    assert "/ teacher images/s" in out and "goal >= 2" in out
    assert not list(tmp_path.glob("zipper-bench-calibrate-*"))  # temp shards and caches removed


@pytest.mark.trains
def test_bench_calibrate_skips_a_cache_over_budget(tmp_path):
    cfg = BenchConfig(width=0.25, input_size=32, batch=8, steps=1, warmup=1, cache_budget_mb=100)
    shards = {"shapes": tmp_path / "a", "textures": tmp_path / "b"}  # not read: the size decides first
    reason = write_caches({}, shards, tmp_path, cfg, CPU, per_sample=5 * 2**20)
    assert isinstance(reason, str) and "over the temp budget of 100 MiB" in reason and "5120 KiB/sample" in reason


def test_parse_workers():
    assert parse_workers("3,N,3") == tuple(dict.fromkeys((3, os.cpu_count())))
