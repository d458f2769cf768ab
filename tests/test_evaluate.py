"""Measuring: the paper's conv-weight accounting, parameter and MAC counts, latency, memory probes, accuracy."""

from __future__ import annotations

import pytest
import torch

import zipper
from zipper import evaluate, memory, profiling
from zipper.bench import PAPER_TABLE1
from zipper.merge import ZipperNet, ZipperSpec
from zipper.models import ARCHS

from .conftest import TINY, blob_task

PAPER_TASKS = (("imagenet", 1000), ("deepfashion", 50))


def _meta_zipper(depth: int, scope: str, tasks=PAPER_TASKS, **kw) -> ZipperNet:
    """A full-size ZipperNet with meta tensors: counting needs shapes, not values."""
    with torch.device("meta"):
        return ZipperNet(ZipperSpec("mobilenet_v1", tasks, depth, scope, **kw))


def _meta_teachers(tasks=PAPER_TASKS, **kw) -> list[torch.nn.Module]:
    with torch.device("meta"):
        return [zipper.build_model("mobilenet_v1", n, **kw) for _, n in tasks]


def test_conv_weight_accounting_reproduces_the_papers_comp_column():
    teachers = sum(profiling.count_conv_weights(m) for m in _meta_teachers())
    assert teachers == 2 * 3_185_088  # MobileNetV1-1.0 has 3.19M conv weights (no BN, no FC)
    for depth in range(11):
        comp = teachers / profiling.count_conv_weights(_meta_zipper(depth, "pointwise"))
        assert round(comp, 3) == PAPER_TABLE1[depth][0], depth
    # Past the paper's last merged layer ours keeps growing: all pointwise convs shared at depth 13.
    assert teachers / profiling.count_conv_weights(_meta_zipper(13, "pointwise")) > 1.9


def test_conv_weights_exclude_bn_bias_and_classifier():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    assert profiling.count_conv_weights(model) == 4 * 3 * 3 * 3
    assert profiling.count_params(model) == 4 * 27 + 4 + 4 + 4 + 4 * 2 + 2


def test_shared_weights_count_once(tiny_teachers):
    shared = torch.nn.Conv2d(4, 4, 1, bias=False)
    twice = torch.nn.Sequential(shared, shared)
    assert profiling.count_params(twice) == profiling.count_conv_weights(twice) == 16
    teachers = sum(profiling.count_params(m) for m in tiny_teachers.values())
    depth0 = zipper.zip_models(tiny_teachers, 0, scope="pointwise")
    assert profiling.count_params(depth0) == teachers
    full = zipper.zip_models(tiny_teachers, 13, scope="pointwise")
    pointwise = [
        m.weight
        for m in next(iter(tiny_teachers.values())).blocks.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert profiling.count_params(full) == teachers - sum(w.numel() for w in pointwise)


def test_macs_halve_at_full_depth_block_scope_and_equal_at_depth_zero():
    tasks = (("a", 10), ("b", 10))
    teachers = sum(profiling.count_macs(m, 32) for m in _meta_teachers(tasks, **TINY))
    assert profiling.count_macs(_meta_zipper(0, "block", tasks, **TINY), 32) == teachers
    assert profiling.count_macs(_meta_zipper(13, "pointwise", tasks, **TINY), 32) == teachers  # no compute saved
    full = profiling.count_macs(_meta_zipper(13, "block", tasks, **TINY), 32)
    assert full == pytest.approx(teachers / 2, rel=0.01)  # the trunk runs once; only the heads run twice
    # Full-size sanity: MobileNetV1-1.0 at 224 px is the well-known ~569M MACs.
    assert profiling.count_macs(_meta_teachers()[0], 224) == pytest.approx(569e6, rel=0.01)


@pytest.mark.parametrize("arch", ARCHS)
def test_count_macs_agrees_with_torchs_flop_counter(arch):
    from torch.utils.flop_counter import FlopCounterMode

    model = zipper.build_model(arch, 10, width=0.5, input_size=32).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(2, 3, 32, 32))
    assert profiling.count_macs(model, 32, batch=2) == counter.get_total_flops() // 2


@pytest.mark.parametrize("scope", ["block", "pointwise"])
def test_count_macs_leaves_the_model_as_it_was(tiny_teachers, scope):
    # scope "pointwise" shares conv modules between branches: a meta swap must not leak into them
    model = zipper.zip_models(tiny_teachers, 13, scope=scope).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profiling.count_macs(model, 32, batch=2)
    assert model.training
    assert {p.device.type for _, p in model.named_parameters(remove_duplicate=False)} == {"cpu"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latency_ratio_interleaves_and_reports_medians(tiny_teachers) -> None:
    calls: list[str] = []
    a, b = tiny_teachers.values()

    def logged(name: str, model):
        def run(x):
            calls.append(name)
            return model(x)

        return run

    res = profiling.latency_ratio(
        [logged("a", a), logged("b", b)], logged("z", a), torch.randn(1, 3, 32, 32), repeats=4, warmup=1, threads=1
    )
    # warm-up, then baseline/candidate alternating in ABBA order
    assert "".join(calls) == "abz" + "abz" + "zab" + "abz" + "zab"
    assert res["baseline_s"] > 0 and res["candidate_s"] > 0 and res["threads"] == 1
    assert res["speedup_medians"] == pytest.approx(res["baseline_s"] / res["candidate_s"])
    assert res["speedup_q1"] <= res["speedup"] <= res["speedup_q3"]


@pytest.mark.spawns
def test_peak_memory_is_measured_in_a_child_process(tiny_teachers):
    mem = memory.measure_memory(memory.describe_teachers(tiny_teachers))
    weights = sum(t.numel() * t.element_size() for m in tiny_teachers.values() for t in [*m.parameters(), *m.buffers()])
    assert mem["peak"] >= mem["model"] > 0
    # resident pages, not tensor sizes: the build adds about the weights' bytes (page rounding aside)
    assert 0.5 * weights < mem["model"] < 2 * weights + (1 << 20)
    with pytest.raises(ValueError, match="unknown model description"):
        memory.peak_memory(("resnet", 1))


def test_describe_and_rebuild_round_trip(tiny_teachers):
    net = zipper.zip_models(tiny_teachers, 5, scope="pointwise")
    (rebuilt,), size = memory.build_described(memory.describe_zipper(net))
    assert size == 32 and rebuilt.spec == net.spec
    assert profiling.count_params(rebuilt) == profiling.count_params(net)
    built, _ = memory.build_described(memory.describe_teachers(tiny_teachers))
    assert [m.num_classes for m in built] == [5, 3]
    with pytest.raises(ValueError, match="unknown model description"):
        memory.build_described(("resnet",))


def test_evaluate_zipper_scores_each_task_on_its_own_data(tiny_teachers):
    net = zipper.zip_models(tiny_teachers, 0).train()
    data = {t: [blob_task(m.num_classes, 16, seed=i)] for i, (t, m) in enumerate(tiny_teachers.items())}
    acc = evaluate.evaluate_zipper(net, data)
    assert net.training  # mode restored
    for t, m in tiny_teachers.items():  # depth 0 is the teachers exactly
        assert acc[t] == evaluate.accuracy(m, data[t])
    with pytest.raises(KeyError, match="no task 'c'"):
        evaluate.evaluate_zipper(net, {"c": data["a"]})


def test_profile_one_depth(tiny_teachers):
    net = zipper.zip_models(tiny_teachers, 13)
    side = profiling.teacher_stats(tiny_teachers, memory=False)
    row = profiling.profile(net, tiny_teachers, repeats=2, warmup=1, memory=False, teachers_side=side)
    assert row["depth"] == 13 and row["scope"] == "block" and row["input_size"] == 32
    assert row["comp_conv"] > 1.9 and row["comp_params"] > 1.5 and row["macs_ratio"] > 1.9
    assert row["speedup"] > 0 and "memory_comp" not in row
    with pytest.raises(ValueError, match="teacher_peak_bytes"):
        profiling.profile(net, tiny_teachers, repeats=1, warmup=0, teachers_side=side)
