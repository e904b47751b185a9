"""Where a run's time goes (report.json "profile") and the frozen prefix's cache, which must not change
the run's result."""

import pytest

from kamal_engine.profiling import RunProfile, summary
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe

TINY = {"id": "filtered-ka", "epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}


def test_the_profile_adds_up_parts_and_says_them_in_one_line():
    profile = RunProfile()
    profile.add("a", 2.0, images=100)
    profile.add("a", 1.0, images=50)
    profile.add("b", 1.0)
    d = profile.to_dict(total=4.0)
    assert list(d["parts"]) == ["a", "b"]
    assert d["parts"]["a"] == {"seconds": 3.0, "share": 0.75, "calls": 2, "images_per_second": 50.0}
    assert "images_per_second" not in d["parts"]["b"]
    assert summary(d) == "Time (4 s): a 3.0 s (75%), b 1.0 s (25%)"


def test_the_prefix_cache_leaves_the_run_as_it_was_and_the_profile_names_the_parts(quick_demo, recipe_factory,
                                                                                  tmp_path):
    root, _ = quick_demo
    reports = {}
    for name, extra in (("cached", {}), ("plain", {"cache_mb": 0})):
        path = recipe_factory(root / "recipes" / "filtered-ka.toml", run={"output_dir": tmp_path / name},
                              method={**TINY, **extra}, export=None)
        reports[name] = run_recipe(load_recipe(path)).report
    cached, plain = reports["cached"], reports["plain"]
    assert cached["prefix_cache"]["b2"].endswith(" MB") and plain["prefix_cache"]["b2"] == "off (cache_mb = 0)"
    assert cached["branch_points"] == plain["branch_points"]
    for label, ap in plain["validation"]["student"]["ap"].items():
        assert cached["validation"]["student"]["ap"][label] == pytest.approx(ap, abs=1e-4)
    for task, losses in plain["converged_loss"].items():
        assert cached["converged_loss"][task] == pytest.approx(losses, rel=1e-4)
    parts = cached["profile"]["parts"]
    for name in ("amalgamate b1 forward", "amalgamate b4 backward", "amalgamate b3 frozen prefix",
                 "amalgamate b2 teachers' blocks", "finetune forward", "converged loss", "teacher targets",
                 "load images", "evaluate", "ap by block", "prefix cache", "diagnose"):
        assert name in parts, name
    assert "prefix cache" not in plain["profile"]["parts"]
    assert sum(p["share"] for n, p in parts.items() if n.endswith((" forward", " backward", " update"))) < 1.0
    assert parts["teacher targets"]["images_per_second"] > 0
