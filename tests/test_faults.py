"""The fault suite: kill -9, a kill inside a checkpoint write, two runs on one folder, a NaN loss, a
full disk, NaN weights and damaged images, on the quick demo. Each test is a user's accident, and
asserts what is kept and what the user is told."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kamal_engine.errors import CheckpointError, DataError, DiskFullError, DivergedError, KamalError
from kamal_engine.events import Failed, RunStarted, RunWarning, StepLosses
from kamal_engine.recipe import load_recipe
from kamal_engine.runfolder import LOCK, RunLock, inspect_run_folder, lock_holder
from kamal_engine.runner import fitting_batch_size, run_recipe

TINY = {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def recipe_file(recipe_factory, root: Path, out: Path, params: dict = TINY, unlabeled: Path | None = None) -> Path:
    """The quick demo's filtered-ka recipe, tiny, writing to ``out`` (no ONNX export); written under ``tmp_path``."""
    path = recipe_factory(root / "recipes" / "filtered-ka.toml", method=params, run={"output_dir": out},
                          data={} if unlabeled is None else {"unlabeled": unlabeled}, export={"onnx": None})
    assert load_recipe(path).output_dir == out
    return path


def kamal(*args: str, code: str | None = None) -> subprocess.Popen:
    """``kamal ARGS`` in a new process (stderr piped); ``code`` runs first (a fault to inject)."""
    prelude = code or ""
    script = f"import sys\n{prelude}\nfrom kamal_engine.cli import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(proc: subprocess.Popen, predicate, timeout: float = 120) -> list[str]:
    """Read the process's stderr lines until ``predicate(lines)`` holds; the lines read."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line.rstrip())
        if predicate(lines):
            return lines
    proc.kill()
    raise AssertionError("the run never got there:\n" + "\n".join(lines[-30:]))


def checkpoint_step(out: Path) -> int:
    data = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return data["state"]["step"]


@POSIX
def test_kill_9_mid_block_then_resume_finishes_and_loses_at_most_that_block(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    out = tmp_path / "killed"
    params = {"epochs_per_block": 2, "finetune_epochs": 1, "batch_size": 32}
    proc = kamal("run", str(recipe_file(recipe_factory, root, out, params)))
    wait_for(proc, lambda lines: "converged loss at b1" in lines[-1])
    deadline = time.monotonic() + 60
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into block 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    saved = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]
    kept, done = saved["step"], saved["blocks_done"]
    assert done < 4  # killed while amalgamating a block
    assert (out / LOCK).exists() and lock_holder(out) is None  # the lock file stays, the lock does not
    assert inspect_run_folder(out).state == "unfinished"

    events = []
    result = run_recipe(load_recipe(recipe_file(recipe_factory, root, out, params)), resume=True, emit=events.append)
    started = next(e for e in events if isinstance(e, RunStarted))
    assert started.resumed_from
    warnings = [e.message for e in events if isinstance(e, RunWarning)]
    assert any(f"process {proc.pid}" in w and "no longer running" in w for w in warnings), warnings
    steps = [e for e in events if isinstance(e, StepLosses)]
    assert steps[0].step == kept + 1  # nothing before the checkpoint is trained again ...
    assert min(e.block or 99 for e in steps) == done + 1  # ... and the killed block is the only one redone
    assert result.report["branch_points"] and (out / "student.kamal.pt").is_file()
    assert not (out / LOCK).exists()  # a finished run leaves no lock file
    assert inspect_run_folder(out).state == "finished"


@POSIX
def test_kill_9_inside_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    out = tmp_path / "torn"
    fault = textwrap.dedent("""
        import os, signal, torch
        real_save, calls = torch.save, []
        def save(obj, f, *a, **k):  # the second checkpoint: half of it written, then the process dies
            if str(f).endswith(".part") and "checkpoints" in str(f):
                calls.append(f)
                if len(calls) == 2:
                    real_save(obj, f, *a, **k)
                    size = os.path.getsize(f)
                    with open(f, "r+b") as h:
                        h.truncate(size // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        torch.save = save
    """)
    proc = kamal("run", str(recipe_file(recipe_factory, root, out)), code=fault)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert list((out / "checkpoints").glob(".*.part"))  # the torn temporary file is there ...
    step = checkpoint_step(out)  # ... and last.pt is the first, complete checkpoint
    assert step > 0
    events = []
    run_recipe(load_recipe(recipe_file(recipe_factory, root, out)), resume=True, emit=events.append)
    assert next(e for e in events if isinstance(e, StepLosses)).step == step + 1
    assert not list((out / "checkpoints").glob(".*.part"))  # the resumed run removed it


@POSIX
def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_process(quick_demo, recipe_factory, tmp_path,
                                                                       qtbot):
    root, _ = quick_demo
    out = tmp_path / "busy"
    recipe = recipe_file(recipe_factory, root, out, {"epochs_per_block": 6, "finetune_epochs": 6, "batch_size": 32})
    first = kamal("run", str(recipe))
    wait_for(first, lambda lines: "converged loss at b1" in lines[-1])  # the lock is held from the start
    holder = lock_holder(out)
    assert holder and holder["pid"] == first.pid and "run" in holder["command"]
    second = kamal("run", str(recipe), "--replace")  # the command line: exit code 2 and the sentence
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert f"is in use by another run: process {first.pid}" in err and "choose another output folder" in err
    for flags in ({}, {"resume": True}, {"restart": True}):  # every way in is refused alike
        with pytest.raises(KamalError, match=f"is in use by another run: process {first.pid}"):
            run_recipe(load_recipe(recipe), **flags)
    assert first.poll() is None  # still running, untouched
    # the app refuses before it asks anything
    from PySide6.QtCore import QSettings

    from kamal_app.main_window import MainWindow

    window = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(window, before_close_func=lambda w: w.setWindowModified(False))
    shown = []
    from kamal_app import main_window

    original = main_window.QMessageBox.warning
    main_window.QMessageBox.warning = lambda parent, title, text: shown.append(text)
    try:
        assert window.open_recipe(recipe)
        window.start_run()
    finally:
        main_window.QMessageBox.warning = original
    assert shown and f"process {first.pid}" in shown[0] and not window.train_page.is_running()
    first.send_signal(signal.SIGINT)  # Ctrl-C: stops after the step, keeps its blocks
    first.communicate(timeout=120)
    assert first.returncode == 130
    assert lock_holder(out) is None and not (out / LOCK).exists()


def test_a_lock_is_exclusive_within_one_process_too_and_released_on_exit(tmp_path):
    out = tmp_path / "locked"
    lock = RunLock.acquire(out, command="kamal run a.toml")
    assert lock_holder(out)["command"] == "kamal run a.toml"
    with pytest.raises(KamalError, match="in use by another run: process"):
        RunLock.acquire(out)  # flock locks are per open file: a second open in the same process is refused
    lock.release()
    assert lock_holder(out) is None and not out.exists()  # the folder it created, empty, is gone too
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / LOCK).write_text(json.dumps({"pid": 999999, "command": "kamal run old.toml"}))
    with RunLock.acquire(tmp_path / "stale") as taken:
        assert taken.stale["pid"] == 999999


def _inject_nan_at(monkeypatch, at_step: int):
    from kamal_engine import training

    real = training.StepLoop.run_epoch

    def run_epoch(self, batches, step_fn, stage, block, epoch):
        def step(idx):
            losses = step_fn(idx)
            return {k: float("nan") for k in losses} if self.state.step + 1 == at_step else losses
        return real(self, batches, step, stage, block, epoch)

    monkeypatch.setattr(training.StepLoop, "run_epoch", run_epoch)


def test_a_nan_loss_stops_the_run_at_once_naming_stage_block_step_and_keeps_the_checkpoint(quick_demo, recipe_factory,
                                                                                            tmp_path, monkeypatch,
                                                                                            capsys):
    root, _ = quick_demo
    out = tmp_path / "nan"
    recipe = recipe_file(recipe_factory, root, out)
    first = run_recipe(load_recipe(recipe_file(recipe_factory, root, tmp_path / "probe")), emit=lambda e: None)
    per_block = [int(r["step"]) for r in __import__("csv").DictReader(open(tmp_path / "probe" / "metrics.csv"))
                 if r["block"] == "1"]
    at = max(per_block) + 2  # the second step of block 2
    assert first.report
    _inject_nan_at(monkeypatch, at)
    events = []
    with pytest.raises(DivergedError) as caught:
        run_recipe(load_recipe(recipe), emit=events.append)
    text = str(caught.value)
    assert f"stage 'amalgamate', block 2, step {at}" in text and "is nan" in text
    assert f"last good checkpoint (step {max(per_block)})" in text and "lower [method] lr" in text
    assert checkpoint_step(out) == max(per_block)  # block 1's checkpoint, untouched
    assert any(isinstance(e, Failed) and "diverged" in e.message for e in events)
    from kamal_engine.cli import main

    assert main(["run", str(recipe), "--restart"]) == 2  # the CLI: one sentence, exit code 2
    err = capsys.readouterr().err
    assert "diverged in stage 'amalgamate', block 2" in err and "Traceback" not in err


def test_weights_that_turned_nan_are_never_checkpointed(tmp_path):
    from kamal_engine.runner import Checkpointer

    saver = Checkpointer(tmp_path / "checkpoints" / "last.pt", "filtered-ka")
    saver.save({"step": 3, "student": {"w": torch.ones(2)}})
    with pytest.raises(DivergedError, match=r"student\.w\) are not finite"):
        saver.save({"step": 9, "student": {"w": torch.tensor([1.0, float("inf")])}})
    assert checkpoint_step(tmp_path) == 3


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays_intact(quick_demo, recipe_factory, tmp_path,
                                                                               monkeypatch):
    root, _ = quick_demo
    out = tmp_path / "full"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(".part") and "checkpoints" in str(f):
            calls.append(f)
            if len(calls) == 2:  # the second checkpoint: some bytes written, then the disk is full
                Path(f).write_bytes(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError) as caught:
        run_recipe(load_recipe(recipe_file(recipe_factory, root, out)))
    assert "the disk is full" in str(caught.value) and "--resume" in str(caught.value)
    assert checkpoint_step(out) > 0  # the first checkpoint, complete
    assert not list((out / "checkpoints").glob(".*.part"))  # nothing half-written left
    monkeypatch.setattr(torch, "save", real_save)
    result = run_recipe(load_recipe(recipe_file(recipe_factory, root, out)), resume=True)
    assert result.report["branch_points"]


def test_fitting_batch_size_follows_the_memory_that_was_free():
    gib = 2**30
    assert fitting_batch_size(256, peak=20 * gib, request=4 * gib, free=1 * gib) == 201  # 256 x 0.9 x 21/24
    assert fitting_batch_size(64, peak=gib, request=64 * gib, free=0) == 1
    assert fitting_batch_size(1, peak=gib, request=gib, free=0) == 1
    assert fitting_batch_size(8, peak=gib, request=1, free=100 * gib) == 4  # not short of memory (fragmented): half


def test_a_teacher_with_nan_weights_is_refused_naming_the_tensor(quick_demo, tmp_path, capsys):
    root, manifest = quick_demo
    source = root / "teachers" / "digits_0to4.kamal.pt"
    data = torch.load(source, map_location="cpu", weights_only=True)
    key = next(k for k, v in data["state_dict"].items() if v.is_floating_point())
    data["state_dict"][key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan-teacher.kamal.pt"
    torch.save(data, bad)
    from kamal_engine.cli import main
    from kamal_engine.teacher import load_teacher

    with pytest.raises(CheckpointError, match=f"tensor '{key}' has 1 NaN and 0 Inf values"):
        load_teacher(bad)
    assert main(["eval", str(bad), "--data", str(root / "data" / "validation" / "labels.csv")]) == 2
    assert "not finite numbers" in capsys.readouterr().err


def _copy_images(root: Path, dest: Path) -> list[Path]:
    shutil.copytree(root / "data" / "unlabeled", dest)
    return sorted(p for p in dest.rglob("*.png"))


def test_a_damaged_image_is_skipped_with_a_warning_and_counted_and_many_stop_the_run(quick_demo, tmp_path):
    from kamal_engine.training import UnlabeledImages

    root, _ = quick_demo
    images = _copy_images(root, tmp_path / "images")
    images[3].write_bytes(images[3].read_bytes()[:40])  # a truncated PNG
    loaded = UnlabeledImages.from_folder(tmp_path / "images", (28, 28), max_damaged=0.01)
    assert len(loaded) == len(images) - 1 and [p for p, _ in loaded.damaged] == [images[3]]
    assert images[3] not in loaded.paths
    for p in images[:len(images) // 50 + 2]:
        p.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"more than the 1\.0% a run skips \(\[data\] max_damaged\)"):
        UnlabeledImages.from_folder(tmp_path / "images", (28, 28), max_damaged=0.01)
    assert len(UnlabeledImages.from_folder(tmp_path / "images", (28, 28), max_damaged=0.5).damaged) > 1


def test_a_run_reports_its_damaged_images(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    images = _copy_images(root, tmp_path / "images")
    images[0].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    events = []
    recipe = recipe_file(recipe_factory, root, tmp_path / "damaged", unlabeled=tmp_path / "images")
    result = run_recipe(load_recipe(recipe), emit=events.append)
    assert result.report["data"]["damaged"] == 1 and result.report["data"]["images"] == len(images) - 1
    assert result.report["data"]["damaged_files"][0]["path"] == str(images[0])
    assert any(isinstance(e, RunWarning) and str(images[0]) in e.message and "skipped" in e.message for e in events)
