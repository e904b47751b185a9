"""dual-gan: L_dis on hand cases, the group-stack generator's alignment with the blocks, and runs on the quick demo."""

import json
import math

import pytest
import torch

from kamal_engine.backbones import build_model, split_model
from kamal_engine.methods.datafree import discrete_loss
from kamal_engine.errors import KamalError
from kamal_engine.events import BlockConverged, BranchPlanChosen, CancelToken, RunCancelled, SamplesGenerated, StepLosses
from kamal_engine.filters import build_filter, filter_spec
from kamal_engine.methods.generators import GroupStackGenerator, group_boundaries
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.selection import Task


def test_discrete_loss_readings_on_a_hand_case():
    logits = torch.tensor([[2.0, -1.0], [0.0, -3.0]])
    tasks = [Task("t", 0, "multilabel", ("a", "b"), (0, 1), (0, 1))]
    s = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.0, -3.0)]
    # the default: y = 2p - 1, the output centred on the undecided 0.5
    assert discrete_loss(logits, tasks).item() == pytest.approx(-sum(abs(2 * p - 1) for p in s) / 4, rel=1e-6)
    assert discrete_loss(logits, tasks, on="logits").item() == pytest.approx(-1.5)
    # the printed reading: minus the mean probability
    expected = -torch.sigmoid(logits).mean().item()
    assert discrete_loss(logits, tasks, on="probabilities").item() == pytest.approx(expected, rel=1e-6)
    # a multi-class task's probabilities always sum to one: that reading is a constant there
    mc = [Task("m", 0, "multiclass", ("a", "b"), (0, 1), (0, 1))]
    assert discrete_loss(logits, mc, on="probabilities").item() == pytest.approx(-0.5, rel=1e-6)
    with pytest.raises(ValueError):
        discrete_loss(logits, tasks, on="features")


def test_decision_reading_is_bounded_and_does_not_favour_present_or_absent():
    tasks = [Task("t", 0, "multilabel", ("a",), (0,), (0,))]
    big = discrete_loss(torch.tensor([[1e4]]), tasks).item()
    assert big == pytest.approx(-1.0)
    assert discrete_loss(torch.tensor([[-1e4]]), tasks).item() == pytest.approx(big)


def test_discrete_loss_rewards_decided_outputs_in_either_direction():
    tasks = [Task("t", 0, "multilabel", ("a",), (0,), (0,))]
    undecided, yes, no = (torch.tensor([[v]]) for v in (0.0, 4.0, -4.0))
    assert discrete_loss(yes, tasks).item() == pytest.approx(discrete_loss(no, tasks).item(), rel=1e-6)
    assert discrete_loss(yes, tasks) < discrete_loss(undecided, tasks) == 0


@pytest.mark.parametrize("groups, blocks, expected", [(4, 4, [3, 2, 1, 0]), (2, 4, [2, 0]), (1, 4, [0]),
                                                      (3, 4, [3, 1, 0]), (2, 16, [8, 0])])
def test_group_boundaries_follow_eq_5_and_spread_fewer_groups_evenly(groups, blocks, expected):
    assert group_boundaries(groups, blocks) == expected


@pytest.mark.parametrize("groups", [0, 5])
def test_group_boundaries_refuse_more_groups_than_blocks(groups):
    with pytest.raises(ValueError):
        group_boundaries(groups, 4)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_each_group_makes_the_student_feature_that_enters_its_block_and_a_teacher_continues_from_it(groups):
    torch.manual_seed(0)
    student = split_model(build_model("smallnet", 10, width=8), "smallnet", "stage")
    teacher = split_model(build_model("smallnet", 5, width=8), "smallnet", "stage").eval()
    wide = split_model(build_model("smallnet", 5, width=12), "smallnet", "stage").eval()
    student_shapes = student.output_shapes((56, 56))
    boundaries = group_boundaries(groups, len(student))
    shapes = [(3, 56, 56) if b == 0 else student_shapes[b - 1] for b in boundaries]
    generator = GroupStackGenerator(16, shapes, width=8)
    features = generator(torch.randn(6, 16))
    assert [tuple(f.shape[1:]) for f in features] == shapes
    image = features[-1]
    assert torch.allclose(image.transpose(0, 1).reshape(3, -1).mean(1), torch.zeros(3), atol=1e-4)
    for b, feature in zip(boundaries, features):
        if b == 0:
            continue
        assert feature.min() >= 0  # like a teacher block's ReLU output
        # the same width: the SE filter; another width: the 1x1 adapter to that teacher's block shape
        for net in (teacher, wide):
            spec = filter_spec(student_shapes[b - 1], net.output_shapes((56, 56))[b - 1])
            assert spec["kind"] == ("se" if net is teacher else "adapter")
            assert net.forward_from(b, build_filter(spec)(feature)).shape == (6, 5)


TINY = {"generator_epochs": 2, "epochs_per_block": 1, "finetune_epochs": 1, "iterations": 2, "batch_size": 16,
        "generator_width": 4, "preview_every": 2, "eval_batches": 2}


def dual_gan_recipe(recipe_factory, root, out, params=TINY):
    """The demo's data-free recipe (two multi-label teachers with different preprocessing), tiny settings."""
    return recipe_factory(root / "recipes" / "dual-gan.toml", method={"id": "dual-gan", **params},
                          run={"output_dir": out}, export={"onnx": out / "student.onnx"})


def test_dual_gan_run_trains_generator_then_blocks_branches_per_teacher_and_exports(quick_demo, recipe_factory,
                                                                                     tmp_path):
    root, _ = quick_demo
    events = []
    result = run_recipe(load_recipe(dual_gan_recipe(recipe_factory, root, tmp_path / "run")), emit=events.append)
    steps = [e for e in events if isinstance(e, StepLosses)]
    assert [e.step for e in steps] == list(range(1, 2 * 2 + 4 * 2 + 2 + 1))
    generator_steps = [e for e in steps if e.stage == "generator"]
    assert len(generator_steps) == 4
    assert {"generator:joint", "generator:one-hot", "generator:activation", "generator:rate", "generator:batch-norm",
            "generator:discrete", "generator:groups"} <= generator_steps[-1].losses.keys()
    # Eq. 16 with two groups on four blocks: the generator's own feature enters block 3 only
    stream = {e.block for e in steps if "dual:generator-stream" in e.losses}
    assert stream == {3}
    assert [e.step for e in events if isinstance(e, SamplesGenerated)] == [2, 4]
    assert [e.block for e in events if isinstance(e, BlockConverged)] == [1, 2, 3, 4]
    plan = next(e for e in events if isinstance(e, BranchPlanChosen)).plan
    # Eq. 18: one branch point per teacher
    assert len({plan[d] for d in ("zero", "one", "two", "three", "four")}) == 1
    assert len({plan[d] for d in ("five", "six", "seven", "eight", "nine")}) == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == "dual-gan" and report["generator_groups"] == ["b2", "image"]
    by_teacher = report["converged_loss_by_teacher"]["digits_0to4"]
    assert plan["zero"] == min(by_teacher, key=lambda name: (by_teacher[name], -report["blocks"].index(name)))
    assert set(report["ap_by_block"]) == {"b1", "b2", "b3", "b4"}
    assert (tmp_path / "run" / "student.onnx").is_file()
    assert result.student.predict(torch.zeros(2, 3, 56, 56, dtype=torch.uint8)).shape == (2, 10)


def test_dual_gan_interrupted_in_a_block_then_resumed_ends_with_the_same_student(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    whole = run_recipe(load_recipe(dual_gan_recipe(recipe_factory, root, tmp_path / "whole")))
    cancel = CancelToken()

    def stop_in_block_2(event):
        if isinstance(event, StepLosses) and event.stage == "amalgamate" and event.block == 2:
            cancel.cancel()

    recipe = load_recipe(dual_gan_recipe(recipe_factory, root, tmp_path / "cut"))
    with pytest.raises(RunCancelled):
        run_recipe(recipe, emit=stop_in_block_2, cancel=cancel)
    resumed = run_recipe(recipe, resume=True)
    a, b = whole.student.net.state_dict(), resumed.student.net.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_dual_gan_refuses_more_generator_groups_than_blocks(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    with pytest.raises(KamalError, match="groups = 5"):
        run_recipe(load_recipe(dual_gan_recipe(recipe_factory, root, tmp_path / "five", {**TINY, "groups": 5})))
