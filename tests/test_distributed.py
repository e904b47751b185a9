"""Distributed data parallel (kamal_engine.distributed): the split of the data, DDP around the trainable
parts only, and two-process gloo runs of ``kamal run --nproc 2`` on the quick demo, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from kamal_engine import distributed
from kamal_engine.devices import device_choices, parse_device_choice
from kamal_engine.distributed import World
from kamal_engine.recipe import RecipeError
from kamal_engine.recipe import load_recipe
from kamal_engine.runner import run_recipe
from kamal_engine.runfolder import inspect_run_folder

TINY = {"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32}
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def test_every_epoch_is_split_among_the_ranks_with_the_same_number_of_steps():
    n, batch = 50, 16
    ranks = [World(rank, 3, rank, "gloo") for rank in range(3)]
    epochs = [list(w.batches(n, batch, torch.Generator().manual_seed(7))) for w in ranks]
    steps = {len(e) for e in epochs}
    assert steps == {ranks[0].steps_per_epoch(n, batch)}  # every rank steps alike (the collectives pair up)
    assert all(len(idx) <= 6 for e in epochs for idx in e)  # ceil(16 / 3) images per rank and step
    seen = torch.cat([idx for e in epochs for idx in e])
    assert set(seen.tolist()) == set(range(n))  # the ranks together cover every image ...
    assert len(seen) == 3 * 17  # ... each rank 17 (DistributedSampler pads 50 to 51)
    again = [list(w.batches(n, batch, torch.Generator().manual_seed(7))) for w in ranks]
    assert all(torch.equal(a, b) for e, f in zip(epochs, again) for a, b in zip(e, f))  # seeded by the phase
    other = list(ranks[0].batches(n, batch, torch.Generator().manual_seed(8)))
    assert not torch.equal(torch.cat(other), torch.cat(epochs[0]))  # another epoch, another order
    shares = [World(rank, 3, rank, "gloo").share(50) for rank in range(3)]
    assert [i for s in shares for i in s] == list(range(50))


def test_one_process_is_not_distributed_and_keeps_its_own_order():
    world = World()
    assert not world.distributed and world.main
    loss = lambda idx: (torch.tensor(1.0), {})  # noqa: E731
    assert world.objective([torch.nn.Linear(2, 2)], loss) is loss
    assert world.average({"loss": 2.0}) == {"loss": 2.0}


DAFL = {"id": "dafl", "epochs": 2, "iterations": 3, "batch_size": 8, "preview_every": 0}
DUAL_GAN = {"generator_epochs": 1, "epochs_per_block": 1, "finetune_epochs": 1, "iterations": 3, "batch_size": 8,
            "eval_batches": 1, "preview_every": 0, "adversarial": 0.5, "adversarial_warmup": 0}


@pytest.mark.parametrize("recipe,method", [("filtered-ka", {**TINY}), ("filtered-ka", {"id": "kd", "epochs": 2, "batch_size": 32}),
                                           ("dual-gan", DAFL), ("dual-gan", DUAL_GAN)],
                         ids=["filtered-ka", "kd", "dafl", "dual-gan"])
def test_a_gloo_group_wraps_the_trainable_parts_in_ddp_and_never_a_teacher(quick_demo, recipe_factory, tmp_path,
                                                                           monkeypatch, recipe, method):
    """A one-rank gloo group takes every distributed code path in this process."""
    from kamal_engine.recipe import TeacherEntry

    root, _ = quick_demo
    wrapped, teachers = [], []
    loader = TeacherEntry.load

    def load(self, *args, **kwargs):
        teachers.append(loader(self, *args, **kwargs))
        return teachers[-1]

    class Spy(distributed.DistributedDataParallel):
        def __init__(self, module, *args, **kwargs):
            wrapped.append((module, all(p.requires_grad for p in module.parameters())))
            super().__init__(module, *args, **kwargs)

    monkeypatch.setattr(distributed, "DistributedDataParallel", Spy)
    monkeypatch.setattr(TeacherEntry, "load", load)
    out = tmp_path / "run"
    path = recipe_factory(root / "recipes" / f"{recipe}.toml", method=method, export={"onnx": None},
                          run={"output_dir": out, "device": "cpu"})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{distributed.free_port()}", rank=0, world_size=1)
    try:
        assert distributed.current().distributed
        result = run_recipe(load_recipe(path))
    finally:
        distributed.leave()
    # one DDP module per phase: filtered-ka's rounds of each block and its fine-tuning; kd's one training phase;
    # dafl's generator and student, each once
    # dual-gan's generator (Step I, and the adversarial steps) and each block's phase and the fine-tuning
    if recipe == "dual-gan" and "id" not in method:
        phases = 2 + len(result.report["blocks"]) + 1
    else:
        phases = {"kd": 1, "dafl": 2}.get(method.get("id"), None) or sum(
            b["rounds"] for b in result.report["diagnosis"]["blocks"]) + 1
    assert len(wrapped) == phases
    teacher_tensors = {id(t) for teacher in teachers for t in [*teacher.model.parameters(), *teacher.model.buffers()]}
    assert len(teachers) == 2 and teacher_tensors
    for module, trainable in wrapped:
        assert isinstance(module, distributed.Objective)
        assert trainable  # the phase's trainable parts only
        assert not {id(t) for t in [*module.parameters(), *module.buffers()]} & teacher_tensors
    assert (out / "report.json").is_file() and result.report["validation"]["student"]["mean_ap"] is not None


def kamal_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kamal_engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def student_map(out) -> float:
    return json.loads((out / "report.json").read_text())["validation"]["student"]["mean_ap"]


@POSIX
def test_two_processes_killed_and_resumed_write_one_report_and_one_student_as_good_as_one_process(
        quick_demo, quick_student, recipe_factory, tmp_path):
    """``kamal run --nproc 2`` (gloo): kill -9 after block 1, no process left behind, ``--resume`` finishes; one
    report, one student, the files of a one-process run and its mAP within 1 point (the same recipe)."""
    root, _ = quick_demo
    one_out, _ = quick_student  # the same recipe on one process
    out = tmp_path / "two"
    path = recipe_factory(root / "recipes" / "filtered-ka.toml", method=TINY, run={"output_dir": out, "device": "cpu"},
                          export={"onnx": out / "student.onnx"})
    proc = kamal_process("run", str(path), "--nproc", "2")
    lines, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline and not any("converged loss at b1" in line for line in lines):
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
    assert any("converged loss at b1" in line for line in lines), "".join(lines[-20:])
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-f", f"kamal_engine.rank_worker {proc.pid}"], capture_output=True, text=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert workers.stdout.split(), "rank 1 was not running"
    for _ in range(100):  # rank 1 follows rank 0 (it gets SIGKILL when its parent dies)
        if not subprocess.run(["pgrep", "-f", f"kamal_engine.rank_worker {proc.pid}"], capture_output=True).stdout:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("rank 1 outlived rank 0")
    assert inspect_run_folder(out).state == "unfinished"
    done = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]["blocks_done"]
    assert 1 <= done < 4

    again = kamal_process("run", str(path), "--nproc", "2", "--resume")
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert "resuming from" in stderr
    assert all(f"Block {k}/4 " not in stderr for k in range(1, done + 1))  # the finished blocks are kept ...
    assert f"Block {done + 1}/4 " in stderr  # ... and the killed one is trained again
    assert stdout.count("Branch points:") == 1 and stdout.count("Outputs in") == 1  # rank 0 alone reports
    assert sorted(os.listdir(out)) == sorted(os.listdir(one_out))  # the files of a one-process run, no more
    assert list((out / "checkpoints").iterdir()) == [out / "checkpoints" / "last.pt"]
    report = json.loads((out / "report.json").read_text())
    assert report["params"]["batch_size"] == 32 and inspect_run_folder(out).state == "finished"
    assert abs(student_map(out) - student_map(one_out)) < 0.01  # within 1 point of the one-process run
    rows = (out / "metrics.csv").read_text().splitlines()
    losses = [int(r.split(",")[0]) for r in rows[1:] if ",loss," in r]
    assert losses == list(range(1, len(losses) + 1))  # one writer: one row per step and value


@POSIX
@pytest.mark.slow
@pytest.mark.parametrize("method", [DAFL, DUAL_GAN], ids=["dafl", "dual-gan"])
def test_two_processes_train_a_data_free_generator_each_rank_generating_its_own_share(quick_demo, recipe_factory,
                                                                                      tmp_path, method):
    """The data-free methods with ``--nproc 2``: every step's batch is generated half on each rank (the coverage
    counts the images of both), the generator and the student are reduced, rank 0 alone writes."""
    root, _ = quick_demo
    out = tmp_path / "two"
    path = recipe_factory(root / "recipes" / "dual-gan.toml", method=method, run={"output_dir": out, "device": "cpu"},
                          export={"onnx": None})
    proc = kamal_process("run", str(path), "--nproc", "2")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("Outputs in") == 1
    report = json.loads((out / "report.json").read_text())
    generated = report["coverage"]["generated"]
    epochs = method.get("epochs", method.get("generator_epochs"))
    assert [g["images"] for g in generated] == [3 * 8] * epochs  # 2 ranks x 4 images x 3 steps per epoch
    assert all(0.0 <= r <= 1.0 for g in generated for r in g["rates"].values())
    rows = (out / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[0]) for r in rows[1:] if ",loss," in r]
    assert steps == list(range(1, len(steps) + 1)) and steps  # one writer: one row per step
    assert report["validation"]["student"]["mean_ap"] is not None


def test_the_recipe_keeps_nproc_and_refuses_a_bad_one(quick_demo, recipe_factory, tmp_path):
    root, _ = quick_demo
    path = recipe_factory(root / "recipes" / "filtered-ka.toml", run={"output_dir": tmp_path / "r", "nproc": 2})
    recipe = load_recipe(path)
    assert recipe.nproc == 2 and "nproc = 2" in recipe.to_toml()
    bad = recipe_factory(root / "recipes" / "filtered-ka.toml", run={"output_dir": tmp_path / "r", "nproc": 0})
    with pytest.raises(RecipeError, match=r"\[run\]\.nproc: .*1 or more"):
        load_recipe(bad)


def test_the_device_choices_offer_all_gpus_only_with_several():
    assert not any("*" in key for key, _ in device_choices(gpus=1))
    key, text = device_choices(gpus=4)[-1]
    assert parse_device_choice(key) == ("cuda", 4) and text.startswith("all 4 GPUs")
    assert parse_device_choice("cuda:1") == ("cuda:1", 1)
