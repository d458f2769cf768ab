"""Teacher feature cache: round-trip against the teacher's own fp16 output, budget, matching, stream."""

from __future__ import annotations

import io
import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from zipper import build_model
from zipper.data import cache_matches, cached_batches, val_batches, write_feature_cache, write_shards
from zipper.data.features import iter_cache, read_cache_manifest
from zipper.data.shards import iter_samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    shards = root / "shapes"
    write_shards({"source": "synthetic", "name": "shapes", "n_train": 24, "n_val": 10, "seed": 0}, "shapes", shards)
    torch.manual_seed(0)
    teacher = build_model("mobilenet_v1", 10, width=0.25, input_size=32)
    with torch.no_grad():  # non-trivial BN statistics
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    cache = root / "cache"
    write_feature_cache(
        teacher, shards, cache, input_size=32, batch_size=8, budget_mb=100, maxcount=10, teacher_sha256="abc123"
    )
    return shards, cache, teacher


def test_cache_roundtrip_matches_teacher_fp16(setup):
    shards, cache, teacher = setup
    m = read_cache_manifest(cache, verify=True)
    assert m["count"] == 24 and len(m["shards"]) == 3 and m["taps"] == teacher.pointwise_taps()
    assert m["teacher_sha256"] == "abc123" and m["total_bytes"] > 0
    assert teacher.training  # the cache writer restores the module's mode
    teacher.eval()
    # the teacher on the train split with the same fixed preprocessing, same batches, same order
    expected = []
    with torch.no_grad():
        for x, y in val_batches(shards, input_size=32, batch_size=8, split="train"):
            logits, feats = teacher.forward_intermediates(x)
            for i in range(len(y)):
                expected.append((x[i], int(y[i]), logits[i], {t: feats[t][i].half().numpy() for t in m["taps"]}))
    got = list(iter_cache(cache))
    raw = list(iter_samples(shards, "train"))
    assert [g["key"] for g in got] == [r["__key__"] for r in raw]
    for g, r, (x, y, logits, taps) in zip(got, raw, expected):
        assert g["label"] == y == int(r["cls"])
        assert np.array_equal(g["image"], np.asarray(Image.open(io.BytesIO(r["png"]))))
        assert np.array_equal(g["logits"], logits.numpy())
        assert g["taps"].keys() == taps.keys()
        for t in taps:
            assert g["taps"][t].dtype == np.float16
            assert np.array_equal(g["taps"][t], taps[t]), t


def test_cached_batches_stream(setup):
    shards, cache, teacher = setup
    taps = teacher.pointwise_taps()
    a = list(islice(cached_batches(cache, batch_size=8, seed=0, input_size=32), 5))  # 40 > 24: endless
    b = list(islice(cached_batches(cache, batch_size=8, seed=0, input_size=32), 5))
    for (x, y, logits, feats), (x2, _, _, feats2) in zip(a, b):
        assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64 and logits.shape == (8, 10)
        assert list(feats) == taps and all(v.dtype == torch.float32 for v in feats.values())
        assert feats["blocks.0.pw.1"].shape == (8, 16, 32, 32)
        assert torch.equal(x, x2) and torch.equal(feats[taps[-1]], feats2[taps[-1]])
    # each cached target belongs to its image: recompute for the first batch
    x, y, logits, feats = a[0]
    teacher.eval()
    with torch.no_grad():
        t_logits, t_feats = teacher.forward_intermediates(x)
    torch.testing.assert_close(logits, t_logits, rtol=0, atol=1e-5)
    for t in taps:
        torch.testing.assert_close(feats[t], t_feats[t].half().float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="input_size 32"):
        cached_batches(cache, batch_size=8, seed=0, input_size=64)


def test_cached_batches_ranks_and_workers(setup):
    """Rank slices concatenate to the global batch (targets included), also with DataLoader workers."""
    _, cache, _ = setup

    def run(**kw):
        return list(islice(cached_batches(cache, batch_size=8, seed=1, input_size=32, **kw), 4))

    for workers in (0, 2):
        whole = run(num_workers=workers)
        parts = [run(num_workers=workers, rank=r, world_size=2) for r in (0, 1)]
        for (x, y, lg, f), (x0, y0, lg0, f0), (x1, y1, lg1, f1) in zip(whole, *parts):
            assert len(y0) == 4
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
            assert torch.equal(torch.cat([lg0, lg1]), lg)
            assert all(torch.equal(torch.cat([f0[t], f1[t]]), f[t]) for t in f)
    with pytest.raises(ValueError, match="batch_size 8 must be a positive multiple of world_size 3"):
        cached_batches(cache, batch_size=8, seed=1, input_size=32, rank=0, world_size=3)


def test_cache_manifest_names_stay_inside(setup, tmp_path):
    _, cache, _ = setup
    broken = shutil.copytree(cache, tmp_path / "broken")
    m = json.loads((broken / "manifest.json").read_text())
    m["shards"][0]["name"] = "../cache/train-000000.tar"
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest.json: shard entry name '\.\./cache/train-000000.tar'"):
        read_cache_manifest(broken)


def test_cache_matches(setup, tmp_path):
    shards, cache, _ = setup
    assert cache_matches(cache, "abc123")
    assert cache_matches(cache, "abc123", shard_dir=shards, input_size=32)
    assert not cache_matches(cache, "other")
    assert not cache_matches(cache, "abc123", input_size=64)
    assert not cache_matches(tmp_path / "nothing", "abc123")
    broken = shutil.copytree(cache, tmp_path / "broken")
    (broken / "train-000002.tar").unlink()
    assert not cache_matches(broken, "abc123")
    with pytest.raises(ValueError, match="train-000002.tar"):
        cached_batches(broken, batch_size=4, seed=0, input_size=32)


def test_budget_refusal_names_the_setting(setup, tmp_path, capsys):
    shards, _, teacher = setup
    with pytest.raises(ValueError, match="features.budget_mb"):
        write_feature_cache(
            teacher, shards, tmp_path / "c", input_size=32, batch_size=8, budget_mb=0.5, teacher_sha256="x"
        )
    assert "MiB" in capsys.readouterr().out  # the size was printed before refusing
    assert not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == []


def test_cached_targets_follow_an_aligned_merge(setup, tmp_path):
    """A teacher's cache stores its own channel order; an aligned ZipperNet reads it in its own."""
    import zipper
    from zipper.merge.align import permute_model, random_permutations

    shards, cache, teacher = setup
    shuffled = permute_model(teacher, random_permutations(teacher, generator=torch.Generator().manual_seed(3)))
    write_feature_cache(
        shuffled,
        shards,
        tmp_path / "cache",
        input_size=32,
        batch_size=8,
        budget_mb=100,
        maxcount=10,
        teacher_sha256="def456",
    )
    net = zipper.zip_models({"a": teacher, "b": shuffled}, teacher.num_blocks, init="weights").eval()
    x, _y, _logits, taps = next(iter(cached_batches(tmp_path / "cache", batch_size=8, seed=0, input_size=32)))
    with torch.no_grad():
        _, student = net.forward_intermediates(x, ["b"])
    ordered = net.in_student_order("b", taps)
    for k in taps:
        scale = student["b"][k].abs().max().item() + 1e-6
        assert (student["b"][k] - ordered[k].float()).abs().max().item() < 1e-2 * scale, k
    assert max((student["b"][k] - taps[k].float()).abs().max().item() for k in taps) > 0.1  # order matters
