"""Permutation alignment: permuting keeps the function, alignment undoes a shuffle, the merge is exact."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

import zipper
from zipper.merge import align, deepen_aligned
from zipper.merge.align import align_models, find_permutations, permutation_spec, permute_model, random_permutations
from zipper.merge.bn import reset_bn_stats
from zipper.models import ARCHS

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: torch's thread pool makes these tests many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=None)
def _teacher(arch: str, num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """A tiny teacher with non-trivial BN: random affine, running stats estimated on random inputs
    (so every channel carries signal; hand-drawn stats leave deep channels constant). Cached:
    tests never modify a teacher (every function under test returns copies)."""
    torch.manual_seed(seed)
    model = zipper.build_model(arch, num_classes, width=0.25, input_size=SIZE)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            elif isinstance(m, torch.nn.Linear):
                m.weight.mul_(30)  # the 0.01-std init makes logits too small to compare
    reset_bn_stats(model, [_inputs(16, seed + 2), _inputs(16, seed + 3)])
    return model.eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def shuffled(request):
    """(teacher, shuffled copy, the shuffle) per registered arch."""
    teacher = _teacher(request.param)
    perms = random_permutations(teacher, generator=torch.Generator().manual_seed(7))
    return teacher, permute_model(teacher, perms), perms


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's scale."""
    return float((out - ref).detach().abs().max() / ref.detach().abs().max())


def _undoes(found: dict, shuffle: dict) -> bool:
    # copy[i] = teacher[shuffle[i]]; aligned[i] = copy[found[i]] must be teacher[i]
    return set(found) == set(shuffle) and all(
        torch.equal(shuffle[n][found[n]], torch.arange(len(found[n]))) for n in found
    )


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_permuting_every_group_keeps_the_outputs(arch):
    teacher = _teacher(arch)
    perms = random_permutations(teacher, generator=torch.Generator().manual_seed(3), include_head=True)
    moved = permute_model(teacher, perms)
    assert not torch.equal(moved.stem[0].weight, teacher.stem[0].weight)
    x = _inputs(4, 11)
    # Permuted channels sum in another order: 1.8e-5 on MobileNetV3-large with ATen's scalar kernels
    # (ATEN_CPU_CAPABILITY=default); a wrong permutation is off by the outputs' own scale.
    assert _err(moved(x), teacher(x)) < 1e-4
    changed = sum(not torch.equal(a, b) for a, b in zip(moved.state_dict().values(), teacher.state_dict().values()))
    assert changed > 0.5 * len(teacher.state_dict())


def test_spec_follows_the_mobilenet_rules():
    v1 = permutation_spec(zipper.build_model("mobilenet_v1", 5, width=0.25, input_size=SIZE))
    stem = v1.groups["stem.0"]  # the stem conv's outputs: its BN, block 0's depthwise conv + BN, block 0's pw input
    assert {k for k, _ in stem.axes} >= {
        "stem.0.weight",
        "stem.1.weight",
        "blocks.0.dw.0.weight",
        "blocks.0.dw.1.running_var",
        "blocks.0.pw.0.weight",
    }
    assert ("blocks.0.pw.0.weight", 1) in stem.axes and not any(n.startswith("blocks.0.dw") for n in v1.groups)
    assert ("head.2.weight", 1) in v1.groups["blocks.12.pw.0"].axes  # classifier input follows the last group
    assert all(
        not (k == "head.2.weight" and ax == 0) and k != "head.2.bias" for g in v1.groups.values() for k, ax in g.axes
    )  # class outputs never move
    v2 = permutation_spec(zipper.build_model("mobilenet_v2", 5, width=1.0, input_size=SIZE))
    chain = v2.groups["blocks.1.conv.2"]  # 24 channels: block 1's projection and, across the skip, block 2's
    assert ("blocks.1.conv.2.weight", 0) in chain.axes and ("blocks.2.conv.2.weight", 0) in chain.axes
    assert ("blocks.2.conv.0.0.weight", 1) in chain.axes and ("blocks.3.conv.0.0.weight", 1) in chain.axes
    assert "blocks.2.conv.2" not in v2.groups
    v3 = permutation_spec(zipper.build_model("mobilenet_v3_small", 5, width=1.0, input_size=SIZE))
    se = v3.groups["blocks.0.block.1.fc1"]
    assert set(se.axes) == {
        ("blocks.0.block.1.fc1.weight", 0),
        ("blocks.0.block.1.fc1.bias", 0),
        ("blocks.0.block.1.fc2.weight", 1),
    }
    assert ("blocks.0.block.1.fc2.weight", 0) in v3.groups["stem.0"].axes
    assert not any(v3.groups[n].position == v3.num_blocks for n in v3.free())  # heads are never aligned


def test_weights_undo_a_shuffle_and_the_merge_is_the_teacher(shuffled):
    teacher, copy_, perms = shuffled
    found = find_permutations([teacher, copy_], "weights")
    assert all(torch.equal(p, torch.arange(len(p))) for p in found[0].values())
    assert _undoes(found[1], perms)
    x = _inputs(4, 12)
    ref = teacher(x)
    depth = teacher.num_blocks
    merged = zipper.zip_models({"a": teacher, "b": copy_}, depth, init="weights").eval()(x)
    plain = zipper.zip_models({"a": teacher, "b": copy_}, depth, init="average").eval()(x)
    for t in ("a", "b"):
        assert _err(merged[t], ref) < 1e-5
        assert _err(plain[t], ref) > 0.05  # the plain average of a shuffled pair is another function


def test_activations_undo_a_shuffle(shuffled):
    teacher, copy_, perms = shuffled
    batches = [(_inputs(8, 20 + i), torch.zeros(8)) for i in range(2)]  # (x, y) pairs are accepted
    found = find_permutations([teacher, copy_], "activations", batches=batches)
    assert _undoes(found[1], perms)
    x = _inputs(4, 13)
    merged = zipper.zip_models(
        {"a": teacher, "b": copy_}, teacher.num_blocks, init="activations", batches=[b for b, _ in batches]
    ).eval()(x)
    assert _err(merged["b"], teacher(x)) < 1e-5


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_start_block_keeps_earlier_channels(arch):
    teacher = _teacher(arch)
    k = teacher.num_blocks // 2
    perms = random_permutations(teacher, generator=torch.Generator().manual_seed(5), start_block=k)
    spec = permutation_spec(teacher)
    assert perms and all(spec.groups[n].position >= k for n in perms)
    copy_ = permute_model(teacher, perms)
    decoy = permute_model(copy_, random_permutations(teacher, generator=torch.Generator().manual_seed(6)))
    found = find_permutations([teacher, copy_], "weights", start_block=k)[1]
    assert _undoes(found, perms)
    # A model shuffled before k too: alignment must not touch the stem or blocks[:k] ...
    _, aligned = align_models([teacher, decoy], "weights", start_block=k)
    before = lambda key: key.startswith("stem.") or any(key.startswith(f"blocks.{i}.") for i in range(k))
    ref = decoy.state_dict()
    for key, value in aligned.state_dict().items():
        if before(key):
            assert torch.equal(value, ref[key]), key
    x = _inputs(3, 14)
    assert _err(aligned(x), decoy(x)) < 1e-5  # ... and keeps the function


@pytest.mark.parametrize("scope", ["block", "pointwise"])
@pytest.mark.parametrize("method", ["weights", "activations"])
def test_chain_step_aligns_branches_after_the_trunk(scope, method):
    """Depth k -> L from a zipped net whose branches differ by a shuffle after block k: exact teacher."""
    teacher = _teacher("mobilenet_v2")
    k = 3
    copy_ = permute_model(
        teacher, random_permutations(teacher, generator=torch.Generator().manual_seed(8), start_block=k)
    )
    net = zipper.zip_models({"a": teacher, "b": copy_}, k, scope=scope)
    before = copy.deepcopy(net.state_dict())
    batches = [_inputs(8, 30 + i) for i in range(2)] if method == "activations" else None
    deep = deepen_aligned(net, teacher.num_blocks, method, batches=batches).eval()
    assert all(torch.equal(v, before[key]) for key, v in net.state_dict().items())  # input left alone
    x = _inputs(3, 15)
    ref = teacher(x)
    out = deep(x)
    assert _err(out["a"], ref) < 1e-5 and _err(out["b"], ref) < 1e-5
    plain = deepen_aligned(net, teacher.num_blocks, "average").eval()(x)
    assert _err(plain["b"], ref) > 0.05
    if scope == "pointwise":
        a, b = deep.branches["a"], deep.branches["b"]
        assert a.blocks[1].conv[2].weight is b.blocks[1].conv[2].weight  # shared 1x1 convs stay tied


def test_identity_permutations_give_the_plain_average(monkeypatch):
    """The aligned route differs from `average` only by the permutations it finds (README: the
    depth-1/2 gap after calibration is not the route)."""
    teachers = {"a": _teacher("mobilenet_v1", seed=0), "b": _teacher("mobilenet_v1", seed=1)}
    monkeypatch.setattr(
        align,
        "_weight_matching",
        lambda ref, other, spec, free, *rest: {n: torch.arange(spec.groups[n].size) for n in free},
    )
    aligned = zipper.zip_models(teachers, 3, init="weights")
    plain = zipper.zip_models(teachers, 3, init="average").state_dict()
    assert all(torch.equal(v, plain[key]) for key, v in aligned.state_dict().items())
    assert all(torch.equal(o, torch.arange(len(o))) for orders in aligned.tap_orders.values() for o in orders.values())


def test_three_teachers_all_align_to_the_first():
    teacher = _teacher("mobilenet_v3_small")
    g = torch.Generator().manual_seed(9)
    copies = [permute_model(teacher, random_permutations(teacher, generator=g)) for _ in range(2)]
    aligned = align_models([teacher, *copies], "weights")
    assert aligned[0] is not teacher
    for m in aligned:
        for key, value in m.state_dict().items():
            assert torch.allclose(value, teacher.state_dict()[key], atol=1e-6), key


def test_activations_need_batches_and_methods_are_checked():
    teacher = _teacher("mobilenet_v1")
    with pytest.raises(ValueError, match="needs calibration batches"):
        zipper.zip_models({"a": teacher, "b": teacher}, 2, init="activations")
    with pytest.raises(ValueError, match="needs calibration batches"):
        find_permutations([teacher, teacher], "activations")
    with pytest.raises(ValueError, match="needs calibration batches"):
        deepen_aligned(zipper.zip_models({"a": teacher, "b": teacher}, 1), 3, "activations")
    with pytest.raises(ValueError, match="unknown alignment method 'magic'"):
        find_permutations([teacher, teacher], "magic")
    with pytest.raises(ValueError, match="not a permutation"):
        permute_model(teacher, {"stem.0": torch.zeros(8, dtype=torch.long)})
    with pytest.raises(KeyError, match="no channel group 'nope'"):
        permute_model(teacher, {"nope": torch.arange(3)})


def _distill_gap(net, teachers: dict, x: torch.Tensor) -> dict[str, float]:
    """Per task, the largest relative error between the net's taps and its teacher's taps put in the
    net's channel order: what calibration's distillation term sees."""
    from zipper.calibrate import teacher_targets

    out = {}
    for t, teacher in teachers.items():
        _, _, _, t_taps = teacher_targets(teacher, (x, None))
        _, taps = net.eval().forward_intermediates(x, [t])
        ordered = net.in_student_order(t, t_taps)
        out[t] = max(_err(taps[t][k], ordered[k]) for k in t_taps)
    return out


@pytest.mark.parametrize("arch", ["mobilenet_v1", "mobilenet_v2"])
def test_distillation_targets_follow_the_alignment(arch, tmp_path):
    """An aligned merge of a teacher and its shuffled copy *is* both teachers, so the distillation
    error must be zero: the shuffled teacher's taps are compared in the student's channel order,
    also after save/load and through the depth chain (orders compose). Without the reordering the
    error is large, and calibration would pull the branch back towards the unaligned order."""
    teacher = _teacher(arch)
    copy_ = permute_model(teacher, random_permutations(teacher, generator=torch.Generator().manual_seed(11)))
    teachers = {"a": teacher, "b": copy_}
    x = _inputs(4, 16)
    k = teacher.num_blocks // 2
    half = zipper.zip_models(teachers, k, init="weights")
    full = deepen_aligned(half, teacher.num_blocks, "weights")
    half.save(tmp_path / "half.pt")
    for net in (half, zipper.load(tmp_path / "half.pt"), full):
        gaps = _distill_gap(net, teachers, x)
        assert gaps["a"] < 1e-4 and gaps["b"] < 1e-4, gaps
    assert not half.tap_orders["a"] and half.tap_orders["b"]  # the first task is the reference
    unordered = copy.deepcopy(full)
    unordered.tap_orders = {t: {} for t in teachers}
    assert _distill_gap(unordered, teachers, x)["b"] > 0.05


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda orders: orders.update(c={}), "unknown task 'c'"),
        (lambda orders: orders["b"].update({"blocks.99.bn": torch.arange(4)}), r"layer 'blocks\.99\.bn'"),
        (lambda orders: orders["b"].update({k: v[:-1] for k, v in orders["b"].items()}), "not a permutation"),
        (lambda orders: orders["b"].update({k: v.float() for k, v in orders["b"].items()}), "not a permutation"),
    ],
)
def test_load_names_a_bad_tap_order(tmp_path, edit, match):
    teacher = _teacher("mobilenet_v1")
    copy_ = permute_model(teacher, random_permutations(teacher, generator=torch.Generator().manual_seed(12)))
    net = zipper.zip_models({"a": teacher, "b": copy_}, 4, init="weights")
    edit(net.tap_orders)
    net.save(tmp_path / "z.pt")
    with pytest.raises(ValueError, match=f"z.pt: tap_orders.*{match}"):
        zipper.load(tmp_path / "z.pt")
