import csv
import sys

import numpy as np
import pytest

from kamal_engine.demo import (DIGIT_NAMES, DemoConfig, build_demo, compose_mosaics, load_demo_teachers,
                               pretrained_path)
from kamal_engine.teacher import load_teacher

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_mosaics_hold_one_to_four_digits_with_matching_labels():
    digits = np.stack([np.full((28, 28), 10 + d, dtype=np.uint8) for d in range(10)])
    images, targets = compose_mosaics(digits, np.arange(10), 300, np.random.default_rng(0))
    assert images.shape == (300, 56, 56) and targets.shape == (300, 10)
    for image, target in zip(images, targets):
        cells = [image[r:r + 28, c:c + 28] for r in (0, 28) for c in (0, 28)]
        present = {int(cell[0, 0]) - 10 for cell in cells if cell[0, 0]}
        assert 1 <= sum(bool(cell[0, 0]) for cell in cells) <= 4
        assert present == set(np.flatnonzero(target))


def test_quick_demo_workspace(quick_demo):
    root, manifest = quick_demo
    assert (root / "demo.json").is_file()
    with open(root / "data" / "validation" / "labels.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", *DIGIT_NAMES] and len(rows) == 1 + 200
    assert not (root / "data" / "unlabeled" / "labels.csv").exists()
    assert len(list((root / "data" / "unlabeled" / "images").glob("*.png"))) == 300
    native, foreign = load_demo_teachers(root)
    assert native.source_format == "native" and foreign.source_format == "state_dict"
    assert native.labels == DIGIT_NAMES[:5] and foreign.labels == DIGIT_NAMES[5:]
    assert native.preprocessing.mean != foreign.preprocessing.mean  # each teacher normalises its own way
    for recipe in ("filtered-ka", "dual-gan"):
        data = tomllib.loads((root / "recipes" / f"{recipe}.toml").read_text())
        assert {"run", "teachers", "student", "data", "method", "export"} <= set(data)
        assert data["method"]["id"] == recipe
        for teacher in data["teachers"]:
            assert (root / "recipes" / teacher["checkpoint"]).resolve().is_file()
    assert [t["validation"]["mean_ap"] > 0.5 for t in manifest["teachers"]] == [True, True]
    backbone = load_teacher(pretrained_path(root))  # the papers' ImageNet weights in miniature
    assert backbone.labels == DIGIT_NAMES and backbone.task == "multiclass"
    assert backbone.preprocessing == native.preprocessing and backbone.arch_kwargs == native.arch_kwargs


@pytest.mark.slow
def test_full_demo_teachers_reach_095_map(tmp_path):
    manifest = build_demo(tmp_path, DemoConfig(), log=lambda message: None)
    assert [t["validation"]["mean_ap"] >= 0.95 for t in manifest["teachers"]] == [True, True]


def test_kamal_demo_never_deletes_a_users_files(tmp_path, capsys):
    """A folder of the user's own gets the workspace in a sub-folder; --force sets the old build aside."""
    from kamal_engine import demo
    from kamal_engine.cli import main

    mine = tmp_path / "p"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "mine.txt").write_text("x")
    assert main(["demo", str(mine), "--quick"]) == 0
    assert (mine / "data" / "mine.txt").read_text() == "x" and sorted(p.name for p in mine.iterdir()) == [
        "data", "kamal-demo"]
    workspace = mine / "kamal-demo"
    assert demo.is_complete(workspace) and not (workspace / demo.BUILDING).exists()
    assert "holds files the demo builder did not write" in capsys.readouterr().err
    (workspace / "recipes" / "my-own.toml").write_text("# mine\n")
    assert main(["demo", str(workspace), "--quick", "--force"]) == 0
    previous = [p for p in workspace.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1 and (previous[0] / "recipes" / "my-own.toml").read_text() == "# mine\n"
    assert demo.is_complete(workspace) and (previous[0] / demo.MANIFEST).is_file()
