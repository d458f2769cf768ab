"""Invariants of ZipperNet: exactness at depth 0 and with identical teachers, round trips, errors."""

from __future__ import annotations

import pytest
import torch

import zipper
from zipper.merge import deepen
from zipper.models import ARCHS

from .conftest import TINY


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial BN stats, so exactness checks are not passed by accident."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None  # the models' BNs track stats
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("size", [32, 224])
def test_every_arch_builds_runs_forward_and_backward(arch, size):
    model = zipper.build_model(arch, 7, width=0.25 if arch == "mobilenet_v1" else 0.5, input_size=size)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    logits, feats = model.eval().forward_intermediates(torch.randn(1, 3, size, size))
    assert set(model.pointwise_taps()) <= set(feats) and f"blocks.{model.num_blocks - 1}" in feats
    # small inputs keep the stem's resolution (CIFAR-style): 32 px ends at 2x2, 224 px at 7x7
    assert feats[f"blocks.{model.num_blocks - 1}"].shape[-1] == (2 if size == 32 else 7)


@pytest.mark.parametrize("scope", ["block", "pointwise"])
def test_depth_zero_is_exactly_the_teachers(tiny_teachers, scope):
    x = torch.randn(4, 3, 32, 32)
    out = zipper.zip_models(tiny_teachers, 0, scope=scope).eval()(x)
    for t, m in tiny_teachers.items():
        assert torch.equal(out[t], m(x))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("scope", ["block", "pointwise"])
@torch.no_grad()
def test_identical_teachers_give_the_teacher_at_every_depth(arch, scope):
    teacher = zipper.build_model(arch, 4, width=0.5, input_size=16).eval()
    _randomise_bn(teacher)
    x = torch.randn(2, 3, 16, 16)
    expected = teacher(x)
    net = zipper.zip_models({"a": teacher, "b": teacher}, 0, scope=scope)
    for depth in range(teacher.num_blocks + 1):  # along the chain, as the pipeline walks it
        net = deepen(net, depth) if depth else net
        out = net.eval()(x)
        torch.testing.assert_close(out["a"], expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(out["b"], expected, rtol=0, atol=1e-6)


def test_chain_keeps_the_trunk_and_averages_the_next_block(tiny_teachers):
    net1 = zipper.zip_models(tiny_teachers, 1)
    with torch.no_grad():
        for p in net1.trunk.parameters():
            p.add_(1.0)  # stands for calibration having moved the trunk
    net2 = deepen(net1, 2)
    sd1, sd2 = net1.state_dict(), net2.state_dict()
    assert torch.equal(sd2["trunk.blocks.0.pw.0.weight"], sd1["trunk.blocks.0.pw.0.weight"])
    expected = (sd1["branches.a.blocks.1.pw.0.weight"] + sd1["branches.b.blocks.1.pw.0.weight"]) / 2
    assert torch.equal(sd2["trunk.blocks.1.pw.0.weight"], expected)
    assert torch.equal(sd2["branches.b.blocks.5.dw.0.weight"], sd1["branches.b.blocks.5.dw.0.weight"])


def test_pointwise_scope_shares_only_pointwise_weights(tiny_teachers):
    net = zipper.zip_models(tiny_teachers, 3, scope="pointwise")
    a, b = net.branches["a"], net.branches["b"]
    assert a.blocks[2].pw[0].weight is b.blocks[2].pw[0].weight
    assert a.blocks[2].dw[0].weight is not b.blocks[2].dw[0].weight
    assert a.blocks[3].pw[0].weight is not b.blocks[3].pw[0].weight
    assert a.blocks[0].pw[1].weight is not b.blocks[0].pw[1].weight  # BN stays per task


@pytest.mark.parametrize("scope", ["block", "pointwise"])
def test_save_load_round_trip_is_exact(tmp_path, tiny_teachers, scope):
    net = zipper.zip_models(tiny_teachers, 4, scope=scope).eval()
    net.save(tmp_path / "z.pt", made_by="test")
    back = zipper.load(tmp_path / "z.pt").eval()
    assert back.spec == net.spec
    x = torch.randn(3, 3, 32, 32)
    for t, v in net(x).items():
        assert torch.equal(back(x)[t], v)
    ckpt = torch.load(tmp_path / "z.pt", weights_only=True)
    assert ckpt["provenance"] == {"made_by": "test"}


def test_intermediates_use_the_teachers_names(tiny_teachers):
    net = zipper.zip_models(tiny_teachers, 5)
    logits, taps = net.forward_intermediates(torch.randn(2, 3, 32, 32), ["b"])
    assert list(logits) == ["b"] and set(taps["b"]) == set(tiny_teachers["b"].pointwise_taps())


def test_different_architectures_name_the_first_mismatch():
    a = zipper.build_model("mobilenet_v1", 5, **TINY)
    with pytest.raises(ValueError, match="architecture"):
        zipper.zip_models({"a": a, "b": zipper.build_model("mobilenet_v2", 5, width=0.5, input_size=32)}, 1)
    wider = zipper.build_model("mobilenet_v1", 5, width=0.5, input_size=32)
    with pytest.raises(ValueError, match=r"stem\.0\.weight"):
        zipper.zip_models({"a": a, "b": wider}, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=14), "depth 14 out of range 0..13"),
        (dict(depth=-1), "out of range"),
        (dict(depth=1, scope="layer"), "unknown scope 'layer'"),
        (dict(depth=1, init="magic"), "unknown init 'magic'"),
    ],
)
def test_bad_zip_arguments(tiny_teachers, kwargs, match):
    with pytest.raises(ValueError, match=match):
        zipper.zip_models(tiny_teachers, **kwargs)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'resnet50'"):
        zipper.build_model("resnet50", 10)


def test_load_refuses_a_non_zipper_file(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="x.pt: not a ZipperNet checkpoint"):
        zipper.load(tmp_path / "x.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        zipper.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_onnx_export_has_one_output_per_task_and_matches(tmp_path, arch):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    teachers = {"a": zipper.build_model(arch, 5, **TINY).eval(), "b": zipper.build_model(arch, 3, **TINY).eval()}
    net = zipper.zip_models(teachers, teachers["a"].num_blocks // 2).eval()  # a shared trunk and two branches
    net.export_onnx(tmp_path / "z.onnx")
    session = ort.InferenceSession(str(tmp_path / "z.onnx"))
    assert [o.name for o in session.get_outputs()] == ["a", "b"]
    x = torch.randn(3, 3, 32, 32)  # batch 3: the batch axis is dynamic
    got = dict(zip(["a", "b"], session.run(None, {"images": x.numpy()})))
    for t, v in net(x).items():
        torch.testing.assert_close(torch.from_numpy(got[t]), v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scope", ["block", "pointwise"])
def test_forward_per_task_runs_the_trunk_once_on_the_task_mix(tiny_teachers, scope):
    """Same outputs as each task alone (eval); in training the trunk's BN normalises the mixed batch."""
    net = zipper.zip_models(tiny_teachers, 4, scope=scope).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        t: torch.randn(n, 3, TINY["input_size"], TINY["input_size"], generator=g) for t, n in zip(tiny_teachers, (3, 5))
    }
    logits, taps = net.forward_per_task(inputs)
    for t, x in inputs.items():
        ref_logits, ref_taps = net.forward_intermediates(x, [t])
        assert torch.allclose(logits[t], ref_logits[t], atol=1e-5)
        assert taps[t].keys() == ref_taps[t].keys()
        assert all(torch.allclose(taps[t][k], ref_taps[t][k], atol=1e-5) for k in taps[t])
    if scope == "block":
        bn = net.trunk.stem[1]
        bn.reset_running_stats()
        bn.momentum = None
        net.train()
        net.forward_per_task({t: x + 5 * i for i, (t, x) in enumerate(inputs.items())})
        mixed = torch.cat([x + 5 * i for i, x in enumerate(inputs.values())])
        expected = net.trunk.stem[0](mixed).mean((0, 2, 3))
        assert torch.allclose(bn.running_mean, expected, atol=1e-4)  # one batch of both tasks
