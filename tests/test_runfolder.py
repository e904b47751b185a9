"""A run folder is the run's own: a finished run is moved aside (never deleted) only when asked, and a
folder with files no run wrote is refused, by the CLI and the engine alike."""

import json
import time

import pytest
import torch

from kamal_engine.cli import main as kamal
from kamal_engine.errors import KamalError
from kamal_engine.runfolder import (MANIFEST, aside_path, check_run_folder, claim_run_folder, free_sibling,
                                    inspect_run_folder)


def fake_run(folder, finished=True):
    """A folder as a run leaves it: manifest, checkpoint, report when finished."""
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"format": "kamal-run-checkpoint", "method": "kd", "finished": finished, "state": {}},
               folder / "checkpoints" / "last.pt")
    (folder / MANIFEST).write_text(json.dumps({"format": "kamal-run"}))
    (folder / "metrics.csv").write_text("step\n")
    if finished:
        (folder / "report.json").write_text("{}")
        (folder / "student.kamal.pt").write_bytes(b"x")
    return folder


def test_states(tmp_path):
    assert inspect_run_folder(tmp_path / "missing").state == "new"
    (tmp_path / "empty").mkdir()
    assert inspect_run_folder(tmp_path / "empty").state == "new"
    assert inspect_run_folder(fake_run(tmp_path / "done")).state == "finished"
    info = inspect_run_folder(fake_run(tmp_path / "half", finished=False))
    assert info.state == "unfinished" and info.resumable
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, mine / "checkpoints" / "epoch10.pt")  # a user's own checkpoint
    (mine / "notes.txt").write_text("mine")
    info = inspect_run_folder(mine)
    assert info.state == "foreign" and info.foreign == ["checkpoints", "notes.txt"]
    (mine / "checkpoints" / "last.pt").write_bytes(b"not a run's checkpoint")
    assert inspect_run_folder(mine).state == "foreign"


def test_a_finished_run_is_refused_unless_replaced_then_moved_aside_whole(tmp_path):
    run = fake_run(tmp_path / "run")
    with pytest.raises(KamalError, match="finished run.*--replace"):
        check_run_folder(run)
    with pytest.raises(KamalError, match="finished run"):
        check_run_folder(run, restart=True)  # --restart is for unfinished runs
    moved = claim_run_folder(run, replace=True)
    assert moved.name.startswith("run.previous-") and (moved / "report.json").read_text() == "{}"
    assert not run.exists()
    stamp = time.mktime(time.strptime(moved.name.removeprefix("run.previous-"), "%Y%m%d-%H%M%S"))
    assert aside_path(run, stamp) == moved.with_name(f"{moved.name}-2")  # a name taken is never reused


def test_an_unfinished_run_needs_restart_and_a_foreign_folder_is_always_refused(tmp_path):
    half = fake_run(tmp_path / "half", finished=False)
    with pytest.raises(KamalError, match="--resume.*--restart"):
        check_run_folder(half)
    assert claim_run_folder(half, restart=True).is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    for kwargs in ({}, {"restart": True}, {"replace": True}):
        with pytest.raises(KamalError, match="files that no run wrote \\(data.csv\\)"):
            claim_run_folder(mine, **kwargs)
    assert (mine / "data.csv").read_text() == "1,2\n"
    assert free_sibling(mine) == tmp_path / "mine-2"


def _recipe(recipe_factory, quick_demo, out):
    """The quick demo's filtered-ka recipe, as short as it gets, into ``out`` (no ONNX export)."""
    root, _ = quick_demo
    return recipe_factory(root / "recipes" / "filtered-ka.toml", run={"output_dir": out}, export={"onnx": None},
                          method={"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 64,
                                  "max_rounds_per_block": 1})


def test_kamal_run_refuses_a_finished_run_and_replace_moves_it_aside(quick_demo, recipe_factory, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _recipe(recipe_factory, quick_demo, out)
    assert kamal(["run", str(recipe)]) == 0
    first = (out / "report.json").read_text()
    capsys.readouterr()
    assert kamal(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--replace" in err and str(out) in err
    assert (out / "report.json").read_text() == first and (out / "checkpoints" / "last.pt").is_file()
    assert kamal(["run", str(recipe), "--replace"]) == 0
    printed = capsys.readouterr()
    assert "earlier run there was moved to" in printed.out + printed.err
    previous = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(previous) == 1 and (previous[0] / "report.json").read_text() == first
    assert (previous[0] / "checkpoints" / "last.pt").is_file()  # nothing of the old run deleted
    assert (out / MANIFEST).is_file() and (out / "report.json").is_file()


def test_kamal_run_never_touches_a_users_own_checkpoints(quick_demo, recipe_factory, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "epoch10.pt").write_bytes(b"my weights")
    recipe = _recipe(recipe_factory, quick_demo, out)
    for extra in ([], ["--restart"], ["--replace"]):
        assert kamal(["run", str(recipe), *extra]) == 2
        assert "files that no run wrote" in capsys.readouterr().err
    assert (out / "checkpoints" / "epoch10.pt").read_bytes() == b"my weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mine", recipe.parent.name])  # nothing moved aside
