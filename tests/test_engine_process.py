"""The app's training process (kamal_app.engine_process): errors, cancel, a killed child, a lost app."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kamal_engine.errors import DataError, KamalError
from kamal_engine.events import RunCancelled, StepLosses
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import has_unfinished_run


def tiny_recipe(root: Path, out: Path):
    recipe = load_recipe(root / "recipes" / "filtered-ka.toml")
    recipe.output_dir = out
    recipe.device = "cpu"
    recipe.onnx = None
    recipe.params = {**recipe.params, "epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}
    return recipe


def blocks_kept(out: Path) -> int:
    """The blocks the run folder's checkpoint holds."""
    import torch

    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]["blocks_done"]


def test_errors_keep_their_type_sentence_and_file_across_processes():
    error = pickle.loads(pickle.dumps(DataError("is not a folder of images", "/data/unlabeled")))
    assert type(error) is DataError and error.path == Path("/data/unlabeled")
    assert str(error) == "/data/unlabeled: is not a folder of images"


def test_a_bad_input_error_in_the_child_is_raised_here_naming_the_file(quick_demo, tmp_path):
    from kamal_app.engine_process import run_in_child_process

    root, _ = quick_demo
    recipe = tiny_recipe(root, tmp_path / "run")
    recipe.unlabeled = tmp_path / "gone"  # removed after the recipe was checked
    events = []
    with pytest.raises(KamalError) as caught:
        run_in_child_process(recipe, False, events.append, threading.Event())
    assert str(tmp_path / "gone") in str(caught.value)
    assert any(type(e).__name__ == "Failed" for e in events)  # the child's events arrived first


def test_cancel_stops_the_child_quickly_and_keeps_its_blocks(quick_demo, tmp_path):
    from kamal_app.engine_process import run_in_child_process

    root, _ = quick_demo
    abort = threading.Event()
    cancelled_at = []

    def emit(event):
        if type(event).__name__ == "BlockConverged" and not abort.is_set():
            cancelled_at.append(time.monotonic())
            abort.set()

    with pytest.raises(RunCancelled):
        run_in_child_process(tiny_recipe(root, tmp_path / "run"), False, emit, abort)
    assert time.monotonic() - cancelled_at[0] < 1.0  # the child stopped and exited
    assert has_unfinished_run(tmp_path / "run") and blocks_kept(tmp_path / "run") >= 1


def test_a_killed_child_becomes_an_error_that_says_resume_continues(quick_demo, tmp_path):
    import multiprocessing

    from kamal_app.engine_process import EngineProcessDied, run_in_child_process

    root, _ = quick_demo

    def emit(event):
        if isinstance(event, StepLosses):
            for child in multiprocessing.active_children():
                if child.name == "kamal-engine":
                    os.kill(child.pid, signal.SIGKILL)

    with pytest.raises(EngineProcessDied, match="Resume continues"):
        run_in_child_process(tiny_recipe(root, tmp_path / "run"), False, emit, threading.Event())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_child_stops_on_its_own_keeping_its_blocks_when_the_app_is_killed(quick_demo, tmp_path):
    root, _ = quick_demo
    out = tmp_path / "run"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""
        import multiprocessing, sys, threading
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})

        def emit(event):
            if type(event).__name__ == "BlockConverged":
                print("child", [c.pid for c in multiprocessing.active_children()][0], flush=True)

        if __name__ == "__main__":
            from test_engine_process import tiny_recipe
            from kamal_app.engine_process import run_in_child_process
            run_in_child_process(tiny_recipe(Path({str(root)!r}), Path({str(out)!r})), False, emit, threading.Event())
    """))
    proc = subprocess.Popen([sys.executable, str(app)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # after the first block has converged
        assert line.startswith("child"), line
        child = int(line.split()[1])
    finally:
        proc.kill()  # the app dies without a word
        proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the training process kept running after the app died"
    assert has_unfinished_run(out) and blocks_kept(out) >= 1  # its finished blocks are kept: Resume continues


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
