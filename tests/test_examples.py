"""The example configurations load and fit their architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from zipper import build_model
from zipper.config import load_params

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*/params.yaml"))


def test_there_are_examples():
    assert any(p.parent.name == "mobilenet_v2_224" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.parent.name)
def test_example_params_load_and_chain_every_depth(path):
    params = load_params(path)
    cfg = params.teachers
    blocks = build_model(cfg.arch, 10, width=cfg.width, input_size=cfg.input_size).num_blocks
    assert params.zipper.depths == list(range(1, blocks + 1))  # the chain walks every block, none past the last
    assert set(cfg.checkpoints) <= set(params.tasks)
    assert params.calibrate.batch_size % params.runtime.nproc_per_node == 0


def test_mobilenet_v2_example_is_the_real_size():
    params = load_params(Path(__file__).parent.parent / "examples" / "mobilenet_v2_224" / "params.yaml")
    assert (params.teachers.arch, params.teachers.width, params.teachers.input_size) == ("mobilenet_v2", 1.0, 224)
    assert set(params.teachers.checkpoints) == set(params.tasks)  # imported teachers, none trained here
    assert all(src["source"] == "imagefolder" for src in params.data.tasks.values())
    assert (params.runtime.device, params.runtime.precision, params.runtime.channels_last) == ("auto", "auto", True)
    assert params.runtime.num_workers == 8
