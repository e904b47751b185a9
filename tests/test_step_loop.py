"""The step loop without a run: values left on the device reach the host once per ``sync_every`` steps
(a GPU is not waited for at every step), with the same rows, events and means as a step-by-step loop."""

from __future__ import annotations

import pytest
import torch

from kamal_engine import training
from kamal_engine.errors import DivergedError
from kamal_engine.events import CancelToken, StepLosses
from kamal_engine.methods.common import loss_dict
from kamal_engine.selection import TaskSelection
from kamal_engine.training import MetricsLog, StepLoop


def _loop(tmp_path, name, sync_every, events):
    metrics = MetricsLog(tmp_path / f"{name}.csv")
    loop = StepLoop(events.append, CancelToken(), metrics, total_steps=10, start_step=0,
                    teacher_of=lambda key: ("", ""), sync_every=sync_every)
    return loop, metrics


def _step(nan_at=None):
    calls = []

    def step(idx):
        calls.append(len(idx))
        value = torch.tensor(float(len(calls)) if len(calls) != nan_at else float("nan"))
        return {"loss": value * 2, "part": value, "python": 0.5}  # tensors and a float side by side
    return step


def test_values_on_the_device_come_back_once_per_sync_every_steps_with_the_same_rows_and_events(tmp_path, monkeypatch):
    transfers = []
    real = training.host_values
    monkeypatch.setattr(training, "host_values", lambda steps: transfers.append(len(steps)) or real(steps))
    batches = [torch.arange(4)] * 10
    results = {}
    for sync_every in (1, 4):
        events = []
        loop, metrics = _loop(tmp_path, f"s{sync_every}", sync_every, events)
        means = loop.run_epoch(iter(batches), _step(), "amalgamate", 1, 1)
        metrics.file.close()
        results[sync_every] = (means, [(e.step, e.losses) for e in events if isinstance(e, StepLosses)],
                               [(r["step"], r["name"], r["value"]) for r in MetricsLog.read(tmp_path / f"s{sync_every}.csv")],
                               loop.state.step, loop.state.images_seen)
    assert transfers[:10] == [1] * 10 and transfers[10:] == [4, 4, 2]  # 10 steps, 3 transfers
    assert results[1] == results[4]
    means, events, rows, step, seen = results[4]
    assert step == 10 and seen == 40 and len(rows) == 30
    assert means == pytest.approx({"loss": 11.0, "part": 5.5, "python": 0.5})
    assert events[5] == (6, {"loss": 12.0, "part": 6.0, "python": 0.5})
    assert all(isinstance(v, float) for _, losses in events for v in losses.values())


def test_a_nan_found_at_a_later_sync_names_the_step_it_came_from(tmp_path):
    events = []
    loop, metrics = _loop(tmp_path, "nan", 4, events)
    with pytest.raises(DivergedError, match=r"stage 'amalgamate', block 2, step 6: 'loss' is nan"):
        loop.run_epoch(iter([torch.arange(2)] * 10), _step(nan_at=6), "amalgamate", 2, 1)
    assert [e.step for e in events if isinstance(e, StepLosses)] == [1, 2, 3, 4, 5]  # the good steps reported


def test_the_logged_values_of_a_soft_target_loss_stay_tensors_until_the_loop_reads_them(quick_demo):
    from kamal_engine.recipe import load_recipe

    root, _ = quick_demo
    recipe = load_recipe(root / "recipes" / "filtered-ka.toml")
    teachers = [entry.load() for entry in recipe.teachers]
    selection = TaskSelection.build(teachers, [entry.select for entry in recipe.teachers])
    per_task = torch.arange(len(selection.tasks), dtype=torch.float32)
    logged = loss_dict(per_task.mean(), per_task, selection)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logged.values())
    host = training.host_values([logged])[0]
    for n, teacher in enumerate(selection.teachers):
        mine = [i for i, t in enumerate(selection.tasks) if t.teacher == n]
        assert host[f"teacher:{teacher.name}"] == pytest.approx(sum(mine) / len(mine))
    assert host["loss"] == pytest.approx(float(per_task.mean()))


def test_to_device_goes_through_pinned_memory_without_waiting_on_a_gpu(monkeypatch):
    batch = torch.arange(6, dtype=torch.uint8)
    assert training.to_device(batch, torch.device("cpu")) is batch  # the CPU: the tensor itself
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((str(a[0]), k)) or self)
    training.to_device(batch, torch.device("cuda", 0))
    assert calls == ["pin", ("cuda:0", {"non_blocking": True})]


def test_a_run_reporting_every_fifth_step_writes_the_same_metrics_and_student(quick_demo, recipe_factory, tmp_path,
                                                                             monkeypatch):
    """What a GPU run does (values brought back 16 steps at a time), through a real method on the CPU."""
    from kamal_engine.methods.common import RunContext
    from kamal_engine.recipe import load_recipe
    from kamal_engine.runner import run_recipe

    root, _ = quick_demo
    real, transfers = RunContext.loop, []
    real_host_values = training.host_values
    monkeypatch.setattr(training, "host_values", lambda steps: transfers.append(len(steps)) or real_host_values(steps))
    results, calls = {}, {}
    for sync_every in (1, 5):
        transfers.clear()
        def loop(self, total_steps, sync_every=sync_every):
            made = real(self, total_steps)
            made.sync_every = sync_every
            return made

        monkeypatch.setattr(RunContext, "loop", loop)
        out = tmp_path / f"sync{sync_every}"
        path = recipe_factory(root / "recipes" / "filtered-ka.toml", run={"output_dir": out, "device": "cpu"},
                              method={"epochs_per_block": 1, "finetune_epochs": 1, "batch_size": 32},
                              export={"onnx": None})
        result = run_recipe(load_recipe(path))
        rows = [(r["step"], r["stage"], r["block"], r["name"], r["value"]) for r in MetricsLog.read(out / "metrics.csv")]
        results[sync_every] = (rows, result.report["branch_points"], result.report["validation"]["student"]["mean_ap"])
        calls[sync_every] = list(transfers)
    assert results[1][0] and results[1] == results[5]
    assert set(calls[1]) == {1} and max(calls[5]) == 5 and len(calls[5]) < len(calls[1]) / 3
    assert sum(calls[1]) == sum(calls[5])  # every step reported, fewer transfers
