import json
import subprocess
import sys

import pytest
import torch
import torchvision

from kamal_engine.cli import main


@pytest.fixture
def resnet18_checkpoint(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "labels.txt").write_text("\n".join(f"digit{i}" for i in range(10)))
    return tmp_path / "r18.pth"


def test_inspect_resnet18_state_dict(resnet18_checkpoint, capsys):
    assert main(["inspect", str(resnet18_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "digit0, digit1" in out and "multiclass  (assumed" in out
    assert "Blocks at 'stage' granularity: 4" in out and "Blocks at 'unit' granularity: 8" in out
    assert "512 x 7 x 7" in out and "b4_2" in out


def test_inspect_json(resnet18_checkpoint, capsys):
    assert main(["inspect", str(resnet18_checkpoint), "--json", "--task", "multilabel"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "resnet18" and info["task"] == "multilabel" and not info["task_assumed"]
    assert info["labels"] == [f"digit{i}" for i in range(10)]
    assert [b["output_shape"] for b in info["blocks"]["stage"]] == [[64, 56, 56], [128, 28, 28], [256, 14, 14], [512, 7, 7]]
    assert len(info["blocks"]["unit"]) == 8 and info["blocks"]["unit"][5]["name"] == "b3_2"
    assert info["parameters"] == 11_181_642 and 3.5e9 < info["flops"] < 3.7e9


def test_bad_input_exits_nonzero_with_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_text("nope")
    assert main(["inspect", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kamal: error: ") and "x.pt: is not a PyTorch checkpoint" in err and "\n" not in err


def test_eval_and_demo_commands(quick_demo, capsys):
    root, manifest = quick_demo
    csv_path = root / "data" / "validation" / "labels.csv"
    assert main(["eval", str(root / "teachers" / "digits_0to4.kamal.pt"), "--data", str(csv_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["ap"]) == ["zero", "one", "two", "three", "four"]
    assert result["mean_ap"] == pytest.approx(manifest["teachers"][0]["validation"]["mean_ap"], abs=1e-6)
    assert result["not_evaluated"] == []
    # the foreign teacher needs its task type and input size, as a recipe would give them
    assert main(["eval", str(root / "teachers" / "digits_5to9.pth"), "--data", str(csv_path),
                 "--task", "multilabel", "--input-size", "56"]) == 0
    assert "mAP" in capsys.readouterr().out
    # an already built workspace is re-evaluated, not rebuilt
    assert main(["demo", str(root), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "digits_0to4" in out and "Per-label AP" in out


def test_eval_rejects_mismatched_data(quick_demo, tmp_path, capsys):
    root, _ = quick_demo
    (tmp_path / "cat").mkdir()
    assert main(["eval", str(root / "teachers" / "digits_0to4.kamal.pt"), "--data", str(tmp_path)]) == 2
    assert "holds no class sub-folders" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "kamal_engine.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("kamal ")


def test_stage_descriptions_say_1_epoch_and_3_epochs():
    from kamal_engine.events import StageStarted, describe_stage

    assert describe_stage(StageStarted("amalgamate", 2, "b2", 4, 1, 10)) == "Block 2/4 (b2): 1 epoch"
    assert describe_stage(StageStarted("amalgamate", 2, "b2", 4, 3, 10)) == "Block 2/4 (b2): 3 epochs"
    assert describe_stage(StageStarted("component", 1, "zero", 10, 1, 10)).endswith(": 1 epoch")


def test_the_cli_and_the_app_log_the_same_lines_for_a_run():
    import io

    from kamal_app.monitor import RunMonitor
    from kamal_engine import events as ev
    from kamal_engine.cli import ProgressPrinter

    run = [ev.RunStarted("r", "filtered-ka", "cpu", "/tmp/out", 10),
           ev.StageStarted("amalgamate", 1, "b1", 2, 1, 5),
           ev.StepLosses(5, 10, "amalgamate", 1, 0, {"loss": 0.5, "teacher:t": 0.5}, 100.0, 1.0),
           ev.BlockConverged(1, "b1", {"zero": 0.25}),
           ev.BlockDiagnosed(1, "b1", {"t": {"filter": "conv", "related_before": 0.5, "share": 0.9}}),
           ev.RunWarning("look"), ev.BranchPlanChosen({"zero": "b1"}),
           ev.Evaluated("student", mean_ap=0.75), ev.Evaluated("t", accuracy=None),
           ev.Finished("/tmp/out", {"seconds": 61, "student": "2 tasks", "onnx_error": "no room"}),
           ev.Cancelled("the finished blocks are kept"), ev.Failed("told by the caller")]
    monitor, stream = RunMonitor(), io.StringIO()
    printer = ProgressPrinter(stream)
    for event in run:
        monitor.feed(event)
        if not isinstance(event, ev.StepLosses):  # the CLI's progress bar line is its own
            printer(event)
    app_lines = "\n".join(monitor.take_log()).splitlines()
    assert stream.getvalue().splitlines() == app_lines
    assert app_lines[1:] == ["Block 1/2 (b1): 1 epoch", "  converged loss at b1: zero 0.2500",
                             "  knowledge reproduced at b1: t 90% (conv, CKA 0.50)", "Warning: look",
                             "Branch points: zero → b1", "  student: mAP 0.7500", "  t: accuracy n/a",
                             "Finished in 1m01s: 2 tasks", "ONNX export failed (the student is saved): no room",
                             "Cancelled: the finished blocks are kept"]
    assert monitor.stage_text.startswith("Amalgamate · Block 1 · epoch 0")
