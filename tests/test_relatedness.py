"""Relatedness of block features (linear CKA, channel alignment), the knowledge share, the automatic
filter choice (filtered-ka on teachers trained apart); the branch plan's size rules are in test_branchplan.py."""

import pytest
import torch

from kamal_engine.backbones import build_model, split_model
from kamal_engine.filters import FeatureAdapter
from kamal_engine.methods.filtered_ka import choose_filter, new_filter
from kamal_engine.relatedness import (channel_alignment, feature_cka, knowledge_share, least_squares_map, linear_cka,
                                      reference_losses)
from kamal_engine.selection import Task

AUTO = {"filter": "auto", "aligned_threshold": 0.2, "reduction": 4, "adapter_init": "least-squares"}


def permuted_copy(model, generator):
    """A SmallNet (one unit per stage) whose every stage output has its channels permuted: the same function,
    other channel order. Returns the copy and the permutation of each stage."""
    copy = build_model("smallnet", model.fc.out_features, width=model.width, depth=model.depth)
    copy.load_state_dict(model.state_dict())
    perms = [torch.randperm(stage[0].conv2.out_channels, generator=generator) for stage in model.stages]

    def rows(module, perm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(module, name, None)
            if tensor is not None:
                tensor.data = tensor.data[perm].clone()

    with torch.no_grad():
        rows(copy.stem[0], perms[0])
        rows(copy.stem[1], perms[0])
        for s, stage in enumerate(copy.stages):
            unit, before = stage[0], perms[s - 1] if s else perms[0]
            unit.conv1.weight.data = unit.conv1.weight.data[:, before].clone()
            rows(unit.conv2, perms[s])
            rows(unit.bn2, perms[s])
            if not isinstance(unit.shortcut, torch.nn.Identity):
                unit.shortcut[0].weight.data = unit.shortcut[0].weight.data[perms[s]][:, before].clone()
                rows(unit.shortcut[1], perms[s])
        copy.fc.weight.data = copy.fc.weight.data[:, perms[-1]].clone()
    return copy.eval(), perms


@pytest.fixture(scope="module")
def trained(quick_demo):
    """The quick demo's teacher 0-4 (trained) and 128 of its unlabeled images."""
    from kamal_engine.demo import load_demo_teachers
    from kamal_engine.training import UnlabeledImages

    root, _ = quick_demo
    teacher = load_demo_teachers(root)[0]
    images = UnlabeledImages.from_folder(root / "data" / "unlabeled", (56, 56)).images[:128]
    return teacher, teacher.preprocessing(images)


def features(model, arch, x):
    with torch.no_grad():
        return split_model(model.eval(), arch, "stage").features(x)


def test_cka_is_one_against_itself_and_a_channel_permuted_copy_and_low_against_a_random_net(trained):
    teacher, x = trained
    own = features(teacher.model, "smallnet", x)
    copy, _ = permuted_copy(teacher.model, torch.Generator().manual_seed(1))
    assert torch.allclose(copy(x), teacher.model(x), atol=1e-4)  # the same function
    permuted = features(copy, "smallnet", x)
    torch.manual_seed(3)
    random = features(build_model("smallnet", 5, width=teacher.model.width).eval(), "smallnet", x)
    for a, p, r in zip(own, permuted, random):
        assert feature_cka(a, a) == pytest.approx(1.0, abs=1e-6)
        assert feature_cka(a, p) == pytest.approx(1.0, abs=1e-6)
    against_random = [feature_cka(a, r) for a, r in zip(own, random)]
    assert max(against_random[1:]) < 0.6 and sum(against_random) / 4 < 0.5, against_random
    # the channel alignment (what an SE gate can use) tells a permuted copy from the network itself
    for a, p, r in zip(own, permuted, random):
        assert channel_alignment(a, a) == pytest.approx(1.0, abs=1e-6)
        assert channel_alignment(a, p) < 0.3 and channel_alignment(a, r) < 0.3


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, offset
    assert linear_cka(x, torch.randn(500, 7, generator=g)) < 0.1
    # different spatial sizes are pooled to the smaller one; different channel counts are fine
    a = torch.randn(4, 8, 6, 6, generator=g)
    assert feature_cka(a, torch.nn.functional.interpolate(a, size=(12, 12))) == pytest.approx(1.0, abs=1e-6)
    assert channel_alignment(a, torch.randn(4, 5, 6, 6, generator=g)) == 0.0


def test_least_squares_adapter_recovers_a_linear_channel_map():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 6, 5, 5, generator=g)
    w, b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    target = torch.einsum("oc,nchw->nohw", w, a) + b[None, :, None, None]
    weight, bias = least_squares_map(a, target, ridge=0.0)
    assert torch.allclose(weight, w, atol=1e-4) and torch.allclose(bias, b, atol=1e-4)
    adapter = new_filter({"kind": "adapter", "in_channels": 6, "out_channels": 4, "size": [5, 5]}, AUTO, a, target)
    assert isinstance(adapter, FeatureAdapter) and torch.allclose(adapter(a), target, atol=2e-2)
    identity = new_filter({"kind": "adapter", "in_channels": 6, "out_channels": 6, "size": [5, 5]},
                          {**AUTO, "adapter_init": "identity"}, a, a)
    assert torch.allclose(identity(a), a)


def test_auto_filter_is_the_se_gate_for_aligned_channels_and_an_adapter_otherwise():
    shape = (16, 7, 7)
    assert choose_filter(AUTO, shape, shape, aligned=0.6)["kind"] == "se"
    assert choose_filter(AUTO, shape, shape, aligned=0.05)["kind"] == "adapter"
    assert choose_filter(AUTO, shape, (32, 7, 7), aligned=1.0)["kind"] == "adapter"  # shapes differ
    assert choose_filter({**AUTO, "filter": "se"}, shape, shape, aligned=0.0)["kind"] == "se"  # the paper's
    assert choose_filter({**AUTO, "filter": "adapter"}, shape, shape, aligned=1.0)["kind"] == "adapter"


def test_knowledge_share_and_its_reference_losses():
    p = torch.tensor([[0.9, 0.2, 0.7, 0.1], [0.1, 0.6, 0.2, 0.3]]).T  # 4 images, two multi-label tasks
    tasks = [Task("a", 0, "multilabel", (0,), ("a",), (0,)), Task("b", 0, "multilabel", (1,), ("b",), (1,))]
    floors, priors = reference_losses(p, tasks)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean(0)
    assert torch.allclose(floors, entropy.float(), atol=1e-5) and (priors > floors).all()
    f, q = float(floors[0]), float(priors[0])
    assert knowledge_share(f, f, q) == 1.0 and knowledge_share(q, f, q) == 0.0
    assert knowledge_share((f + q) / 2, f, q) == pytest.approx(0.5)
    assert knowledge_share(2 * q, f, q) == 0.0 and knowledge_share(0.3, 0.3, 0.3) == 1.0
