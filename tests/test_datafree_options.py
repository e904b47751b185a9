"""The data-free options beyond the papers (kamal_engine.methods.datafree): each on a hand-made case,
then a tiny run of dafl and dual-gan with every option on, resumed."""

import json
import math

import pytest
import torch
from torch import nn

from kamal_engine.events import CancelToken, LabelsCovered, RunCancelled, StepLosses, describe
from kamal_engine.methods import get_method, resolve_params
from kamal_engine.methods.datafree import (BatchNormPrior, LabelCoverage, ReplayPool, augment, balance_loss,
                                           disagreement, diversity, effective_params, information_entropy_loss,
                                           rate_balance_loss)
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.selection import Task


def labels(n, kind="multilabel"):
    return [Task(name="t", teacher=0, kind=kind, labels=tuple(f"l{i}" for i in range(n)),
                 outputs=tuple(range(n)), positions=tuple(range(n)))]


def one_bn_net(channels=3):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    net[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    net[1].running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 9.0]))
    return net.eval()


def test_the_batch_norm_prior_is_zero_at_the_running_statistics_and_grows_as_they_drift():
    bn = one_bn_net()[1]
    net = nn.Sequential(bn).eval()  # one BN layer fed directly: its input is what the statistics describe
    prior = BatchNormPrior([("t", net)])
    mean, std = bn.running_mean.view(1, 4, 1, 1), bn.running_var.sqrt().view(1, 4, 1, 1)
    z = torch.randn(512, 4, 8, 8)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), unbiased=False, keepdim=True)  # exact moments
    values = []
    for drift in (0.0, 0.1, 0.5, 2.0):
        with prior.recording():
            net(z * std * (1 + drift) + mean + drift)
        values.append(prior.value().item())
    assert values[0] == pytest.approx(0.0, abs=1e-4)
    assert values[1] > values[0] and values[2] > values[1] and values[3] > values[2]
    assert bn.running_mean.tolist() == [0.5, -1.0, 2.0, 0.0]  # eval mode: the statistics are only read
    prior.remove()
    with prior.recording():
        net(z)
    assert prior.value().item() == 0.0  # no hook left


def test_the_batch_norm_prior_skips_a_teacher_without_batch_norm_and_says_so():
    lenet = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())
    prior = BatchNormPrior([("lenet5", lenet), ("bn", one_bn_net())])
    assert prior.skipped == ["lenet5"] and prior.describe()["teachers"] == {"bn": 1}
    assert "lenet5" in prior.describe()["note"]
    with prior.recording():
        lenet(torch.randn(2, 3, 8, 8))
    assert prior.value().item() == 0.0


def test_the_rate_balance_is_zero_on_target_and_grows_without_bound_as_a_label_disappears():
    on_target = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])  # each label present in half the images
    assert rate_balance_loss(on_target, labels(2), 0.5).item() == pytest.approx(0.0, abs=1e-3)
    third = torch.tensor([[3.0], [-30.0], [-30.0]])  # present in 1/3 of the images, target 1/3
    assert rate_balance_loss(third, labels(1), 1 / 3).item() == pytest.approx(0.0, abs=0.02)
    gone = [rate_balance_loss(torch.full((4, 1), -z), labels(1), 0.5).item() for z in (2.0, 6.0, 12.0)]
    assert gone[0] < gone[1] < gone[2] and gone[2] > 5  # KL ~ -0.5 log m
    # the papers' entropy form stays bounded for the same vanished label
    assert information_entropy_loss(torch.full((4, 1), -12.0), labels(1)).item() > -1e-3
    multiclass = torch.eye(3) * 20
    assert balance_loss(multiclass, labels(3, "multiclass"), "rate").item() == pytest.approx(
        information_entropy_loss(multiclass, labels(3, "multiclass")).item())
    uniform = torch.eye(3) * 20  # each class once: KL(uniform || m) = 0
    assert balance_loss(uniform, labels(3, "multiclass"), "rate-all").item() == pytest.approx(0.0, abs=1e-6)
    rare = [balance_loss(torch.tensor([[z, 0, 0], [0, z, 0], [0, 0, -z]]), labels(3, "multiclass"), "rate-all").item()
            for z in (1.0, 5.0, 20.0)]  # class 3 ever rarer
    assert 0 < rare[0] < rare[1] < rare[2] and rare[2] > 2
    with pytest.raises(ValueError, match="entropy, rate"):
        balance_loss(multiclass, labels(3), "softmax")


def test_augmentation_shifts_and_mirrors_each_image_and_the_pool_keeps_the_latest():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    same = augment(x, torch.Generator().manual_seed(0), shift=0.0, flip=False)
    assert torch.allclose(same, x, atol=1e-4)
    moved = augment(x, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    flips = [augment(x[:1], torch.Generator().manual_seed(s), shift=0.0) for s in range(8)]
    assert any(torch.allclose(f, x[:1].flip(-1), atol=1e-4) for f in flips)
    pool = ReplayPool(5)
    assert pool.sample(3, torch.Generator()) is None
    for k in range(4):
        pool.add(torch.full((2, 1), float(k)))
    assert len(pool) == 5 and sorted(pool.images.flatten().tolist()) == [1.0, 2.0, 2.0, 3.0, 3.0]
    again = ReplayPool(5)
    again.load_state_dict(pool.state_dict())
    assert torch.equal(again.images, pool.images)


def test_coverage_counts_present_labels_and_diversity_tells_noise_from_a_repeated_image():
    coverage = LabelCoverage(["a", "b"])
    coverage.add(torch.randn(4, 3, 8, 8), torch.tensor([[1.0, -1], [1, -1], [1, 1], [-1, -1]]), labels(2))
    assert coverage.rates() == {"a": 0.75, "b": 0.25}
    assert coverage.summary(3)["epoch"] == 3 and coverage.summary(3)["images"] == 4
    torch.manual_seed(0)
    assert diversity(torch.randn(256, 3, 16, 16)) == pytest.approx(math.sqrt(2), rel=0.02)
    assert diversity(torch.randn(1, 3, 8, 8).repeat(5, 1, 1, 1)) == 0.0
    event = LabelsCovered("train", 2, {"a": 0.9, "b": 0.05}, 0.8)
    assert describe(event) == "  epoch 2, labels present in the generated images: a 90%, b 5%; diversity 0.80"
    assert disagreement(torch.tensor([[50.0]]), torch.tensor([[-50.0]]), labels(1)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["dafl", "dual-gan"])
def test_each_option_resolves_from_the_recipe_and_paper_faithful_turns_every_one_off(method):
    info = get_method(method)
    given = {"balance": "rate", "target_rate": 0.3, "bn_prior": 2.0, "augment": True, "replay": 128,
             "adversarial": 0.5, "adversarial_warmup": 1}
    params = resolve_params(info, given, lambda message, key: ValueError(f"{key}: {message}"))
    assert {k: params[k] for k in given} == given
    paper = effective_params({**params, "paper_faithful": True})
    assert (paper["balance"], paper["bn_prior"], paper["augment"], paper["replay"], paper["adversarial"]) == (
        "entropy", 0.0, False, 0, 0.0)
    with pytest.raises(ValueError, match=r"target_rate: expected a value ≤ 1"):
        resolve_params(info, {"target_rate": 1.5}, lambda message, key: ValueError(f"{key}: {message}"))


EVERY_OPTION = {"balance": "rate", "target_rate": 0.4, "bn_prior": 0.5, "augment": True, "replay": 48,
                "adversarial": 0.5, "adversarial_warmup": 1}
TINY = {"dafl": {"epochs": 3, "iterations": 2, "batch_size": 8, "generator_width": 4, "preview_every": 0},
        "dual-gan": {"generator_epochs": 2, "epochs_per_block": 1, "finetune_epochs": 2, "iterations": 2,
                     "batch_size": 8, "generator_width": 4, "eval_batches": 1, "preview_every": 0,
                     "ap_by_block": False}}


@pytest.mark.parametrize("method", ["dafl", "dual-gan"])
def test_a_tiny_run_with_every_option_on_reports_coverage_and_resumes_to_the_same_student(
        method, quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo

    def recipe(out):
        return load_recipe(recipe_factory(root / "recipes" / "dual-gan.toml",
                                          method={"id": method, **TINY[method], **EVERY_OPTION},
                                          run={"output_dir": tmp_path / out}, export=None))
    events = []
    whole = run_recipe(recipe("whole"), emit=events.append)
    covered = [e for e in events if isinstance(e, LabelsCovered)]
    epochs = TINY[method].get("epochs", TINY[method].get("generator_epochs"))
    assert [e.epoch for e in covered] == list(range(1, epochs + 1))
    losses = [e.losses for e in events if isinstance(e, StepLosses)]
    assert any("generator:batch-norm" in row and "generator:rate" in row for row in losses)
    assert any(row.get("generator:adversarial", 0) != 0 for row in losses)  # after the warm-up
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert len(report["coverage"]["generated"]) == epochs
    assert set(report["coverage"]["real"]) == set(report["labels"])  # from the validation set
    assert report["batch_norm_prior"]["teachers"] and report["ingredients"]["replay"] == 48
    assert {row["term"] for row in report["loss_terms"]["generator"]} >= {"rate", "batch-norm"}

    cancel = CancelToken()
    stop_at = 3 if method == "dafl" else 2 * 2 + 4 * 2 + 1  # dafl: in epoch 2; dual-gan: in the fine-tuning

    def stop(event):
        if isinstance(event, StepLosses) and event.step == stop_at:
            cancel.cancel()
    cut = recipe("cut")
    with pytest.raises(RunCancelled):
        run_recipe(cut, emit=stop, cancel=cancel)
    resumed = run_recipe(cut, resume=True)
    a, b = whole.student.net.state_dict(), resumed.student.net.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
