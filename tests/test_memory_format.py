"""[run] memory_format: channels_last where it is measured faster (kamal_engine.layout), the choice kept for a
resumed run, the same result as the default layout within float rounding, the student file in the default
layout."""

import torch

from kamal_engine import layout
from kamal_engine.backbones import build_model
from kamal_engine.recipe import RecipeError, load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.runfolder import read_run_checkpoint
from kamal_engine.targetnet import load_student

TINY = {"id": "filtered-ka", "epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}


def test_choose_takes_channels_last_only_with_the_margin_and_measure_times_both_on_a_copy():
    assert layout.choose({"contiguous": 1.0, "channels_last": 0.8}) == "channels_last"
    assert layout.choose({"contiguous": 1.0, "channels_last": 0.9}) == "contiguous"  # within the noise
    model = build_model("smallnet", 3, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times = layout.measure(model, 4, (32, 32), torch.device("cpu"))
    assert set(times) == {"contiguous", "channels_last"} and all(t > 0 for t in times.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics of the copy only
    conv = next(p for p in layout.apply(model, "channels_last").parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_a_channels_last_run_matches_the_default_and_auto_records_its_choice(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    reports = {}
    for fmt in ("contiguous", "channels_last", "auto"):
        path = recipe_factory(root / "recipes" / "filtered-ka.toml", run={"output_dir": tmp_path / fmt,
                                                                          "memory_format": fmt},
                              method=TINY, export=None)
        reports[fmt] = run_recipe(load_recipe(path)).report
    plain, fast, auto = reports["contiguous"], reports["channels_last"], reports["auto"]
    assert {v["layout"] for v in fast["layout"].values()} == {"channels_last"}
    assert set(auto["layout"]) == {"student", "digits_0to4", "digits_5to9"}
    assert all(set(v["ms"]) == {"contiguous", "channels_last"} for v in auto["layout"].values())
    assert fast["branch_points"] == plain["branch_points"]
    # rounding differs between the layouts' kernels, and SGD carries it on: close, not equal
    assert abs(fast["validation"]["student"]["mean_ap"] - plain["validation"]["student"]["mean_ap"]) < 5e-3
    for label, ap in plain["validation"]["student"]["ap"].items():
        assert abs(fast["validation"]["student"]["ap"][label] - ap) < 1e-2
    checkpoint = read_run_checkpoint(tmp_path / "auto" / "checkpoints" / "last.pt")
    assert checkpoint["state"]["layout"] == {k: v["layout"] for k, v in auto["layout"].items()}  # kept for --resume
    student = load_student(tmp_path / "channels_last" / "student.kamal.pt")
    raw = torch.load(tmp_path / "channels_last" / "student.kamal.pt", weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in raw.values()) and student.labels == plain["labels"]


def test_an_unknown_memory_format_is_a_recipe_error(quick_demo, recipe_factory):
    root, _ = quick_demo
    path = recipe_factory(root / "recipes" / "filtered-ka.toml", run={"memory_format": "nhwc"})
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert "memory_format" in str(exc) and "channels_last" in str(exc)
    else:
        raise AssertionError("accepted memory_format = 'nhwc'")
