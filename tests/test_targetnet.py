import math

import pytest
import torch

from kamal_engine.backbones import build_model, split_model
from kamal_engine.errors import KamalError
from kamal_engine.filters import FeatureAdapter, TeacherFilter, build_filter, filter_spec
from kamal_engine.preprocessing import Preprocessing
from kamal_engine.selection import TaskSelection
from kamal_engine.targetnet import (BranchSpec, Student, TargetNet, TaskGroup, build_branch,
                                    choose_branch_points, load_student)
from kamal_engine.teacher import Teacher


def test_branch_out_picks_the_argmin_block():
    converged = {"bus": [0.9, 0.4, 0.2, 0.3], "table": [0.5, 0.6, 0.7, 0.1], "dog": [0.3, math.nan, 0.8, 0.9]}
    assert choose_branch_points(converged) == {"bus": 3, "table": 4, "dog": 1}


def test_branch_out_ties_go_to_the_deeper_block_and_all_nan_fails():
    assert choose_branch_points({"a": [0.2, 0.1, 0.1, 0.3]}) == {"a": 3}
    with pytest.raises(ValueError, match="no finite converged loss"):
        choose_branch_points({"a": [math.nan, math.inf]})


def test_teacher_filter_starts_as_identity_and_adapter_matches_shapes():
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(TeacherFilter(8)(x), x)
    assert filter_spec((8, 5, 5), (8, 5, 5))["kind"] == "se"
    spec = filter_spec((8, 5, 5), (16, 10, 10))
    adapter = build_filter(spec)
    assert isinstance(adapter, FeatureAdapter) and adapter(x).shape == (2, 16, 10, 10)


def make_teacher(name, labels, task="multilabel", seed=0):
    torch.manual_seed(seed)
    model = build_model("smallnet", len(labels), width=4).eval()
    return Teacher(name, "smallnet", list(labels), task, Preprocessing(32), model, {"width": 4, "depth": [1, 1, 1, 1]})


def test_selection_orders_labels_by_teacher_and_makes_tasks():
    a = make_teacher("a", ["cat", "dog", "cow"])
    b = make_teacher("b", ["red", "green", "blue"], task="multiclass")
    sel = TaskSelection.build([a, b], [["dog", "cat"], ["blue", "red"]])
    assert sel.labels == ["dog", "cat", "blue", "red"]
    assert [(t.name, t.kind, t.outputs, t.positions) for t in sel.tasks] == [
        ("dog", "multilabel", (1,), (0,)), ("cat", "multilabel", (0,), (1,)),
        ("b:blue+red", "multiclass", (2, 0), (2, 3))]
    with pytest.raises(KamalError, match="has no label.*'horse'"):
        TaskSelection.build([a], [["horse"]])
    with pytest.raises(KamalError, match="more than one teacher"):
        TaskSelection.build([a, make_teacher("c", ["cat"])], [["cat"], ["cat"]])
    with pytest.raises(KamalError, match="at least two classes"):
        TaskSelection.build([b], [["red"]])


def build_example():
    """Student trunk from one smallnet; branches from two 'teachers' at blocks 2 and 4."""
    torch.manual_seed(0)
    student = split_model(build_model("smallnet", 1, width=4), "smallnet", "stage")
    t1 = build_model("smallnet", 3, width=4)
    t2 = build_model("smallnet", 2, width=4)
    specs, branches = [], []
    for model, block, outputs, positions, name in ((t1, 2, [2, 0], [3, 0], "t1"), (t2, 4, [1, 0], [1, 2], "t2")):
        spec = BranchSpec(block, name, "smallnet", {"width": 4, "depth": [1, 1, 1, 1]}, model.fc.out_features, "stage",
                          {"kind": "se", "channels": 4 * 2 ** (block - 1), "reduction": 4}, outputs, positions, [name])
        branch = build_branch(spec, model)
        with torch.no_grad():  # a filter that is not the identity
            branch.filter.fc2.bias.normal_()
        specs.append(spec)
        branches.append(branch)
    groups = [TaskGroup("multilabel", [0]), TaskGroup("multiclass", [1, 2]), TaskGroup("multilabel", [3])]
    net = TargetNet(list(student.blocks), student.block_names, branches, specs, ["p", "q", "r", "s"], groups).eval()
    return net, student, (t1, t2), branches


def test_targetnet_output_is_the_composition_of_its_parts():
    net, student, (t1, t2), branches = build_example()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = student.features(x)
        t1_net = split_model(t1, "smallnet", "stage")
        out1 = t1_net.forward_from(2, branches[0].filter(f[1]))[:, [2, 0]]
        t2_net = split_model(t2, "smallnet", "stage")
        out2 = t2_net.forward_from(4, branches[1].filter(f[3]))[:, [1, 0]]
        expected = torch.stack([out1[:, 1], out2[:, 0], out2[:, 1], out1[:, 0]], 1)
        logits = net(x)
    assert torch.allclose(logits, expected, atol=0, rtol=0)
    probs = net.probabilities(logits)
    assert torch.allclose(probs[:, 1] + probs[:, 2], torch.ones(3))  # one softmax over the multi-class task
    assert torch.allclose(probs[:, 0], torch.sigmoid(logits[:, 0]))


def test_trunk_after_the_deepest_branch_point_is_dropped():
    net, *_ = build_example()
    assert len(net.trunk) == 4
    student = split_model(build_model("smallnet", 1, width=4), "smallnet", "stage")
    spec = BranchSpec(2, "t", "smallnet", {"width": 4, "depth": [1, 1, 1, 1]}, 2, "stage", {"kind": "identity"},
                      [0, 1], [0, 1], ["t"])
    shallow = TargetNet(list(student.blocks), student.block_names, [build_branch(spec)], [spec], ["x", "y"],
                        [TaskGroup("multilabel", [0, 1])])
    assert len(shallow.trunk) == 2 and shallow.describe()["branches"][0]["block"] == "b2"
    assert shallow.describe()["branches"][0]["filter"] == "identity"  # the Results diagram draws no filter box


def test_student_bundle_round_trip(tmp_path):
    net, *_ = build_example()
    student = Student(net, Preprocessing(32, (0.5,) * 3, (0.2,) * 3), "smallnet", {"width": 4, "depth": [1, 1, 1, 1]},
                      "stage", "filtered-ka")
    path = student.save(tmp_path / "student.kamal.pt")
    assert torch.load(path, weights_only=True)["format"] == "kamal-student"
    loaded = load_student(path)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    assert loaded.labels == ["p", "q", "r", "s"]
    assert torch.equal(loaded.predict(images), student.predict(images))
