"""DAFL: the generator losses on hand-computed cases, the generator, and runs on the quick demo."""

import json
import math

import pytest
import torch

from kamal_engine.methods.datafree import activation_loss, information_entropy_loss, one_hot_loss
from kamal_engine.events import CancelToken, RunCancelled, SamplesGenerated, StepLosses
from kamal_engine.methods.generators import DCGANGenerator, GeneratedImages
from kamal_engine.preprocessing import Preprocessing
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.selection import Task


def task(kind, n, name="t"):
    return Task(name=name, teacher=0, kind=kind, labels=tuple(f"l{i}" for i in range(n)),
                outputs=tuple(range(n)), positions=tuple(range(n)))


def test_one_hot_loss_multiclass_is_cross_entropy_against_the_argmax():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    first = -math.log(math.exp(2) / (math.exp(2) + 2))
    second = -math.log(math.exp(3) / (1 + math.e + math.exp(3)))
    assert one_hot_loss(logits, [task("multiclass", 3)]).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_one_hot_loss_multilabel_thresholds_each_output_at_one_half():
    logits = torch.tensor([[2.0, -1.0]])  # pseudo labels: present, absent
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert one_hot_loss(logits, [task("multilabel", 2)]).item() == pytest.approx(expected, rel=1e-6)


def test_activation_loss_is_minus_the_mean_absolute_feature_averaged_over_teachers():
    a = torch.tensor([[1.0, -2.0], [3.0, -4.0]])  # mean |F| = 2.5
    b = torch.full((1, 2, 2, 2), -0.5)  # mean |F| = 0.5
    assert activation_loss([a]).item() == pytest.approx(-2.5)
    assert activation_loss([a, b]).item() == pytest.approx(-1.5)


def test_information_entropy_loss_multiclass_is_minus_h_info_of_the_mean_prediction():
    k = 4
    balanced = torch.eye(k) * 50  # each image confidently a different class: mean prediction uniform
    assert information_entropy_loss(balanced, [task("multiclass", k)]).item() == pytest.approx(-math.log(k) / k, abs=1e-6)
    collapsed = torch.tensor([[50.0, 0, 0, 0]] * k)  # every image the same class: entropy 0
    assert information_entropy_loss(collapsed, [task("multiclass", k)]).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.7, 0.2, 0.1])
    logits = p.log().unsqueeze(0)
    expected = float((p * p.log()).sum() / 3)
    assert information_entropy_loss(logits, [task("multiclass", 3)]).item() == pytest.approx(expected, rel=1e-5)


def test_information_entropy_loss_multilabel_is_supplementary_eq_3():
    logits = torch.tensor([[0.0, 10.0], [0.0, 10.0]])  # label 0: mean 0.5; label 1: mean ~1
    m = torch.sigmoid(torch.tensor(10.0)).item()
    h = lambda q: q * math.log(q) + (1 - q) * math.log(1 - q)  # noqa: E731
    expected = (h(0.5) + h(m)) / 2
    assert information_entropy_loss(logits, [task("multilabel", 2)]).item() == pytest.approx(expected, rel=1e-5)


def test_losses_average_over_tasks():
    logits = torch.tensor([[2.0, -1.0, 2.0, 0.0, 0.0]])
    tasks = [task("multilabel", 2, "a"), Task("b", 0, "multiclass", ("x", "y", "z"), (2, 3, 4), (2, 3, 4))]
    alone = [one_hot_loss(logits[:, :2], tasks[:1]), one_hot_loss(logits[:, 2:], [task("multiclass", 3)])]
    assert one_hot_loss(logits, tasks).item() == pytest.approx(sum(x.item() for x in alone) / 2, rel=1e-6)


@pytest.mark.parametrize("size", [(32, 32), (56, 56), (30, 30)])
def test_generator_makes_normalised_images_of_the_student_size(size):
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=8, image_size=size, width=8)
    x = g(torch.randn(16, 8))
    assert x.shape == (16, 3, *size)
    per_channel = x.transpose(0, 1).reshape(3, -1)  # the final affine-free batch norm
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-2)


def test_generated_images_reach_each_teacher_in_its_own_normalisation_and_size():
    student = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    view = GeneratedImages(student)
    x = torch.randn(2, 3, 32, 32)
    pixels = x * 0.25 + 0.5
    assert torch.equal(view.for_teacher(x, student), x)
    other = Preprocessing(32, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    expected = (pixels - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5
    assert torch.allclose(view.for_teacher(x, other), expected, atol=1e-6)
    assert view.for_teacher(x, Preprocessing(48, student.mean, student.std)).shape == (2, 3, 48, 48)
    preview = view.preview(x, count=1)
    assert preview.dtype == torch.uint8 and preview.shape == (1, 3, 32, 32)
    assert torch.equal(preview, (pixels[:1].clamp(0, 1) * 255).round().to(torch.uint8))


TINY_DAFL = {"epochs": 2, "iterations": 3, "batch_size": 16, "generator_width": 4, "preview_every": 2}


def dafl_recipe(recipe_factory, root, out, params=TINY_DAFL):
    """The demo's data-free recipe (two multi-label teachers, different preprocessing) with ``dafl``."""
    return recipe_factory(root / "recipes" / "dual-gan.toml", method={"id": "dafl", **params},
                          run={"output_dir": out}, export={"onnx": out / "student.onnx"})


def test_dafl_run_without_data_reports_generator_losses_previews_and_a_student(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    events = []
    result = run_recipe(load_recipe(dafl_recipe(recipe_factory, root, tmp_path / "dafl")), emit=events.append)
    steps = [e for e in events if isinstance(e, StepLosses)]
    assert [e.step for e in steps] == list(range(1, 7))
    assert {"generator:total", "generator:one-hot", "generator:activation", "generator:rate", "generator:batch-norm",
            "teacher:digits_0to4", "teacher:digits_5to9"} <= steps[-1].losses.keys()
    previews = [e for e in events if isinstance(e, SamplesGenerated)]
    assert [e.step for e in previews] == [2, 4, 6]
    assert previews[0].images.dtype == torch.uint8 and previews[0].images.shape[1:] == (3, 56, 56)
    report = json.loads((tmp_path / "dafl" / "report.json").read_text())
    assert report["method"] == "dafl" and report["generated_images"] == 2 * 3 * 16
    assert set(report["validation"]["student"]["ap"]) == set(report["labels"])
    assert (tmp_path / "dafl" / "student.onnx").is_file()
    assert result.student.predict(torch.zeros(1, 3, 56, 56, dtype=torch.uint8)).shape == (1, 10)


def test_dafl_noise_baseline_trains_the_student_without_a_generator(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    events = []
    run_recipe(load_recipe(dafl_recipe(recipe_factory, root, tmp_path / "noise", {**TINY_DAFL, "source": "noise"})),
               emit=events.append)
    steps = [e for e in events if isinstance(e, StepLosses)]
    assert steps and not any(k.startswith("generator:") for k in steps[-1].losses)


def test_dafl_interrupted_then_resumed_ends_with_the_same_student(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    whole = run_recipe(load_recipe(dafl_recipe(recipe_factory, root, tmp_path / "whole")))
    cancel = CancelToken()

    def stop_in_epoch_2(event):
        if isinstance(event, StepLosses) and event.step == 4:
            cancel.cancel()

    recipe = load_recipe(dafl_recipe(recipe_factory, root, tmp_path / "cut"))
    with pytest.raises(RunCancelled):
        run_recipe(recipe, emit=stop_in_epoch_2, cancel=cancel)
    resumed = run_recipe(recipe, resume=True)
    a, b = whole.student.net.state_dict(), resumed.student.net.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
