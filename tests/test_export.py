"""ONNX export (`kamal export`), ONNX Runtime prediction (`kamal predict`) and `kamal eval` on an .onnx."""

import json

import numpy as np
import onnx
import pytest
import torch

from kamal_engine import __version__
from kamal_engine.onnx import export
from kamal_engine.cli import main
from kamal_engine.errors import CheckpointError, KamalError
from kamal_engine.onnx.export import ExportError, export_onnx
from kamal_engine.onnx.runtime import load_onnx, load_predictor
from kamal_engine.targetnet import TaskGroup, load_student


@pytest.fixture(scope="module")
def exported(quick_student, tmp_path_factory):
    out, _ = quick_student
    student = load_student(out / "student.kamal.pt")
    folder = tmp_path_factory.mktemp("onnx")
    result = export_onnx(student, folder / "student.onnx")
    return student, result


def _images(n, size=(56, 56), seed=0):
    return torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_run_exports_the_onnx_named_in_the_recipe(quick_student):
    out, result = quick_student
    onnx_report = result.report["onnx"]
    assert (out / "student.onnx").is_file() and onnx_report["path"] == str(out / "student.onnx")
    assert max(onnx_report["max_abs_diff"].values()) <= 1e-4
    assert json.loads((out / "report.json").read_text())["onnx"]["opset"] == 18


def test_one_self_contained_file_with_the_metadata_round_trip(exported):
    student, result = exported
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["student.onnx"]  # no external data, no temp file
    onnx.checker.check_model(str(result.path), full_check=True)
    model = onnx.load(str(result.path))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["labels"]) == student.labels and props["engine_version"] == __version__
    loaded = load_onnx(result.path, "cpu")
    assert loaded.labels == student.labels
    assert loaded.groups == student.groups
    assert loaded.preprocessing == student.preprocessing
    assert loaded.metadata["engine_version"] == __version__ and loaded.metadata["fp16"] is False
    assert loaded.metadata["task_types"] == {g.name: g.kind for g in student.groups}
    assert loaded.provider == "CPUExecutionProvider"
    assert result.max_abs_diff["logits"] <= 1e-4 and result.max_abs_diff["probabilities"] <= 1e-4


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_dynamic_batch_matches_pytorch(exported, batch):
    student, result = exported
    loaded = load_onnx(result.path, "cpu")
    images = _images(batch, seed=batch)
    x = student.preprocessing(images)
    logits, probabilities = loaded.run(x.numpy())
    assert logits.shape == probabilities.shape == (batch, len(student.labels))
    with torch.no_grad():
        want = student.net(x)
    assert np.abs(logits - want.numpy()).max() <= 1e-4
    assert np.abs(probabilities - student.predict(images).numpy()).max() <= 1e-4


def test_a_second_runtime_onnx_reference_agrees(exported):
    from onnx.reference import ReferenceEvaluator

    student, result = exported
    x = student.preprocessing(_images(2, seed=5)).numpy()
    reference = ReferenceEvaluator(str(result.path)).run(None, {"image": x})
    ort_out = load_onnx(result.path, "cpu").run(x)
    for a, b in zip(reference, ort_out):
        assert np.abs(a - b).max() <= 1e-4


def test_multiclass_tasks_export_their_softmax(exported, tmp_path):
    student, _ = exported
    student.net.groups = [TaskGroup("multiclass", list(range(len(student.labels))), "digit")]
    try:
        result = export_onnx(student, tmp_path / "mc.onnx")
        loaded = load_onnx(result.path, "cpu")
        probabilities = loaded.predict(_images(4)).numpy()
        assert np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
        assert np.abs(probabilities - student.predict(_images(4)).numpy()).max() <= 1e-4
        assert loaded.groups[0].kind == "multiclass"
    finally:
        student.net.groups = load_student(student.source).net.groups


def test_fp16_export_is_smaller_and_close(exported, tmp_path):
    student, full = exported
    result = export_onnx(student, tmp_path / "half.onnx", fp16=True)
    assert result.fp16 and result.size_bytes < 0.6 * full.size_bytes
    loaded = load_onnx(result.path, "cpu")
    assert loaded.metadata["fp16"] is True
    assert np.abs(loaded.predict(_images(5)).numpy() - student.predict(_images(5)).numpy()).max() <= 1e-2


def test_export_fails_and_writes_nothing_when_the_runtimes_disagree(exported, tmp_path, monkeypatch):
    student, _ = exported
    monkeypatch.setattr(export, "FP32_TOLERANCE", 0.0)
    with pytest.raises(ExportError, match="disagree.*was not written"):
        export_onnx(student, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_opset_is_refused(exported, tmp_path):
    student, _ = exported
    with pytest.raises(ExportError, match="opset 11 is not supported"):
        export_onnx(student, tmp_path / "x.onnx", opset=11)


def test_corrupt_or_foreign_onnx_files_are_refused_with_the_file_named(exported, tmp_path, capsys):
    _, result = exported
    data = result.path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    text = tmp_path / "text.onnx"
    text.write_text("not a model\n")
    for path in (truncated, empty, text):
        with pytest.raises(CheckpointError) as info:
            load_onnx(path)
        assert str(path) in str(info.value)
    model = onnx.load(str(result.path))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save_model(model, str(bare))
    with pytest.raises(CheckpointError, match="without KAmal Studio metadata"):
        load_onnx(bare)
    capsys.readouterr()
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (56, 56)).save(image)
    assert main(["predict", str(truncated), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(truncated) in err[0] and "damaged" in err[0]


def test_cuda_provider_without_a_gpu_is_a_clear_error(exported):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, result = exported
    with pytest.raises(KamalError, match="--provider cuda was asked for"):
        load_onnx(result.path, "cuda")


def test_predict_gives_the_same_probabilities_for_the_bundle_and_its_onnx(quick_demo, quick_student, exported, capsys):
    root, _ = quick_demo
    out, _ = quick_student
    _, result = exported
    images = [str(p) for p in sorted((root / "data" / "validation" / "images").glob("*.png"))[:6]]
    reports = {}
    for model in (out / "student.kamal.pt", result.path):
        assert main(["predict", str(model), *images, "--json", "--provider", "cpu", "--batch-size", "4"]) == 0
        reports[model.suffix] = json.loads(capsys.readouterr().out)
    bundle, onnx_report = reports[".pt"], reports[".onnx"]
    assert bundle["runtime"] == "pytorch" and bundle["provider"] == "cpu"
    assert onnx_report["runtime"] == "onnxruntime" and onnx_report["provider"] == "CPUExecutionProvider"
    assert [r["image"] for r in bundle["images"]] == images == [r["image"] for r in onnx_report["images"]]
    for a, b in zip(bundle["images"], onnx_report["images"]):
        assert a["probabilities"].keys() == b["probabilities"].keys()
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) <= 1e-5
    # the human table: one row per image, the provider on stderr
    assert main(["predict", str(result.path), *images[:2], "--threshold", "0.3"]) == 0
    captured = capsys.readouterr()
    assert "ONNX Runtime on CPUExecutionProvider" in captured.err
    assert len(captured.out.strip().splitlines()) == 2 + 2 and "predicted (* >= 0.3)" in captured.out


def test_eval_accepts_an_onnx_and_matches_pytorch(quick_demo, quick_student, exported, capsys):
    root, _ = quick_demo
    out, _ = quick_student
    _, result = exported
    csv = str(root / "data" / "validation" / "labels.csv")
    maps = {}
    for model in (out / "student.kamal.pt", result.path):
        assert main(["eval", str(model), "--data", csv, "--json", "--device", "cpu"]) == 0
        maps[model.suffix] = json.loads(capsys.readouterr().out)["mean_ap"]
    assert abs(maps[".pt"] - maps[".onnx"]) <= 1e-3


def test_export_cli_reports_the_check(quick_student, tmp_path, capsys):
    out, _ = quick_student
    assert main(["export", str(out / "student.kamal.pt"), "--onnx", str(tmp_path / "s.onnx")]) == 0
    text = capsys.readouterr().out
    assert "onnx.checker: passed" in text and "max |difference|" in text and (tmp_path / "s.onnx").is_file()
    assert load_predictor(tmp_path / "s.onnx", "cpu").runtime == "onnxruntime"


def test_a_failed_export_in_a_run_keeps_the_student_and_exits_1(quick_demo, recipe_factory, tmp_path, monkeypatch,
                                                               capsys):
    root, _ = quick_demo
    monkeypatch.setattr(export, "FP32_TOLERANCE", 0.0)
    recipe = recipe_factory(root / "recipes" / "filtered-ka.toml", method={"id": "kd", "epochs": 1, "batch_size": 64},
                            run={"output_dir": tmp_path / "run"}, export={"onnx": tmp_path / "run" / "s.onnx"})
    assert main(["run", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "the ONNX export asked for in [export] failed (the student bundle is saved)" in err
    assert (tmp_path / "run" / "student.kamal.pt").is_file() and not (tmp_path / "run" / "s.onnx").exists()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "disagree" in report["onnx"]["error"]
