"""Teachers trained apart (``kamal demo --independent``): the builder, and filtered-ka's diagnosis, automatic
filter choice and size cap on them and on the shared-backbone demo (tiny settings, the quick demo's data)."""

import json
import shutil

import pytest
import torch

from kamal_engine.demo import DemoConfig, IndependentTeacher, build_independent, independent_paths
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe

TINY = {"epochs_per_block": 1, "max_rounds_per_block": 2, "finetune_epochs": 1, "batch_size": 32, "ap_by_block": False}
TEACHERS = (IndependentTeacher("apart_a", "smallnet", (0, 1, 2, 3, 4), 0, 11, 4, {"width": 8}),
            IndependentTeacher("apart_b", "smallnet", (5, 6, 7, 8, 9), 1, 12, 4, {"width": 8}))


@pytest.fixture(scope="module")
def apart_workspace(quick_demo, tmp_path_factory):
    """The quick demo's data with two tiny SmallNets trained apart (from scratch, own images and seeds)."""
    root, _ = quick_demo
    copy = tmp_path_factory.mktemp("apart")
    for part in ("data", "demo.json", "recipes", "teachers"):
        (shutil.copytree if (root / part).is_dir() else shutil.copy)(root / part, copy / part)
    manifest = build_independent(copy, DemoConfig.quick(), log=lambda m: None, teachers=TEACHERS)
    assert [t["name"] for t in manifest["independent"]["teachers"]] == ["apart_a", "apart_b"]
    return copy


def recipe(recipe_factory, root, out, name="filtered-ka-independent.toml", extra=TINY):
    """The workspace's recipe ``name`` with filtered-ka's ``extra`` settings, on the CPU, into ``out``."""
    return load_recipe(recipe_factory(root / "recipes" / name, method={"id": "filtered-ka", **extra},
                                      run={"device": "cpu", "output_dir": out},
                                      export=None))  # no ONNX export needed here


def test_the_independent_teachers_arrive_as_a_users_bare_state_dicts(apart_workspace):
    paths = independent_paths(apart_workspace, TEACHERS)
    for path, spec in zip(paths, TEACHERS):
        weights = torch.load(path, weights_only=True)
        assert isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())
        assert path.with_suffix(".labels.txt").read_text().split() == [
            ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][d] for d in spec.digits]
    a, b = (torch.load(p, weights_only=True) for p in paths)
    assert not torch.equal(a["stem.0.weight"], b["stem.0.weight"])  # from scratch, each its own seed
    loaded = load_recipe(apart_workspace / "recipes" / "filtered-ka-independent.toml")
    assert [t.checkpoint.name for t in loaded.teachers] == [p.name for p in paths]
    assert loaded.student_arch == "smallnet" and loaded.student_init == "teacher"


def test_filters_are_chosen_by_measurement_and_the_diagnosis_is_reported(apart_workspace, quick_demo, recipe_factory,
                                                                          tmp_path):
    """The SE gate where the teachers share a backbone (the demo), adapters where they were trained apart."""
    shared_root, _ = quick_demo
    apart = run_recipe(recipe(recipe_factory, apart_workspace, tmp_path / "apart")).report
    shared = run_recipe(recipe(recipe_factory, shared_root, tmp_path / "shared", "filtered-ka.toml")).report
    for report, other, kind in ((apart, "apart_b", "adapter"), (shared, "digits_5to9", "se")):
        b1 = report["diagnosis"]["blocks"][0]
        assert b1["block"] == "b1" and b1["teachers"][other]["filter"] == kind, b1["teachers"][other]
        first = next(iter(b1["teachers"].values()))
        assert first["filter"] == "se" and first["aligned_before"] == pytest.approx(1.0, abs=1e-3)  # its own start
        for block in report["diagnosis"]["blocks"]:
            assert 1 <= block["rounds"] <= 2
            for d in block["teachers"].values():
                assert 0.0 <= d["share"] <= 1.0 and -1e-6 <= d["related_before"] <= 1.0 + 1e-6
        assert set(report["diagnosis"]["floor"]) == set(report["labels"])
        assert isinstance(report["diagnosis"]["warnings"], list)
        assert report["size"]["student_vs_teachers_parameters"] <= 1.0 + 1e-9  # the default size cap
    # the gap to the floor and the share say the same thing: the init teacher's knowledge gets through best
    b4 = apart["diagnosis"]["blocks"][-1]["teachers"]
    assert b4["apart_a"]["share"] > b4["apart_b"]["share"]


def test_a_warning_names_the_teacher_whose_knowledge_does_not_get_through(apart_workspace, recipe_factory, tmp_path):
    events = []
    from kamal_engine.events import BlockDiagnosed, RunWarning

    report = run_recipe(recipe(recipe_factory, apart_workspace, tmp_path / "warn", extra={**TINY, "warn_share": 1.0}),
                        emit=events.append).report
    warnings = report["diagnosis"]["warnings"]
    assert warnings and any("apart_b" in w and "of the way" in w for w in warnings)
    assert [e.message for e in events if isinstance(e, RunWarning)] == warnings
    assert sum(isinstance(e, BlockDiagnosed) for e in events) == 4
    saved = json.loads((tmp_path / "warn" / "report.json").read_text())
    assert saved["diagnosis"]["warnings"] == warnings
