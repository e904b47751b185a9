"""Branch plans in real runs: the budget, branch_at and tolerance through the recipe, ``kamal replan`` from a
finished run's blocks (equal to a fresh run with branch_at), and the folders a replan may write."""

import json

import pytest
import torch

from kamal_engine.cli import main
from kamal_engine.errors import KamalError
from kamal_engine.events import BranchPlansMeasured
from kamal_engine.recipe import RecipeError, load_recipe
from kamal_engine.replan import parse_branch_at_args, replan
from kamal_engine.runner import run_recipe

TINY = {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}
LABELS = {0: {"select": ["one"]}, 1: {"select": ["eight"]}}  # one label from each teacher


def recipe(recipe_factory, root, out, **params):
    return load_recipe(recipe_factory(root / "recipes" / "filtered-ka.toml", teachers=LABELS, run={"output_dir": out},
                                      method={"id": "filtered-ka", **TINY, **params}, export=None))


@pytest.fixture(scope="module")
def finished(quick_demo, session_recipe_factory, tmp_path_factory):
    """A finished two-label filtered-ka run (Eq. 9's plan, the default budget) and its report."""
    root, _ = quick_demo
    out = tmp_path_factory.mktemp("replan") / "run"
    path = session_recipe_factory(root / "recipes" / "filtered-ka.toml", teachers=LABELS, run={"output_dir": out},
                                  method={"id": "filtered-ka", **TINY}, export=None)
    events = []
    result = run_recipe(load_recipe(path), emit=events.append)
    return out, result, events


def test_a_run_measures_every_plan_and_reports_the_front(finished):
    out, result, events = finished
    measured = [e for e in events if isinstance(e, BranchPlansMeasured)]
    assert len(measured) == 1
    event = measured[0]
    assert len(event.plans) == 16  # two tasks, four blocks: every plan
    assert event.plans[event.chosen]["plan"] == result.report["branch_points"]
    plan = result.report["branch_plan"]
    assert plan["plans"] == event.plans and plan["front"] == event.front
    assert plan["chosen"]["parameters"] == result.report["size"]["student"]["parameters"]
    assert 0 < result.report["size"]["student_vs_teachers_flops"] <= 1.2


def test_replan_equals_a_fresh_run_with_branch_at(finished, quick_demo, recipe_factory, tmp_path):
    out, result, _ = finished
    root, _ = quick_demo
    at = {"one": "b4", "eight": "b3"}
    replanned = replan(out, {"branch_at": at})
    assert replanned.output_dir == out.with_name("run-at-eight-b3-one-b4")
    assert replanned.report["branch_points"] == at and replanned.report["branch_plan"]["rule"] == "branch_at"
    assert replanned.report["replanned_from"] == str(out)
    fresh = run_recipe(recipe(recipe_factory, root, tmp_path / "fresh", branch_at=at))
    assert fresh.report["branch_points"] == at
    a, b = replanned.student.net.state_dict(), fresh.student.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the finished run is only read; the new folder's recipe is the replan's
    assert json.loads((out / "report.json").read_text())["branch_points"] == result.report["branch_points"]
    assert load_recipe(replanned.output_dir / "recipe.toml").params["branch_at"] == at
    # the block-wise stage was not run again: the rows up to the last block are the finished run's
    old = (out / "metrics.csv").read_text().splitlines()
    new = (replanned.output_dir / "metrics.csv").read_text().splitlines()
    blocks = [line for line in old if ",finetune," not in line]
    assert new[:len(blocks)] == blocks


def test_replan_under_a_budget_and_the_folders_it_refuses(finished, capsys):
    out, result, _ = finished
    teachers = result.report["branch_plan"]["teachers_parameters"]
    assert main(["replan", str(out), "--max-params", "0.6"]) == 0
    report = json.loads((out.with_name("run-p0.6") / "report.json").read_text())
    assert report["size"]["student"]["parameters"] <= 0.6 * teachers
    assert report["branch_plan"]["rule"] == "budget"
    assert "Student:" in capsys.readouterr().out
    assert main(["replan", str(out), "--max-params", "0.6"]) == 2  # a finished replan is not replaced unasked
    assert "holds a finished run" in capsys.readouterr().err
    foreign = out.with_name("mine")
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["replan", str(out), "--max-params", "0.6", "--output", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "mine" and "no run wrote" in capsys.readouterr().err
    assert main(["replan", str(out)]) == 2
    assert "give the plan" in capsys.readouterr().err
    assert main(["replan", str(out), "--max-params", "0.01"]) == 2  # refused before training, nothing left
    assert "smallest TargetNet" in capsys.readouterr().err and not out.with_name("run-p0.01").exists()
    assert main(["replan", str(out), "--branch-at", "one=b9"]) == 2
    assert "'b9' is not a block of the student" in capsys.readouterr().err
    assert main(["replan", str(foreign), "--max-params", "0.6"]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_branch_at_and_budgets_in_a_recipe_are_checked_before_training(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    with pytest.raises(KamalError, match=r"max_params = 0.1 allows .* smallest TargetNet .* has more than"):
        run_recipe(recipe(recipe_factory, root, tmp_path / "small", max_params=0.1))
    with pytest.raises(KamalError, match=r"'seven' is not a selected label; the selected labels are one, eight"):
        run_recipe(recipe(recipe_factory, root, tmp_path / "label", branch_at={"seven": "b2"}))
    with pytest.raises(RecipeError, match=r"branch_at.*expected a dict"):
        run_recipe(recipe(recipe_factory, root, tmp_path / "kind", branch_at="b2"))
    assert not (tmp_path / "small" / "checkpoints").exists()  # nothing trained, nothing written
    # a recipe written before max_params was named so still runs
    assert load_recipe(recipe_factory(root / "recipes" / "filtered-ka.toml", method={"max_size": 0.0})).params


def test_branch_at_arguments():
    assert parse_branch_at_args(["one=b3", "eight = b4"]) == {"one": "b3", "eight": "b4"}
    assert parse_branch_at_args(["one=b3,eight=b4"]) == {"one": "b3", "eight": "b4"}
    assert parse_branch_at_args(None) is None
    with pytest.raises(KamalError, match="write LABEL=BLOCK"):
        parse_branch_at_args(["one"])


def test_dual_gan_branches_a_teachers_labels_together_within_a_budget_and_replans(quick_demo, recipe_factory,
                                                                                  tmp_path):
    from test_dual_gan import TINY as GAN, dual_gan_recipe

    root, _ = quick_demo
    events = []
    path = dual_gan_recipe(recipe_factory, root, tmp_path / "gan", {**GAN, "max_params": 0.6})
    result = run_recipe(load_recipe(path), emit=events.append)
    plan = result.report["branch_plan"]
    assert plan["joint"] and plan["parameters"] <= 0.6 * plan["teachers_parameters"]
    assert result.report["size"]["student"]["parameters"] == plan["parameters"]
    by_teacher = {}
    for task in result.report["tasks"]:
        by_teacher.setdefault(task["teacher"], set()).add(result.report["branch_points"][task["name"]])
    assert all(len(blocks) == 1 for blocks in by_teacher.values())  # Eq. 18: a teacher's labels together
    measured = next(e for e in events if isinstance(e, BranchPlansMeasured))
    assert len(measured.plans) == 16  # two teachers, four blocks
    replanned = replan(tmp_path / "gan", {"max_params": 0.0})  # no budget: Eq. 18's own plan
    assert replanned.report["branch_points"] == {t: b for t, b in plan["eq9"].items()}
    assert replanned.report["branch_plan"]["rule"] == "eq9"


def test_a_replan_exports_into_its_own_folder_never_over_the_runs_onnx(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    elsewhere = tmp_path / "models" / "student.onnx"  # the user's [export] path, outside the run folder
    path = recipe_factory(root / "recipes" / "filtered-ka.toml", teachers=LABELS, run={"output_dir": tmp_path / "r"},
                          method={"id": "filtered-ka", **TINY}, export={"onnx": elsewhere})
    run_recipe(load_recipe(path))
    before = elsewhere.read_bytes()
    replanned = replan(tmp_path / "r", {"max_params": 0.6})
    assert replanned.report["onnx"]["path"] == str(replanned.output_dir / "student.onnx")
    assert (replanned.output_dir / "student.onnx").is_file() and elsewhere.read_bytes() == before
