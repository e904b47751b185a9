import csv
import json
import sys

import pytest
import torch

from kamal_engine.cli import main
from kamal_engine.events import BlockConverged, CancelToken, RunCancelled, StepLosses
from kamal_engine.recipe import RecipeError, load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.targetnet import load_student

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TINY = {"filtered-ka": {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32},
        "kd": {"epochs": 2, "batch_size": 32}}


def tiny_recipe(recipe_factory, root, out, method="filtered-ka", params=None, **sections):
    """The quick demo's filtered-ka recipe run with ``method`` and ``params`` (tiny by default) into ``out``."""
    return recipe_factory(root / "recipes" / "filtered-ka.toml", run={"output_dir": out},
                          method={"id": method, **(TINY[method] if params is None else params)}, **sections)


def state(student):
    return {k: v.clone() for k, v in student.net.state_dict().items()}


def test_filtered_ka_run_writes_every_output(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    events = []
    result = run_recipe(load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "a")), emit=events.append)
    out = tmp_path / "a"
    for name in ("student.kamal.pt", "report.json", "metrics.csv", "recipe.toml", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["blocks"] == ["b1", "b2", "b3", "b4"]
    assert set(report["branch_points"]) == set(report["labels"]) and len(report["labels"]) == 10
    for label, losses in report["converged_loss"].items():  # Eq. 9 on the recorded losses
        best = min(losses.values())
        assert report["branch_plan"]["eq9"][label] == max(b for b, v in losses.items() if v == best)
    plan = report["branch_plan"]
    assert plan["parameters"] == report["size"]["student"]["parameters"]  # the plan's size is the student's
    assert plan["parameters"] <= plan["budget_parameters"] or plan["rule"] == "over-budget"
    if plan["rule"] == "eq9":
        assert report["branch_points"] == plan["eq9"] and plan["eq9_parameters"] == plan["parameters"]
    else:  # the budget moved branch points because Eq. 9's own plan was over it
        assert plan["rule"] in ("budget", "over-budget") and plan["eq9_parameters"] > plan["budget_parameters"]
    chosen = plan["chosen"]
    assert chosen["plan"] == report["branch_points"] and chosen["parameters"] == plan["parameters"]
    front = [plan["plans"][i] for i in plan["front"]]  # smallest first, each better than the smaller ones
    assert all(a["parameters"] < b["parameters"] and a["loss"] > b["loss"] for a, b in zip(front, front[1:]))
    # before fine-tuning a plan's mAP is the mean of its tasks' AP at their blocks (the paper's Fig. 3)
    everywhere = {name: row["ap"] for name, row in report["ap_by_block"].items()}
    for row in plan["plans"]:
        aps = [everywhere[block][label] for label, block in row["plan"].items()]
        assert row["mean_ap"] == pytest.approx(sum(aps) / len(aps), abs=1e-5)
    assert set(report["ap_by_block"]) == {"b1", "b2", "b3", "b4"}
    assert set(report["validation"]["student"]["ap"]) == set(report["labels"])
    assert report["validation"]["teachers"]["digits_0to4"]["ap"].keys() == {"zero", "one", "two", "three", "four"}
    assert report["size"]["student"]["parameters"] > 0 and report["size"]["student"]["flops"] > 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"amalgamate", "finetune"} <= {r["stage"] for r in rows}
    assert any(r["teacher"] == "digits_5to9" and r["task"] == "seven" for r in rows)
    assert sum(isinstance(e, BlockConverged) for e in events) == 4
    steps = [e for e in events if isinstance(e, StepLosses)]
    assert steps[-1].step == steps[-1].total_steps
    # the saved bundle predicts what the in-memory student predicts
    images = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    assert torch.allclose(load_student(out / "student.kamal.pt").predict(images), result.student.predict(images))


@pytest.mark.parametrize("method,stop_event", [
    # slow (three filtered-ka runs): a block-wise resume's weights are checked by dual-gan's, in test_dual_gan.py
    pytest.param("filtered-ka", "block 2", marks=pytest.mark.slow),
    ("kd", "epoch 1")])
def test_interrupted_then_resumed_run_ends_with_the_same_weights(quick_demo, recipe_factory, tmp_path, method,
                                                                 stop_event):
    """Stopped at ``stop_event`` (the end of that block or epoch, where the run checkpoints), the run keeps
    exactly that much; resumed, it trains on from the next step and ends with the uninterrupted run's weights."""
    root, _ = quick_demo
    whole_events = []
    whole = run_recipe(load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "whole", method)),
                       emit=whole_events.append)
    unit, number = stop_event.split()
    number = int(number)
    inside = [e.step for e in whole_events if isinstance(e, StepLosses)
              and (e.block == number and e.stage == "amalgamate" if unit == "block" else e.epoch == number)]
    last_step = max(inside)  # the last step of that block / epoch
    total = max(e.step for e in whole_events if isinstance(e, StepLosses))
    assert 0 < last_step < total  # a stop inside the run, with steps left to resume

    cancel = CancelToken()

    def stop_at(event):
        if unit == "block" and isinstance(event, BlockConverged) and event.block == number:
            cancel.cancel()
        if unit == "epoch" and isinstance(event, StepLosses) and event.step == last_step:
            cancel.cancel()

    recipe = load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "cut", method))
    with pytest.raises(RunCancelled):
        run_recipe(recipe, emit=stop_at, cancel=cancel)
    assert not (tmp_path / "cut" / "student.kamal.pt").exists()
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]
    assert saved["blocks_done" if unit == "block" else "epochs_done"] == number  # stopped where it was asked to
    assert saved["step"] == last_step
    with pytest.raises(Exception, match="unfinished run.*--resume"):
        run_recipe(recipe)
    changed = load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "cut", method,
                                      params={**TINY[method], "batch_size": 16}))
    with pytest.raises(Exception, match="other settings \\(params changed since\\)"):
        run_recipe(changed, resume=True)
    resumed_events = []
    resumed = run_recipe(recipe, resume=True, emit=resumed_events.append)
    assert next(e for e in resumed_events if isinstance(e, StepLosses)).step == last_step + 1
    a, b = state(whole.student), state(resumed.student)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    with open(tmp_path / "cut" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["name"] == "loss"]
    assert steps == list(range(1, len(steps) + 1))  # no step logged twice after the resume
    assert steps[-1] == total  # and none missing


def test_kd_baseline_run(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    result = run_recipe(load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "kd", "kd")))
    assert result.report["method"] == "kd" and len(result.student.net.branches) == 1
    assert result.report["validation"]["student"]["mean_ap"] > 0


def test_method_parameter_errors_name_the_line(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    with pytest.raises(RecipeError, match=r"line \d+: \[method\]\.id: unknown method 'dual-gun'; available: filtered-ka"):
        run_recipe(load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "x", "dual-gun", params={})))
    with pytest.raises(RecipeError, match=r"\[method\]\.epochs_per_blok: unknown parameter for method 'filtered-ka'"):
        run_recipe(load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "x", params={"epochs_per_blok": 2})))
    with pytest.raises(RecipeError, match=r"line \d+: \[method\]\.batch_size: expected a value ≥ 2"):
        run_recipe(load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "x", params={"batch_size": 1})))


def test_cli_run_and_resume_messages(quick_demo, recipe_factory, tmp_path, capsys):
    root, _ = quick_demo
    recipe = tiny_recipe(recipe_factory, root, tmp_path / "cli", "kd", params={"epochs": 1, "batch_size": 64})
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "student AP" in out and "mAP" in out
    assert main(["run", str(recipe), "--resume", "--output", str(tmp_path / "elsewhere")]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    csv_path = root / "data" / "validation" / "labels.csv"
    assert main(["eval", str(tmp_path / "cli" / "student.kamal.pt"), "--data", str(csv_path), "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["mean_ap"] == pytest.approx(report["validation"]["student"]["mean_ap"], abs=1e-6)


def test_ctrl_c_in_kamal_run_stops_cleanly_and_resume_finishes(quick_demo, recipe_factory, tmp_path, capsys):
    import os
    import signal
    import threading

    from kamal_engine import events

    root, _ = quick_demo
    recipe = tiny_recipe(recipe_factory, root, tmp_path / "sigint")
    original = events.BlockConverged.__init__

    def interrupt_after_block_1(self, *args, **kwargs):  # a user pressing Ctrl-C after block 1
        original(self, *args, **kwargs)
        if self.block == 1:
            os.kill(os.getpid(), signal.SIGINT)

    events.BlockConverged.__init__ = interrupt_after_block_1
    try:
        assert threading.current_thread() is threading.main_thread()
        assert main(["run", str(recipe)]) == 130
    finally:
        events.BlockConverged.__init__ = original
    assert "stopping after this step" in capsys.readouterr().err
    assert not (tmp_path / "sigint" / "student.kamal.pt").exists()
    assert main(["run", str(recipe), "--resume"]) == 0
    assert (tmp_path / "sigint" / "student.kamal.pt").exists()


def test_a_teacher_with_an_empty_selection_is_kept_but_teaches_nothing(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    recipe = load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "empty-select", teachers={1: {"select": []}}))
    assert recipe.teachers[1].select == []
    report = run_recipe(recipe).report
    assert report["labels"] == ["zero", "one", "two", "three", "four"]
    assert list(report["validation"]["teachers"]) == ["digits_0to4"]
    teacher_params = report["size"]["teachers"]["digits_0to4"]["parameters"]
    assert report["size"]["student_vs_teachers_parameters"] == pytest.approx(
        report["size"]["student"]["parameters"] / teacher_params, rel=1e-3)


def test_running_a_finished_run_again_needs_replace_and_then_trains_again(quick_demo, recipe_factory, tmp_path, capsys):
    root, _ = quick_demo
    path = tiny_recipe(recipe_factory, root, tmp_path / "again", "kd")
    assert main(["run", str(path)]) == 0
    first = (tmp_path / "again" / "metrics.csv").read_text()
    capsys.readouterr()
    for flags in ([], ["--restart"]):  # a finished run is never replaced unasked
        assert main(["run", str(path), *flags]) == 2
        assert "holds a finished run" in capsys.readouterr().err
    assert main(["run", str(path), "--replace"]) == 0
    err = capsys.readouterr().err
    assert "img/s" in err  # it trained: step progress was printed
    assert (tmp_path / "again" / "metrics.csv").read_text().count("\n") == first.count("\n")


def test_student_init_from_the_demo_backbone(quick_demo, recipe_factory, tmp_path):
    """init = "checkpoint" (the recipe's commented lines): the trunk and normalisation are the backbone's."""
    from kamal_engine.demo import pretrained_path, with_pretrained_init
    from kamal_engine.runner import build_student
    from kamal_engine.selection import TaskSelection
    from kamal_engine.teacher import load_teacher

    root, _ = quick_demo
    text = (root / "recipes" / "filtered-ka.toml").read_text()
    assert '# init = "checkpoint"\n# checkpoint = ' in text
    student = tomllib.loads(with_pretrained_init(text))["student"]  # the recipe's own lines, switched on
    assert student["init"] == "checkpoint"
    recipe = load_recipe(tiny_recipe(recipe_factory, root, tmp_path / "pre", student=student))
    assert recipe.student_checkpoint == pretrained_path(root).resolve()
    teachers = [t.load() for t in recipe.teachers]
    selection = TaskSelection.build(teachers, [t.select for t in recipe.teachers])
    student, arch, _, preprocessing = build_student(recipe, selection)
    backbone = load_teacher(pretrained_path(root))
    assert arch == "smallnet" and preprocessing == backbone.preprocessing
    assert torch.equal(student.stages[3][0].conv2.weight, backbone.model.stages[3][0].conv2.weight)
    assert not torch.equal(student.stages[3][0].conv2.weight, teachers[0].model.stages[3][0].conv2.weight)
    assert student.fc.out_features == 10
