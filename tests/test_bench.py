"""`zipper bench table1` end to end with tiny settings (the real one is MobileNetV1-1.0 at 224 px)."""
from __future__ import annotations

import json


from zipper import bench

REQUIRED = {"depth", "scope", "comp_conv", "comp_params", "macs_ratio", "speedup", "memory_comp",
            "paper_comp", "paper_speedup", "paper_memory"}


def test_table1_runs_end_to_end_and_writes_json(tmp_path, capsys):
    path = tmp_path / "table1.json"
    rows = bench.table1(repeats=2, json_path=str(path), depths=(0, 13), width=0.25, input_size=32,
                        classes=(5, 3), warmup=1)
    assert json.loads(path.read_text()) == json.loads(json.dumps(rows))
    assert [(r["scope"], r["depth"]) for r in rows] == [("block", 0), ("block", 13),
                                                         ("pointwise", 0), ("pointwise", 13)]
    for row in rows:
        assert REQUIRED <= set(row)
        assert row["paper_comp"] is None  # not the paper's setup: no reference numbers beside it
        assert row["memory_comp"] > 0 and row["peak_bytes"] > 0
    block13 = rows[1]
    assert block13["macs_ratio"] > 1.9 and block13["comp_conv"] > 1.9
    assert rows[3]["macs_ratio"] == 1.0  # pointwise scope saves storage, not compute
    out = capsys.readouterr().out
    assert "comp_conv" in out and "pointwise" in out and "ours keeps growing" in out


def test_paper_columns_and_checks():
    assert len(bench.PAPER_TABLE1) == 14 and bench.PAPER_TABLE1[10] == (1.258, 1.53, 1.37)
    row = lambda d, scope, comp, speed, macs: dict(  # noqa: E731
        depth=d, scope=scope, comp_conv=comp, speedup=speed, macs_ratio=macs,
        paper_comp=bench.PAPER_TABLE1[d][0], paper_speedup=bench.PAPER_TABLE1[d][1])
    rows = [row(0, "block", 1.0, 1.0, 1.0), row(13, "block", 2.0, 1.95, 2.0),
            row(0, "pointwise", 1.0, 1.0, 1.0), row(10, "pointwise", 1.2575, 1.0, 1.0)]
    lines = bench.check_table1(rows)
    assert all(line.endswith("yes") for line in lines), lines
    rows[1]["speedup"] = 1.5
    assert any("NO" in line for line in bench.check_table1(rows))
