"""adaptive-ka: the selection rule, the regulariser, the learnable scale on hand cases; shared labels;
runs on the quick demo with heterogeneous teachers (components, one-shot, ablations, resume)."""

import json
import math
import shutil

import pytest
import torch

from kamal_engine.methods.bridge import FeatureAlignment, TransferBridge, match_size, paired_block, transfer_loss
from kamal_engine.errors import KamalError
from kamal_engine.events import CancelToken, RunCancelled, StepLosses
from kamal_engine.methods.adaptive_ka import (AmalgamationRound, LogitScale, RoundTask, Source, entropy_impurity,
                                              select_teacher)
from kamal_engine.preprocessing import Preprocessing
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.selection import TaskSelection
from kamal_engine.teacher import load_teacher


# --- selective learning (Eq. 5-6) ------------------------------------------------------------------

def test_binary_entropy_impurity_on_hand_cases():
    # p = 0.25: -(0.25 ln 0.25 + 0.75 ln 0.75) / ln 2 = 0.811278
    logits = torch.tensor([[math.log(1 / 3)], [0.0], [60.0], [-60.0]])
    h = entropy_impurity(logits, "multilabel")
    assert h.tolist() == pytest.approx([0.811278, 1.0, 0.0, 0.0], abs=1e-5)
    assert torch.isfinite(h).all()  # a saturated sigmoid gives 0, not NaN


def test_multiclass_entropy_impurity_on_hand_cases():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [math.log(2), 0.0, -1e4, -1e4]])
    h = entropy_impurity(logits, "multiclass")
    # uniform over 4 -> 1; one-hot -> 0; (2/3, 1/3, 0, 0) -> H = 0.636514 nats / ln 4
    assert h.tolist() == pytest.approx([1.0, 0.0, 0.636514 / math.log(4)], abs=1e-5)


def test_selection_takes_the_least_ambiguous_covering_teacher():
    impurity = torch.tensor([[0.9, 0.2, math.inf], [0.1, 0.3, math.inf], [0.5, 0.5, 0.4]])
    assert select_teacher(impurity).tolist() == [1, 0, 2]
    # the rule on real outputs: the confident teacher (logit 4) wins over the unsure one (logit 0.3)
    a, b = entropy_impurity(torch.tensor([[0.3]]), "multilabel"), entropy_impurity(torch.tensor([[-4.0]]), "multilabel")
    assert select_teacher(torch.stack([a, b], 1)).tolist() == [1]


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def _round(selective: bool, bridge: bool = False) -> AmalgamationRound:
    from kamal_engine.backbones import build_model, split_model

    student = split_model(build_model("smallnet", 2, width=4), "smallnet")
    teacher = split_model(build_model("lenet5", 2, width=0.5), "lenet5")
    pre = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    sources = [Source("a", teacher, pre, {0: (0,), 1: (1,)}), Source("b", teacher, pre, {0: (1,)})]
    tasks = [RoundTask("x", "multilabel", (0,), ("x",)), RoundTask("y", "multilabel", (1,), ("y",))]
    return AmalgamationRound(student, pre, sources, tasks, {"selective": selective, "transfer_bridge": bridge,
                                                            "scale": "relative"})


def test_per_task_and_feature_weights_of_a_round():
    impurity = torch.tensor([[[0.6, 0.2], [0.1, math.inf]],    # x: b is surer; y: only a covers it
                             [[0.1, 0.9], [0.8, math.inf]]])
    per_task, feature = _round(True).weights(impurity)
    assert per_task[0].tolist() == [[0, 1], [1, 0]] and per_task[1].tolist() == [[1, 0], [1, 0]]
    # features follow the teacher whose mean impurity over the tasks it covers is least:
    # sample 0: a (0.6 + 0.1) / 2 = 0.35 vs b 0.2 -> b; sample 1: a 0.45 vs b 0.9 -> a
    assert feature.tolist() == [[0, 1], [1, 0]]
    per_task, feature = _round(False).weights(impurity)  # without selection: every covering teacher equally
    assert per_task[0].tolist() == [[0.5, 0.5], [1.0, 0.0]]
    assert feature.tolist() == [[0.5, 0.5], [0.5, 0.5]]


# --- transfer bridge (Eq. 1-4) ----------------------------------------------------------------------

def test_regulariser_on_a_hand_case_and_at_initialisation():
    fa = FeatureAlignment(2, 2)
    assert fa.regulariser().item() == pytest.approx(0.0, abs=1e-6)  # rows start at unit norm
    with torch.no_grad():
        fa.conv.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]).view(2, 2, 1, 1))
    # rows' squared norms 1 and 4: ((1 - 1)^2 + (4 - 1)^2) / 2 = 4.5
    assert fa.regulariser().item() == pytest.approx(4.5)
    with torch.no_grad():
        fa.conv.weight.zero_()  # the trivial solution Eq. 3 rules out costs 1 per output channel
    assert fa.regulariser().item() == pytest.approx(1.0)


def test_regulariser_pulls_rows_to_unit_norm():
    fa = FeatureAlignment(3, 2)
    with torch.no_grad():
        fa.conv.weight.mul_(3.0)
    optimizer = torch.optim.SGD(fa.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        fa.regulariser().backward()
        optimizer.step()
    assert fa.conv.weight.flatten(1).norm(dim=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_transfer_loss_and_bridge_across_shapes():
    a, b = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    assert transfer_loss(a, b).tolist() == [1.0]
    assert transfer_loss(a, 3 * b).tolist() == [9.0]
    bridge = TransferBridge((8, 7, 7), (32, 4, 4))  # the teacher narrower in space, wider in channels
    loss = bridge(torch.randn(3, 8, 7, 7), torch.randn(3, 32, 4, 4))
    assert loss.shape == (3,) and torch.isfinite(loss).all()
    assert match_size(torch.ones(1, 1, 8, 8), (4, 4)).shape[-2:] == (4, 4)
    assert match_size(torch.ones(1, 1, 2, 2), (4, 4)).shape[-2:] == (4, 4)


@pytest.mark.parametrize("student_blocks, teacher_blocks, expected", [(4, 4, [1, 2, 3, 4]), (4, 3, [1, 2, 3, 3]),
                                                                      (3, 4, [2, 3, 4]), (4, 8, [2, 4, 6, 8])])
def test_blocks_pair_by_relative_depth(student_blocks, teacher_blocks, expected):
    assert [paired_block(l, student_blocks, teacher_blocks) for l in range(1, student_blocks + 1)] == expected


# --- the learnable scale (Eq. 7) --------------------------------------------------------------------

def test_relative_scale_keeps_a_single_teacher_at_one_and_a_geometric_mean_of_one():
    one = LogitScale(1)
    with torch.no_grad():
        one.raw.fill_(3.0)
    assert one().tolist() == pytest.approx([1.0])
    two = LogitScale(3)
    with torch.no_grad():
        two.raw.copy_(torch.tensor([0.3, -1.0, 2.0]))
    assert torch.prod(two()).item() == pytest.approx(1.0, rel=1e-5)
    assert LogitScale(2, "free")().tolist() == [1.0, 1.0] and LogitScale(2, "off")().tolist() == [1.0, 1.0]


def test_learned_scale_compensates_teachers_whose_logits_differ_by_a_factor():
    """Teacher B's logits are twice teacher A's for the same images; the student (one shared gain)
    can match both only through λ: the learned ratio λ_A / λ_B goes to 2; without λ it cannot fit."""
    z = torch.randn(64)
    which = torch.arange(64) % 2  # even images learn from A, odd from B
    target = torch.where(which == 0, z, 2 * z)

    def fit(mode):
        scale, gain = LogitScale(2, mode), torch.nn.Parameter(torch.tensor(0.5))
        optimizer = torch.optim.Adam([p for p in (scale.raw, gain) if p.requires_grad], lr=0.05)
        for _ in range(600):
            lam = scale()[which]
            loss = ((gain * z - lam * target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return scale().detach(), loss.item()

    lam, loss = fit("relative")
    assert (lam[0] / lam[1]).item() == pytest.approx(2.0, rel=1e-2) and loss < 1e-4
    _, loss_off = fit("off")
    assert loss_off > 0.1


# --- shared labels -----------------------------------------------------------------------------------

class _T:
    def __init__(self, name, labels, task="multilabel"):
        self.name, self.labels, self.task, self.source = name, labels, task, None


def test_a_label_from_several_teachers_is_one_task_with_every_source():
    a, b = _T("a", ["x", "y", "z"]), _T("b", ["z", "w", "x"])
    selection = TaskSelection.build([a, b], [["x", "y"], ["x", "w"]], shared=True)
    assert selection.labels == ["x", "y", "w"]
    x = selection.tasks[0]
    assert x.sources == ((0, (0,)), (1, (2,)))
    assert [t.name for t, _ in selection.covered_by(1)] == ["x", "w"]
    with pytest.raises(KamalError, match="adaptive-ka"):
        TaskSelection.build([a, b], [["x"], ["x"]])


def test_a_shared_multiclass_task_needs_the_same_classes():
    a, b = _T("a", ["cat", "dog", "cow"], "multiclass"), _T("b", ["dog", "cat", "eel"], "multiclass")
    selection = TaskSelection.build([a, b], [["cat", "dog"], ["dog", "cat"]], shared=True)
    assert len(selection.tasks) == 1 and selection.tasks[0].sources == ((0, (0, 1)), (1, (1, 0)))
    with pytest.raises(KamalError, match="only in part"):
        TaskSelection.build([a, b], [["cat", "dog"], ["dog", "eel"]], shared=True)


# --- runs on the quick demo ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hetero_workspace(quick_demo, tmp_path_factory):
    """The quick demo's data with three tiny heterogeneous sources (SmallNet and LeNet-5, 4 vs 3 blocks)."""
    from kamal_engine.demo import DemoConfig, SourceTeacher, build_heterogeneous

    root, _ = quick_demo
    copy = tmp_path_factory.mktemp("hetero")
    for part in ("data", "demo.json"):
        (shutil.copytree if (root / part).is_dir() else shutil.copy)(root / part, copy / part)
    (copy / "recipes").mkdir()
    sources = (SourceTeacher("s1", "smallnet", {"width": 8, "depth": [1, 1, 1, 1]}, (0, 1, 3), 0, 2),
               SourceTeacher("s2", "lenet5", {"width": 1.0}, (0, 3, 5), 1, 2),
               SourceTeacher("s3", "smallnet", {"width": 4, "depth": [1, 1, 1, 1]}, (3, 5), 0, 2))
    manifest = build_heterogeneous(copy, DemoConfig.quick(), log=lambda m: None, sources=sources, labels=(0, 3, 5))
    assert [t["name"] for t in manifest["heterogeneous"]["teachers"]] == ["s1", "s2", "s3"]
    return copy


def _recipe(recipe_factory, root, extra=None, export=False):
    """The workspace's adaptive-ka recipe, tiny, with a narrow student; its run goes into a fresh folder."""
    recipe = load_recipe(recipe_factory(root / "recipes" / "adaptive-ka.toml",
                                        method={"component_epochs": 1, "target_epochs": 1, **(extra or {})},
                                        student={"arch_kwargs": {"width": 8, "depth": [1, 1, 1, 1]}}))
    if not export:  # the ONNX export is checked once, in the two-stage run
        recipe.onnx = None
    return recipe


@pytest.fixture(scope="module")
def two_stage_run(hetero_workspace, session_recipe_factory):
    events = []
    result = run_recipe(_recipe(session_recipe_factory, hetero_workspace, export=True), emit=events.append)
    return result, events


def test_two_stage_run_learns_each_label_from_every_teacher_that_has_it(two_stage_run):
    result, events = two_stage_run
    report = result.report
    assert result.student.labels == ["zero", "three", "five"]
    assert {t["name"]: t["teachers"] for t in report["tasks"]} == {
        "zero": ["s1", "s2"], "three": ["s1", "s2", "s3"], "five": ["s2", "s3"]}
    for name, entry in report["components"].items():
        assert set(entry["selection_share"]) == set(entry["teachers"])
        assert sum(entry["selection_share"].values()) == pytest.approx(1.0, abs=1e-4)
        assert math.prod(entry["scales"].values()) == pytest.approx(1.0, rel=1e-3)  # relative λ
        assert set(entry["validation"]["ap"]) == {name}
    assert report["target"]["teachers"] == ["component:zero", "component:three", "component:five"]
    # every teacher is evaluated on each selected label it has (the best is what the student is compared to)
    assert report["validation"]["teachers"]["s2"]["ap"].keys() == {"zero", "three", "five"}
    stages = [e.stage for e in events if isinstance(e, StepLosses)]
    assert stages.index("target") > stages.index("component")
    losses = next(e.losses for e in events if isinstance(e, StepLosses))
    assert {"loss", "soft", "transfer", "reg"} <= set(losses) and losses["transfer"] > 0
    assert any(k.startswith("teacher:") for k in losses)
    assert max(report["onnx"]["max_abs_diff"].values()) < 1e-3


def test_component_nets_are_teachers_a_later_run_can_use(two_stage_run, hetero_workspace, recipe_factory):
    result, _ = two_stage_run
    files = {name: entry["file"] for name, entry in result.report["components"].items()}
    component = load_teacher(files["three"])
    assert component.labels == ["three"] and component.task == "multilabel"
    # a one-shot run over two component nets: each label now has a single teacher
    recipe = _recipe(recipe_factory, hetero_workspace, {"variant": "one-shot"})
    from kamal_engine.recipe import TeacherEntry

    recipe.teachers = [TeacherEntry(__import__("pathlib").Path(files[n]), [n]) for n in ("zero", "five")]
    recipe.student_init = "random"
    out = run_recipe(recipe)
    assert out.student.labels == ["zero", "five"]
    assert set(out.report["validation"]["teachers"]) == {"component-zero", "component-five"}


def test_one_shot_without_bridge_and_selection(hetero_workspace, recipe_factory):
    events = []
    result = run_recipe(_recipe(recipe_factory, hetero_workspace, {"variant": "one-shot", "selective": False,
                                                                  "transfer_bridge": False}), emit=events.append)
    steps = [e for e in events if isinstance(e, StepLosses)]
    assert {e.stage for e in steps} == {"target"} and "components" not in result.report
    assert all(e.losses["transfer"] == 0 and e.losses["reg"] == 0 for e in steps)
    # without selection every image learns from all three teachers: each shares the bridge weight equally
    assert result.report["target"]["selection_share"] == pytest.approx({"s1": 1 / 3, "s2": 1 / 3, "s3": 1 / 3},
                                                                        abs=1e-4)


def test_interrupted_then_resumed_run_ends_with_the_same_weights(hetero_workspace, recipe_factory):
    reference = run_recipe(_recipe(recipe_factory, hetero_workspace))
    recipe = _recipe(recipe_factory, hetero_workspace)
    cancel = CancelToken()
    seen = []

    def emit(event):  # cancel in the second component net
        if isinstance(event, StepLosses) and event.stage == "component" and event.block == 2:
            seen.append(event)
            if len(seen) == 3:
                cancel.cancel()

    with pytest.raises(RunCancelled):
        run_recipe(recipe, emit=emit, cancel=cancel)
    resumed = run_recipe(recipe, resume=True)
    a, b = reference.student.net.state_dict(), resumed.student.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_report = json.loads((reference.output_dir / "report.json").read_text())
    assert ref_report["components"]["zero"]["selection_share"] == resumed.report["components"]["zero"]["selection_share"]


def test_methods_without_shared_labels_refuse_a_label_from_two_teachers(hetero_workspace, recipe_factory):
    recipe = _recipe(recipe_factory, hetero_workspace)
    recipe.method = "kd"
    recipe.params = {}
    with pytest.raises(KamalError, match="adaptive-ka"):
        run_recipe(recipe)


def test_a_gloo_group_wraps_each_round_with_its_scale_and_never_a_source(hetero_workspace, recipe_factory, tmp_path,
                                                                         monkeypatch):
    """A one-rank gloo group takes every distributed code path of adaptive-ka in this process."""
    import torch.distributed as dist

    from kamal_engine import distributed
    from kamal_engine.methods.adaptive_ka import LogitScale

    wrapped = []

    class Spy(distributed.DistributedDataParallel):
        def __init__(self, module, *args, **kwargs):
            wrapped.append((module, all(p.requires_grad for p in module.parameters())))  # as it is wrapped
            super().__init__(module, *args, **kwargs)

    monkeypatch.setattr(distributed, "DistributedDataParallel", Spy)
    recipe = _recipe(recipe_factory, hetero_workspace)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{distributed.free_port()}", rank=0, world_size=1)
    try:
        result = run_recipe(recipe)
    finally:
        distributed.leave()
    assert len(wrapped) == 3 + 1  # a component round per label, then the target round
    for module, trainable in wrapped:
        scales = [m for m in module.modules() if isinstance(m, LogitScale)]
        assert len(scales) == 1  # λ is reduced with the student and its bridges
        assert trainable  # no frozen source inside
    assert result.report["validation"]["student"]["mean_ap"] is not None
    assert set(result.report["components"]) == {"zero", "three", "five"}


@pytest.mark.slow
def test_two_processes_run_adaptive_ka_as_well_as_one(hetero_workspace, two_stage_run, recipe_factory, tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    path = recipe_factory(hetero_workspace / "recipes" / "adaptive-ka.toml",
                          method={"component_epochs": 1, "target_epochs": 1},
                          student={"arch_kwargs": {"width": 8, "depth": [1, 1, 1, 1]}}, run={"output_dir": out},
                          export={"onnx": None})
    proc = subprocess.run([sys.executable, "-m", "kamal_engine.cli", "run", str(path), "--nproc", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Outputs in") == 1
    report = json.loads((out / "report.json").read_text())
    one = two_stage_run[0].report["validation"]["student"]["mean_ap"]
    two = report["validation"]["student"]["mean_ap"]
    print(f"adaptive-ka student mAP: one process {one:.4f}, two processes {two:.4f}")
    assert abs(two - one) < 0.03
    assert sorted(p.name for p in (out / "components").iterdir()) == ["five.kamal.pt", "three.kamal.pt", "zero.kamal.pt"]
