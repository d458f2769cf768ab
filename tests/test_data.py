"""Data layer: synthetic generator, sources, shard round-trip, streams, bad input."""

from __future__ import annotations

import io
import json
import re
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zipper.data import MEAN, STD, read_manifest, synthetic, train_batches, val_batches, write_shards
from zipper.data.shards import iter_samples
from zipper.preprocess import compact, expand, normalise, resize_center

SMALL = {"source": "synthetic", "name": "shapes", "n_train": 40, "n_val": 20, "seed": 3}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shapes"
    write_shards(SMALL, "shapes", out, maxcount=16)
    return out


def unnormalise(x: torch.Tensor) -> np.ndarray:
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x * s + m).mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


# --- synthetic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(synthetic.TASKS))
def test_synthetic_is_seeded_balanced_rgb(task):
    a, ya = synthetic.generate(task, 30, seed=1)
    b, yb = synthetic.generate(task, 30, seed=1)
    c, _ = synthetic.generate(task, 30, seed=2)
    assert a.shape == (30, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.array_equal(a, c)
    assert np.bincount(ya, minlength=10).tolist() == [3] * 10
    assert a.std() > 20  # not blank


@pytest.mark.parametrize("task", list(synthetic.TASKS))
def test_synthetic_blanks_only_the_figure_of_its_share_of_images(task, monkeypatch):
    monkeypatch.setattr(synthetic, "BLANK_FRACTION", 0.0)
    readable, _ = synthetic.generate(task, 500, seed=4)
    monkeypatch.setattr(synthetic, "BLANK_FRACTION", 0.2)
    some_blank, _ = synthetic.generate(task, 500, seed=4)
    changed = (readable != some_blank).reshape(500, -1).any(axis=1)
    assert 0.14 < changed.mean() < 0.26  # about 20% lose their figure; the rest are the same pixels
    monkeypatch.setattr(synthetic, "BLANK_FRACTION", 1.0)
    blank, _ = synthetic.generate(task, 500, seed=4)
    assert (readable != blank).reshape(500, -1).any(axis=1).all()


# --- shards round-trip ---------------------------------------------------------------------------


def test_shard_roundtrip_pixels_labels_keys(shapes_dir):
    m = read_manifest(shapes_dir)
    assert m["task"] == "shapes" and m["classes"] == list(synthetic.SHAPES)
    tr = m["splits"]["train"]
    assert tr["count"] == 40 and sum(tr["counts"].values()) == 40 and tr["image_size"] == [32, 32]
    assert [s["name"] for s in tr["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["count"] for s in tr["shards"]] == [16, 16, 8]
    for split, seed_offset in (("train", 0), ("val", 1)):
        images, labels = synthetic.generate("shapes", SMALL[f"n_{split}"], seed=SMALL["seed"] * 2 + seed_offset)
        samples = list(iter_samples(shapes_dir, split))
        assert [s["__key__"] for s in samples] == [f"{split}_{i:07d}" for i in range(len(labels))]
        assert all("." not in s["__key__"] for s in samples)
        got = np.stack([np.asarray(Image.open(io.BytesIO(s["png"]))) for s in samples])
        assert np.array_equal(got, images)  # lossless
        assert [int(s["cls"]) for s in samples] == labels.tolist()
    # the val stream gives back the same pixels and labels, normalised, in order, on every pass
    vb = val_batches(shapes_dir, input_size=32, batch_size=8)
    xs, ys = zip(*vb)
    assert [len(y) for y in ys] == [8, 8, 4] and len(vb) == 3
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (20, 3, 32, 32)
    images, labels = synthetic.generate("shapes", 20, seed=SMALL["seed"] * 2 + 1)
    assert np.array_equal(unnormalise(x), images)
    assert torch.equal(torch.cat(ys), torch.from_numpy(labels))
    again = torch.cat([b[0] for b in vb])
    assert torch.equal(again, x)
    limited = list(val_batches(shapes_dir, input_size=32, batch_size=8, limit=10))
    assert sum(len(y) for _, y in limited) == 10


def test_val_resizes_to_input_size(shapes_dir):
    x, _ = next(iter(val_batches(shapes_dir, input_size=48, batch_size=4)))
    assert x.shape == (4, 3, 48, 48)


def test_train_batches_endless_seeded(shapes_dir):
    def take(seed, augment):
        return list(islice(train_batches(shapes_dir, input_size=32, batch_size=8, augment=augment, seed=seed), 12))

    a, b = take(0, True), take(0, True)
    assert len(a) == 12  # 12 * 8 = 96 samples > 40: endless across epochs
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (8, 3, 32, 32) and xa.dtype == torch.float32 and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = take(1, True)
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c))
    # without augmentation every training image is exactly one of the stored images
    plain = take(0, False)
    images, _ = synthetic.generate("shapes", 40, seed=SMALL["seed"] * 2)
    stored = {im.tobytes() for im in images}
    assert all(im.tobytes() in stored for x, _ in plain for im in unnormalise(x))


def test_compact_holds_a_normalised_batch_as_its_images(shapes_dir):
    x, _ = next(train_batches(shapes_dir, input_size=32, batch_size=8, augment=True, seed=0))
    images = compact(x)
    assert images.dtype == torch.uint8 and images.shape == (8, 32, 32, 3)
    assert torch.equal(expand(images), x)  # the very same floats: BN statistics do not move
    for other in (x + 1e-3, x[:, :1], x.half()):  # not made by `normalise`: kept as it is
        assert compact(other) is other and expand(other) is other


# --- sources --------------------------------------------------------------------------------------


def test_digits_source(tmp_path):
    write_shards({"source": "digits", "seed": 0, "val_fraction": 0.2}, "digits", tmp_path / "d", maxcount=1000)
    m = read_manifest(tmp_path / "d")
    assert m["classes"] == [str(i) for i in range(10)] and m["hflip"] is False
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 1797
    assert m["splits"]["val"]["count"] == 360 and m["splits"]["train"]["image_size"] == [32, 32]
    x, y = next(iter(val_batches(tmp_path / "d", input_size=32, batch_size=16)))
    assert x.shape == (16, 3, 32, 32) and int(y.max()) < 10


@pytest.mark.parametrize(
    "source, key",
    [
        ({"source": "nope"}, "'source'"),
        ({"name": "shapes"}, "'source'"),
        ({"source": "synthetic"}, "'name'"),
        ({"source": "synthetic", "name": "shapes", "n_trian": 5}, "'n_trian'"),
        ({"source": "synthetic", "name": "blobs"}, "'name'"),
        ({"source": "imagefolder"}, "'root'"),
        ({"source": "torchvision", "root": "x"}, "'dataset'"),
        ({"source": "webdataset", "train": "a.tar", "classes": ["a"]}, "'val'"),
        ({"source": "webdataset", "train": "a.tar", "val": "b.tar", "classes": ["a"], "root": "x"}, "'root'"),
        ({"source": "webdataset", "train": "a.tar", "val": "b.tar", "classes": ["a"], "hflip": "no"}, "'hflip'"),
        ({"source": "webdataset", "train": 3, "val": "b.tar", "classes": ["a"]}, "'train'"),
        ({"source": "webdataset", "train": "a.tar", "val": "b.tar", "classes": []}, "'classes'"),
    ],
)
def test_source_config_errors_name_the_key(tmp_path, source, key):
    with pytest.raises(ValueError, match=key):
        write_shards(source, "t", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def save(path: Path, img: Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def make_folder(root: Path, classes=("cat", "dog"), n=3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            for i in range(n):
                arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                save(root / split / c / f"{i}.png", Image.fromarray(arr))
    return root


def test_imagefolder_converts_modes(tmp_path):
    root = make_folder(tmp_path / "f")
    save(root / "train" / "cat" / "gray.png", Image.new("L", (8, 8), 100))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    save(root / "train" / "cat" / "palette.gif", pal)
    save(root / "train" / "dog" / "rgba.png", Image.new("RGBA", (8, 8), (200, 100, 50, 255)))
    save(root / "train" / "dog" / "clear.png", Image.new("RGBA", (8, 8), (200, 100, 50, 0)))
    save(root / "train" / "dog" / "photo.jpg", Image.new("RGB", (8, 8), (10, 200, 10)), quality=95)
    (root / "train" / "dog" / "notes.txt").write_text("not an image, ignored")
    write_shards({"source": "imagefolder", "root": str(root)}, "pets", tmp_path / "s")
    m = read_manifest(tmp_path / "s")
    assert m["classes"] == ["cat", "dog"]
    assert m["splits"]["train"]["counts"] == {"cat": 5, "dog": 6} and m["splits"]["train"]["image_size"] is None
    assert m["source"]["ignored_files"] == 1
    colours = {}
    for s in iter_samples(tmp_path / "s", "train"):
        img = Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB"
        if img.size == (8, 8):
            colours[tuple(np.asarray(img)[0, 0])] = int(s["cls"])
    assert colours[(100, 100, 100)] == 0  # grayscale
    assert colours[(10, 20, 30)] == 0  # palette
    assert colours[(200, 100, 50)] == 1  # opaque RGBA
    assert colours[(0, 0, 0)] == 1  # fully transparent RGBA composited on black
    # mixed sizes come out at the model's input size
    x, _ = next(iter(train_batches(tmp_path / "s", input_size=16, batch_size=4, augment=True, seed=0)))
    assert x.shape == (4, 3, 16, 16)


def test_imagefolder_bad_image_errors_or_skips_and_keeps_previous(tmp_path):
    root = make_folder(tmp_path / "f")
    out = tmp_path / "s"
    write_shards({"source": "imagefolder", "root": str(root)}, "pets", out)
    before = (out / "manifest.json").read_bytes()
    good = (root / "train" / "dog" / "0.png").read_bytes()
    bad = root / "train" / "dog" / "truncated.png"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        write_shards({"source": "imagefolder", "root": str(root)}, "pets", out)
    assert (out / "manifest.json").read_bytes() == before  # the previous complete set is untouched
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "s"]  # no temp dirs left
    write_shards({"source": "imagefolder", "root": str(root)}, "pets", out, on_bad_sample="skip")
    m = read_manifest(out)
    assert m["splits"]["train"]["skipped"]["count"] == 1
    assert m["splits"]["train"]["skipped"]["files"] == [str(bad)]
    assert m["splits"]["train"]["counts"] == {"cat": 3, "dog": 3}


def test_the_data_stage_stores_a_users_images_at_the_input_size(tmp_path):
    """As every stream would read them (shorter side, centre crop): decoded once, when sharding."""
    from zipper.config import load_params
    from zipper.graph import Layout
    from zipper.stages import run_data

    root = make_folder(tmp_path / "f")
    wide = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    save(root / "val" / "dog" / "wide.png", Image.fromarray(wide))
    tiny = Path(__file__).parent / "fixtures" / "params.tiny.yaml"
    params = load_params(tiny, {"data.tasks.shapes": {"source": "imagefolder", "root": str(root)}})
    layout = Layout(tmp_path)
    run_data(params, layout, ["shapes"])
    stored = {s["__key__"]: Image.open(io.BytesIO(s["png"])) for s in iter_samples(layout.shards("shapes"), "val")}
    assert {img.size for img in stored.values()} == {(16, 16)}  # teachers.input_size
    val = next(iter(val_batches(layout.shards("shapes"), input_size=16, batch_size=64)))[0]
    from_original = normalise(np.asarray(resize_center(Image.fromarray(wide), 16))[None])
    assert any(torch.equal(x, from_original[0]) for x in val)  # the same pixels as resizing at read time


def test_imagefolder_refuses_a_decompression_bomb_by_name(tmp_path):
    root = make_folder(tmp_path / "f")
    bomb = root / "train" / "cat" / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 Mpx in a few KB
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ValueError, match=r"image .*bomb\.png is too large: 10000 x 10000 px"):
        write_shards({"source": "imagefolder", "root": str(root)}, "pets", tmp_path / "s")


def test_imagefolder_empty_class_folder(tmp_path):
    root = make_folder(tmp_path / "f")
    (root / "val" / "bird").mkdir()
    (root / "train" / "bird").mkdir()
    save(root / "train" / "bird" / "0.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match=r"empty class folder .*val/bird"):
        write_shards({"source": "imagefolder", "root": str(root)}, "pets", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_imagefolder_class_sets_differ(tmp_path):
    root = make_folder(tmp_path / "f")
    save(root / "train" / "bird" / "0.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match=r"only in train: \['bird'\]"):
        write_shards({"source": "imagefolder", "root": str(root)}, "pets", tmp_path / "s")


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to replace"):
        write_shards(SMALL, "shapes", out)
    assert (out / "precious.txt").read_text() == "keep"


# --- manifest validation -------------------------------------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(shapes_dir, tmp_path):
    d = copy_dir(shapes_dir, tmp_path / "c")
    (d / "val-000001.tar").unlink()
    with pytest.raises(ValueError, match="val-000001.tar"):
        read_manifest(d)
    with pytest.raises(ValueError, match="val-000001.tar"):
        val_batches(d, input_size=32, batch_size=4)


def test_changed_shard_is_named(shapes_dir, tmp_path):
    d = copy_dir(shapes_dir, tmp_path / "c")
    data = bytearray((d / "train-000001.tar").read_bytes())
    data[2000] ^= 0xFF  # same size, different content
    (d / "train-000001.tar").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-000001.tar sha256"):
        read_manifest(d)
    with pytest.raises(ValueError, match="train-000001.tar sha256"):
        train_batches(d, input_size=32, batch_size=4, augment=False, seed=0)


def test_bad_manifest(shapes_dir, tmp_path):
    d = copy_dir(shapes_dir, tmp_path / "c")
    m = json.loads((d / "manifest.json").read_text())
    del m["splits"]["val"]["counts"]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="'counts'"):
        read_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest not found"):
        read_manifest(d)


@pytest.mark.parametrize("name", ["/etc/passwd", "../shapes/train-000000.tar", "sub/../../x.tar"])
def test_manifest_names_outside_the_directory_are_refused(shapes_dir, tmp_path, name):
    d = copy_dir(shapes_dir, tmp_path / "c")
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["val"]["shards"][1]["name"] = name
    (d / "manifest.json").write_text(json.dumps(m))
    error = rf"{d / 'manifest.json'}: shard entry name '{re.escape(name)}' must be a file name inside"
    for read in (
        lambda: read_manifest(d, verify=False),
        lambda: val_batches(d, input_size=32, batch_size=4),
        lambda: iter_samples(d, "val", manifest=m).__next__(),
    ):
        with pytest.raises(ValueError, match=error):
            read()


def test_manifest_entry_needs_one_name_or_url(shapes_dir, tmp_path):
    d = copy_dir(shapes_dir, tmp_path / "c")
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["url"] = "http://example.invalid/x.tar"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="without exactly one name / url"):
        read_manifest(d)


def test_shards_are_reproducible(shapes_dir, tmp_path):
    write_shards(SMALL, "shapes", tmp_path / "again", maxcount=16)
    a = json.loads((shapes_dir / "manifest.json").read_text())["splits"]
    b = json.loads((tmp_path / "again" / "manifest.json").read_text())["splits"]
    assert a == b  # byte-identical shards (same sha256) for the same source


def test_torchvision_source(tmp_path, monkeypatch):
    """A torchvision.datasets-style class (train= flag, PIL images, .classes), without any download."""
    import torchvision.datasets

    class Tiny:
        classes = ["a", "b", "c"]

        def __init__(self, root, train=True, download=False):
            assert root == str(tmp_path) and download is False
            self.n = 12 if train else 6
            self.targets = [i % 3 for i in range(self.n)]

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.new("L", (10, 14), 20 * i), self.targets[i]  # grayscale, not square

    monkeypatch.setattr(torchvision.datasets, "Tiny", Tiny, raising=False)
    write_shards(
        {"source": "torchvision", "dataset": "Tiny", "root": str(tmp_path), "image_size": 8}, "tiny", tmp_path / "s"
    )
    m = read_manifest(tmp_path / "s")
    assert m["classes"] == ["a", "b", "c"] and m["splits"]["val"]["counts"] == {"a": 2, "b": 2, "c": 2}
    assert m["splits"]["train"]["count"] == 12 and m["splits"]["train"]["image_size"] == [8, 8]
    x, y = next(iter(val_batches(tmp_path / "s", input_size=8, batch_size=6)))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="'dataset'"):
        write_shards({"source": "torchvision", "dataset": "NoSuchSet", "root": "x"}, "t", tmp_path / "o")
