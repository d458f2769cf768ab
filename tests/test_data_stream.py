"""Data at scale: shards streamed from URLs (a real local HTTP server), rank slices, DataLoader workers."""

from __future__ import annotations

import functools
import io
import json
import shutil
import threading
import warnings
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from zipper.data import iter_samples, read_manifest, synthetic, train_batches, val_batches, write_shards
from zipper.data.shards import EpochStream, epoch_stream, shard_urls
from zipper.teachers import train_teacher

SMALL = {"source": "synthetic", "name": "shapes", "n_train": 40, "n_val": 20, "seed": 3}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A folder to serve: the shapes shards (train 16+16+8, val 16+4), a classes file, odd shards."""
    root = tmp_path_factory.mktemp("served")
    write_shards(SMALL, "shapes", root / "shapes", maxcount=16)
    (root / "classes.json").write_text(json.dumps(list(synthetic.SHAPES)))
    (root / "classes.txt").write_text("cat\ndog\n")
    rng = np.random.default_rng(0)

    def shard(name: str, samples: list[dict]) -> None:
        with wds.TarWriter(str(root / name), encoder=False) as w:
            for s in samples:
                w.write(s)

    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()

    shard("pets-train.tar", [{"__key__": f"p{i}", "jpg": jpeg(i), "label": str(i % 2).encode()} for i in range(6)])
    shard("pets-val.tar", [{"__key__": f"q{i}", "jpeg": jpeg(i), "class": str(i % 2).encode()} for i in range(4)])
    shard("nocls.tar", [{"__key__": "a", "jpg": jpeg(0), "cls": b"0"}, {"__key__": "b", "jpg": jpeg(1)}])
    shard("range.tar", [{"__key__": "a", "jpg": jpeg(0), "cls": b"7"}])
    shard("escape.tar", [{"__key__": "../../evil", "jpg": jpeg(0), "cls": b"0"}])
    return root


@pytest.fixture(scope="module")
def base_url(served):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def remote(tmp_path_factory, base_url) -> Path:
    out = tmp_path_factory.mktemp("remote") / "shapes"
    write_shards(
        {
            "source": "webdataset",
            "train": f"{base_url}/shapes/train-{{000000..000002}}.tar",
            "val": [f"{base_url}/shapes/val-000000.tar", f"{base_url}/shapes/val-000001.tar"],
            "classes": f"{base_url}/classes.json",
            "n_val": 20,
        },
        "shapes",
        out,
    )
    return out


def take(stream, n: int) -> list:
    return list(islice(stream, n))


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --- the webdataset source over HTTP -------------------------------------------------------------


def test_manifest_records_urls_counts_and_sha256(remote, served, base_url):
    m = read_manifest(remote)
    local = read_manifest(served / "shapes")
    assert sorted(p.name for p in remote.iterdir()) == ["manifest.json"]  # no re-sharding
    assert m["classes"] == list(synthetic.SHAPES) and m["source"]["source"] == "webdataset"
    for split in ("train", "val"):
        got, want = m["splits"][split], local["splits"][split]
        assert got["count"] == want["count"] and got["counts"] == want["counts"]
        assert [s["url"] for s in got["shards"]] == [f"{base_url}/shapes/{s['name']}" for s in want["shards"]]
        assert all("name" not in s for s in got["shards"])
        for s, w in zip(got["shards"], want["shards"]):
            assert (s["sha256"], s["bytes"], s["count"]) == (w["sha256"], w["bytes"], w["count"])


def test_streams_from_urls_equal_local_streams(remote, served):
    local = served / "shapes"
    assert [s["__key__"] for s in iter_samples(remote, "train")] == [s["__key__"] for s in iter_samples(local, "train")]
    assert_same_batches(
        list(val_batches(remote, input_size=32, batch_size=8)), list(val_batches(local, input_size=32, batch_size=8))
    )
    assert sum(len(y) for _, y in val_batches(remote, input_size=32, batch_size=8, limit=18)) == 18
    # same shard order, counts and positions: the very same augmented batches, across epochs
    kw = dict(input_size=32, batch_size=8, augment=True, seed=5)
    assert_same_batches(take(train_batches(remote, **kw), 7), take(train_batches(local, **kw), 7))


def test_teacher_trains_from_urls(remote):
    model, acc = train_teacher(
        remote, arch="mobilenet_v1", width=0.25, input_size=32, steps=3, batch_size=8, lr=0.05, seed=0
    )
    assert model.num_classes == len(synthetic.SHAPES) and 0.0 <= acc <= 1.0


def test_feature_cache_from_urls(remote, served, tmp_path):
    from zipper import build_model
    from zipper.data import iter_cache, write_feature_cache

    torch.manual_seed(0)
    teacher = build_model("mobilenet_v1", len(synthetic.SHAPES), width=0.25, input_size=32)
    write_feature_cache(
        teacher, remote, tmp_path / "cache", input_size=32, batch_size=16, budget_mb=100, teacher_sha256="t"
    )
    cached = list(iter_cache(tmp_path / "cache"))
    stored = list(iter_samples(served / "shapes", "train"))
    assert [c["key"] for c in cached] == [s["__key__"] for s in stored]
    assert all(np.array_equal(c["image"], np.asarray(Image.open(io.BytesIO(s["png"])))) for c, s in zip(cached, stored))


def test_other_members_text_classes_and_pipe(served, base_url, tmp_path):
    """jpg / jpeg images with `label` / `class` members, classes from a text file, a pipe: URL."""
    write_shards(
        {
            "source": "webdataset",
            "train": f"{base_url}/pets-train.tar",
            "val": f"pipe:cat {served / 'pets-val.tar'}",
            "classes": str(served / "classes.txt"),
            "hflip": False,
        },
        "pets",
        tmp_path / "pets",
    )
    m = read_manifest(tmp_path / "pets")
    assert m["classes"] == ["cat", "dog"] and m["hflip"] is False
    assert m["splits"]["train"]["counts"] == {"cat": 3, "dog": 3} and m["splits"]["val"]["count"] == 4
    x, y = next(iter(val_batches(tmp_path / "pets", input_size=16, batch_size=4)))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 0, 1]
    x, y = next(train_batches(tmp_path / "pets", input_size=16, batch_size=4, augment=True, seed=0))
    assert x.shape == (4, 3, 16, 16)


def test_local_paths_are_recorded_absolute_and_verified(served, tmp_path, monkeypatch):
    data = shutil.copytree(served / "shapes", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    write_shards(
        {
            "source": "webdataset",
            "train": "data/train-{000000..000002}.tar",
            "val": f"file://{data}/val-000001.tar",
            "classes": str(served / "classes.json"),
        },
        "shapes",
        tmp_path / "m",
    )
    m = read_manifest(tmp_path / "m")
    assert [s["url"] for s in m["splits"]["train"]["shards"]] == [str(data / f"train-00000{i}.tar") for i in range(3)]
    assert m["splits"]["val"]["count"] == 4
    shard = data / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-000001.tar sha256 differs"):
        train_batches(tmp_path / "m", input_size=32, batch_size=8, augment=False, seed=0)
    (data / "val-000001.tar").unlink()
    with pytest.raises(ValueError, match="val-000001.tar is missing"):
        read_manifest(tmp_path / "m", verify=False)


@pytest.mark.parametrize(
    "train, error",
    [
        ("{base}/missing-000000.tar", r"cannot open shard http://127\.0\.0\.1:\d+/missing-000000\.tar: HTTPError"),
        ("http://127.0.0.1:9/x.tar", r"cannot open shard http://127\.0\.0\.1:9/x\.tar"),
        ("{base}/nocls.tar", r"shard http://.*/nocls\.tar: sample 'b' has no class member"),
        ("{base}/range.tar", r"shard http://.*/range\.tar: sample 'a' has class index 7, outside the 2 classes"),
        ("{base}/classes.json", r"shard http://.*/classes\.json: unreadable as a tar"),
        (
            "{base}/escape.tar",
            r"shard http://.*/escape\.tar: member name '\.\./\.\./evil\.\w+' is absolute or contains",
        ),
    ],
)
def test_bad_urls_and_samples_are_named(base_url, tmp_path, train, error):
    source = {
        "source": "webdataset",
        "train": train.format(base=base_url),
        "val": f"{base_url}/pets-val.tar",
        "classes": ["cat", "dog"],
    }
    with pytest.raises(ValueError, match=error):
        write_shards(source, "t", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_source_keys_and_counts_are_checked(base_url, tmp_path):
    source = {
        "source": "webdataset",
        "train": f"{base_url}/pets-train.tar",
        "val": f"{base_url}/pets-val.tar",
        "classes": ["cat", "dog"],
    }
    with pytest.raises(ValueError, match="'n_test'"):
        write_shards({**source, "n_test": 3}, "t", tmp_path / "o")
    with pytest.raises(ValueError, match="key 'n_train' says 5 samples.*hold 6"):
        write_shards({**source, "n_train": 5}, "t", tmp_path / "o")
    with pytest.raises(ValueError, match="class 'cat' is listed twice"):
        write_shards({**source, "classes": ["cat", "cat"]}, "t", tmp_path / "o")
    with pytest.raises(ValueError, match=r"cannot open classes file http://.*/nope\.json"):
        write_shards({**source, "classes": f"{base_url}/nope.json"}, "t", tmp_path / "o")


# --- ranks and workers ---------------------------------------------------------------------------


def test_rank_slices_concatenate_to_the_global_batch(remote):
    kw = dict(input_size=32, batch_size=8, augment=True, seed=2)
    steps = 12  # 96 samples > 2 epochs of 40
    whole = take(train_batches(remote, **kw), steps)
    parts = [take(train_batches(remote, rank=r, world_size=2, **kw), steps) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert x0.shape == (4, 3, 32, 32)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="batch_size 6 must be a positive multiple of world_size 4"):
        train_batches(remote, input_size=32, batch_size=6, augment=True, seed=0, rank=1, world_size=4)
    with pytest.raises(ValueError, match="rank 2 / world_size 2"):
        train_batches(remote, input_size=32, batch_size=8, augment=True, seed=0, rank=2, world_size=2)


def key_epoch(sample: dict) -> tuple[str, int]:
    return sample["__key__"], sample["__epoch__"]


def per_epoch(stream, batches: int) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for batch in islice(stream, batches):
        for key, epoch in batch:
            out.setdefault(epoch, Counter())[key] += 1
    return out


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core box
def test_workers_read_every_sample_once_per_epoch(served):
    """Per epoch the multiset of sample keys is the split, with 0, 2 or 3 workers; runs repeat."""
    local = served / "shapes"
    urls = shard_urls(local, read_manifest(local), "train")
    keys = Counter(s["__key__"] for s in iter_samples(local, "train"))

    def stream(workers: int):
        return epoch_stream(urls, key_epoch, list, seed=1, batch_size=4, num_workers=workers, shuffle_buffer=8)

    # 80 batches = 320 samples; a worker's share of an epoch is at most 32 of 40: epochs 0-2 are complete
    runs = {w: per_epoch(stream(w), 80) for w in (0, 2, 3)}
    for w, epochs in runs.items():
        for e in range(3):
            assert epochs[e] == keys, (w, e)
    assert per_epoch(stream(2), 80) == runs[2]  # deterministic with workers too
    order0 = [k for b in islice(stream(0), 10) for k, _ in b]
    assert order0 != sorted(order0) and len(set(order0[:40])) == 40  # shuffled, one epoch first


def test_train_and_val_with_workers(served):
    local = served / "shapes"
    kw = dict(input_size=32, batch_size=8, augment=True, seed=4)
    a = take(train_batches(local, num_workers=2, **kw), 6)
    assert_same_batches(a, take(train_batches(local, num_workers=2, **kw), 6))
    # ranks slice the same global batches with workers as without
    halves = [take(train_batches(local, num_workers=2, rank=r, world_size=2, **kw), 6) for r in (0, 1)]
    for (x, _), (x0, _), (x1, _) in zip(a, *halves):
        assert torch.equal(torch.cat([x0, x1]), x)
    # val: the same (image, label) multiset with workers, with and without a limit
    for limit in (None, 18):

        def rows(workers: int) -> Counter:
            vb = val_batches(local, input_size=32, batch_size=8, limit=limit, num_workers=workers)
            return Counter((x.numpy().tobytes(), int(y)) for xs, ys in vb for x, y in zip(xs, ys))

        assert rows(2) == rows(0) and sum(rows(0).values()) == (limit or 20)


def test_pin_memory_is_harmless_without_cuda(served):
    local = served / "shapes"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = next(train_batches(local, input_size=32, batch_size=8, augment=False, seed=0, pin_memory=True))
        xv, _ = next(iter(val_batches(local, input_size=32, batch_size=8, pin_memory=True)))
    assert x.shape == xv.shape == (8, 3, 32, 32)
    assert x.is_pinned() == torch.cuda.is_available()


def test_epoch_stream_refuses_bad_settings(served):
    with pytest.raises(ValueError, match="no shards"):
        EpochStream([], key_epoch, list, seed=0, batch_size=4)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        epoch_stream(
            [str(served / "shapes" / "train-000000.tar")], key_epoch, list, seed=0, batch_size=4, num_workers=-1
        )
