"""The held-out calibration split and adaptive calibration (`calibrate.until`) in the zip stage: it stops a
depth on train samples it never trains on, and never reads the val split that reports accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zipper import profiling
from zipper.config import load_params
from zipper.data import iter_samples, read_manifest, train_batches
from zipper.data import shards as shards_module
from zipper.data.holdout import HeldOut
from zipper.data.shards import EpochStream, shard_urls
from zipper.data.shards import read_shard as _read_shard
from zipper.graph import Layout
from zipper.merge import load as load_zipper
from zipper.stages import run_data, run_evaluate, run_features, run_teachers, run_zip
from zipper.teachers import load_teacher

TINY = Path(__file__).parent / "fixtures" / "params.tiny.yaml"
HOLDOUT = {"data.holdout": 0.25, "calibrate.until": {"max_drop_pp": 0.5, "check_every": 4}, "calibrate.steps": 40}


def test_the_held_out_split_is_a_stable_fraction_of_keys():
    held_out = HeldOut(0.2)
    keys = [f"train_{i:07d}" for i in range(5000)]
    chosen = [k for k in keys if held_out(k)]
    assert 900 < len(chosen) < 1100
    assert chosen == [k for k in keys if HeldOut(0.2)(k)]  # the key alone decides
    with pytest.raises(ValueError, match="fraction"):
        HeldOut(1.0)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Layout:
    """The tiny params' shards, written once for this module."""
    layout = Layout(tmp_path_factory.mktemp("holdout-shards"))
    run_data(load_params(TINY), layout)
    return layout


def test_the_training_stream_leaves_the_held_out_samples_out(tiny_shards):
    shards = tiny_shards.shards("shapes")
    urls = shard_urls(shards, read_manifest(shards), "train")
    held_out = HeldOut(0.25)
    stream = EpochStream(urls, lambda s: s["__key__"], list, seed=0, batch_size=32, skip=held_out)
    seen = {key for _, batch in zip(range(30), stream) for key in batch}  # more than two epochs
    train = {s["__key__"] for s in iter_samples(shards, "train")}
    assert seen == {k for k in train if not held_out(k)}
    next(train_batches(shards, input_size=16, batch_size=8, augment=True, seed=0, skip=held_out))


@pytest.fixture
def zip_root(tiny_shards, tmp_path) -> tuple[Path, Layout]:
    """The tiny shards under a new root, with teachers, feature caches and depth 0 made there with a
    quarter of the train samples held out."""
    layout = Layout(tmp_path)
    for task in ("shapes", "textures"):
        shutil.copytree(tiny_shards.shards(task), layout.shards(task))
    params = load_params(TINY, HOLDOUT)
    run_teachers(params, layout)
    run_features(params, layout)
    run_zip(params, layout, 0)
    run_evaluate(params, layout, 0)
    return tmp_path, layout


@pytest.mark.trains
def test_adaptive_calibration_stops_on_the_held_out_split_and_never_reads_val(zip_root, monkeypatch):
    _, layout = zip_root
    params = load_params(TINY, HOLDOUT)
    read = []
    monkeypatch.setattr(shards_module, "read_shard", lambda url, **kw: read.append(url) or _read_shard(url, **kw))
    run_zip(params, layout, 1)
    monkeypatch.undo()

    val_urls = {u for t in params.tasks for u in shard_urls(layout.shards(t), read_manifest(layout.shards(t)), "val")}
    assert read and not set(read) & val_urls
    curves = json.loads(layout.curves(1).read_text())
    checks = curves["checks"]
    assert [c["step"] for c in checks] == list(range(4, 4 * len(checks) + 1, 4))
    assert [c["stop"] for c in checks[:-1]] == [None] * (len(checks) - 1)
    assert len(curves["loss"]) == (checks[-1]["step"] if checks[-1]["stop"] else 40)
    provenance = load_zipper(layout.zipped(1)).provenance
    assert all(load_teacher(layout.teacher(t))[1]["provenance"]["data.holdout"] == 0.25 for t in params.tasks)
    for task in params.tasks:
        held = provenance["holdout_keys"][task]
        train = {s["__key__"] for s in iter_samples(layout.shards(task), "train")}
        assert held and set(held) <= train and all(HeldOut(0.25)(k) for k in held)
        assert not set(held) & {s["__key__"] for s in iter_samples(layout.shards(task), "val")}

    row = run_evaluate(params, layout, 1)
    assert row["steps"] == len(curves["loss"])
    first_within = next((c["step"] for c in checks if max(c["drop_pp"].values()) <= 1.0), None)
    assert row["steps_to_recover"] == first_within


@pytest.mark.trains
def test_latency_is_timed_with_both_sides_in_one_memory_format(zip_root, monkeypatch):
    """The accuracy pass runs the net in the runtime's format (channels_last here); the timing must not:
    the teachers are timed as loaded, and a format on one side only would count in the speedup."""
    _, layout = zip_root
    params = load_params(TINY, {**HOLDOUT, "runtime.channels_last": True})
    contiguous, real = [], profiling.latency_ratio

    def spy(baseline_fns, candidate_fn, x, **kw):
        contiguous.extend(
            next(p for p in m.parameters() if p.dim() == 4).is_contiguous() for m in [*baseline_fns, candidate_fn]
        )
        return real(baseline_fns, candidate_fn, x, **kw)

    monkeypatch.setattr(profiling, "latency_ratio", spy)
    run_evaluate(params, layout, 0)
    assert contiguous == [True, True, True]
