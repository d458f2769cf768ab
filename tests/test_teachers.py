"""Teachers: tiny training run, save / load round-trip, importing user checkpoints (incl. torchvision)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from zipper import build_model
from zipper.data import val_batches, write_shards
from zipper.evaluate import accuracy
from zipper.guard import DivergedError
from zipper.teachers import FORMAT, import_teacher, load_teacher, save_teacher, train_teacher


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teach") / "textures"
    write_shards({"source": "synthetic", "name": "textures", "n_train": 32, "n_val": 20, "seed": 0}, "textures", out)
    return out


@pytest.mark.trains
def test_train_save_load_roundtrip(shard_dir, tmp_path):
    model, acc = train_teacher(
        shard_dir, arch="mobilenet_v1", width=0.25, input_size=32, steps=5, batch_size=8, lr=0.05, seed=0
    )
    assert not model.training
    assert accuracy(model, val_batches(shard_dir, input_size=32, batch_size=7)) == acc  # its val split's top-1
    path = tmp_path / "t.pt"
    classes = [f"c{i}" for i in range(10)]
    save_teacher(model, path, task="textures", classes=classes, val_acc=acc, provenance={"params": "abc"})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["arch"] == "mobilenet_v1" and raw["num_classes"] == 10
    loaded, meta = load_teacher(path)
    assert meta["task"] == "textures" and meta["classes"] == classes and meta["val_acc"] == acc
    assert meta["provenance"] == {"params": "abc"} and "state_dict" not in meta
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a teacher file is also accepted by import_teacher
    again = import_teacher(path, arch="mobilenet_v1", num_classes=10, width=0.25, input_size=32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match="class names"):
        save_teacher(model, tmp_path / "u.pt", task="t", classes=["a"], val_acc=0.0, provenance={})
    assert not (tmp_path / "u.pt").exists()


@pytest.mark.trains
def test_a_diverging_teacher_stops_with_the_setting_to_change(shard_dir):
    with pytest.raises(
        DivergedError, match=r"teacher textures, step \d+: the (loss is nan|loss exploded).*teachers.lr"
    ):
        train_teacher(shard_dir, arch="mobilenet_v1", width=0.25, input_size=32, steps=30, batch_size=8, lr=1e6, seed=0)


def test_import_torchvision_mobilenet_v2(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.5).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mis-mapped key would show
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    # at 96 px and above the stem has torchvision's stride (below, it keeps the resolution)
    model = import_teacher(path, arch="mobilenet_v2", num_classes=5, width=0.5, input_size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=0, atol=1e-6)
    # wrapped in a training checkpoint, and with DDP's "module." prefix
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in tv.state_dict().items()}}, tmp_path / "w.pth")
    wrapped = import_teacher(tmp_path / "w.pth", arch="mobilenet_v2", num_classes=5, width=0.5, input_size=96)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), tv(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"classifier 'head.3.1' has 5 classes, the task has 7"):
        import_teacher(path, arch="mobilenet_v2", num_classes=7, width=0.5, input_size=32)
    with pytest.raises(ValueError, match=r"layer 'stem.0'"):
        import_teacher(path, arch="mobilenet_v2", num_classes=5, width=1.0, input_size=32)


def test_import_our_state_dict_and_mismatches(tmp_path):
    model = build_model("mobilenet_v1", 4, width=0.25, input_size=32).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ours.pt")
    got = import_teacher(tmp_path / "ours.pt", arch="mobilenet_v1", num_classes=4, width=0.25, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(got(x), model(x))
    with pytest.raises(ValueError, match=r"classifier 'head.2' has 4 classes, the task has 10"):
        import_teacher(tmp_path / "ours.pt", arch="mobilenet_v1", num_classes=10, width=0.25, input_size=32)
    with pytest.raises(ValueError, match=r"layer 'stem.0' shape"):
        import_teacher(tmp_path / "ours.pt", arch="mobilenet_v1", num_classes=4, width=0.5, input_size=32)
    sd = model.state_dict()
    del sd["blocks.3.pw.0.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"layer 'blocks.3.pw.0' missing"):
        import_teacher(tmp_path / "missing.pt", arch="mobilenet_v1", num_classes=4, width=0.25, input_size=32)
    with pytest.raises(ValueError, match=r"missing from the checkpoint"):
        import_teacher(tmp_path / "ours.pt", arch="mobilenet_v2", num_classes=4, width=0.25, input_size=32)
    torch.save([1, 2], tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="no state_dict found"):
        import_teacher(tmp_path / "junk.pt", arch="mobilenet_v1", num_classes=4, width=0.25, input_size=32)
    with pytest.raises(ValueError, match="not a zipper.Teacher/1 file"):
        load_teacher(tmp_path / "ours.pt")


@pytest.mark.slow
def test_teachers_side_by_side_equal_one_after_the_other(tmp_path):
    """`zipper teachers` with two threads trains one process per task (one thread each): the same
    teachers, bit for bit, as one process training them one after the other on one thread."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny = Path(__file__).parent / "fixtures" / "params.tiny.yaml"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def zipper(*args: str) -> str:
        proc = subprocess.run(
            ["zipper", *args, "--params", str(tiny), "--root", str(tmp_path)], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    log = zipper("data", "--threads", "2")
    assert "data: one process per task, side by side: shapes (1 thread(s)), textures (1 thread(s))" in log
    log = zipper("teachers", "--threads", "2")
    assert "teachers: one process per task, side by side: shapes (1 thread(s)), textures (1 thread(s))" in log
    side_by_side = {
        t: torch.load(tmp_path / f"models/teachers/{t}.pt", weights_only=True) for t in ("shapes", "textures")
    }
    log = zipper("teachers", "--threads", "1")
    assert "side by side" not in log
    for task, first in side_by_side.items():
        again = torch.load(tmp_path / f"models/teachers/{task}.pt", weights_only=True)
        assert first["val_acc"] == again["val_acc"]
        assert all(torch.equal(first["state_dict"][k], v) for k, v in again["state_dict"].items()), task
