"""The zip stage with the aligned init: every task's alignment batches are matched on, however many."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zipper.config import load_params
from zipper.graph import Layout
from zipper.merge import align
from zipper.merge import load as load_zipper
from zipper.stages import run_data, run_features, run_teachers, run_zip

TINY = Path(__file__).parent / "fixtures" / "params.tiny.yaml"
ALIGNED = {"zipper.init": "activations", "zipper.align_batches": 11}  # 22 batches in all


@pytest.mark.trains
def test_the_aligned_init_matches_on_every_alignment_batch_of_every_task(tmp_path, monkeypatch):
    params = load_params(TINY, ALIGNED)
    layout = Layout(tmp_path)
    run_data(params, layout)
    run_teachers(params, layout)
    run_features(params, layout)
    run_zip(params, layout, 0)

    matched = []
    monkeypatch.setattr(align, "_inputs", lambda batch: matched.append(batch) or batch)
    run_zip(params, layout, 1)

    batch_size = params.calibrate.batch_size
    assert [len(b) for b in matched] == [batch_size] * (len(params.tasks) * params.zipper.align_batches)
    assert all(isinstance(b, torch.Tensor) and b.dtype == torch.float32 for b in matched)
    net = load_zipper(layout.zipped(1))
    assert net.depth == 1 and net.provenance["init"] == "activations"
