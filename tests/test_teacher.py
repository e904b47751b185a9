import pickle

import pytest
import torch
import torchvision

from kamal_engine.errors import CheckpointError, KamalError, UnsafeCheckpointError
from kamal_engine.preprocessing import IMAGENET_MEAN, Preprocessing
from kamal_engine.teacher import Teacher, load_pretrained, load_teacher, read_labels_file

LABELS = [f"class_{i}" for i in range(10)]


@pytest.fixture
def resnet18_files(tmp_path):
    """A torchvision resnet18 with a 10-output fc saved as a bare state_dict plus labels.txt."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return model, path


def images(n=2, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_foreign_state_dict_with_sidecar_labels(resnet18_files):
    model, path = resnet18_files
    teacher = load_teacher(path)
    assert (teacher.arch, teacher.labels, teacher.source_format) == ("resnet18", LABELS, "state_dict")
    assert teacher.task == "multiclass" and teacher.task_assumed
    assert teacher.preprocessing == Preprocessing(224, IMAGENET_MEAN, (0.229, 0.224, 0.225))
    x = teacher.preprocessing(images())
    with torch.no_grad():
        assert torch.equal(teacher.model(x), model(x))


@pytest.mark.parametrize("wrap", [lambda sd: {"state_dict": sd, "epoch": 3}, lambda sd: {"model": sd},
                                  lambda sd: {f"module.{k}": v for k, v in sd.items()}])
def test_common_wrappers_are_unwrapped(tmp_path, wrap):
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    torch.save(wrap(model.state_dict()), tmp_path / "m.pt")
    teacher = load_teacher(tmp_path / "m.pt", labels=list("abcd"), task="multilabel")
    assert teacher.arch == "mobilenet_v3_small" and teacher.task == "multilabel" and not teacher.task_assumed


@pytest.mark.parametrize("suffix", [".kamal.pt", ".safetensors"])
def test_native_bundle_round_trip(tmp_path, suffix):
    from kamal_engine.backbones import build_model

    model = build_model("smallnet", 3, width=8).eval()
    pre = Preprocessing(56, (0.1, 0.1, 0.1), (0.3, 0.3, 0.3))
    teacher = Teacher("mine", "smallnet", ["a", "b", "c"], "multilabel", pre, model, {"width": 8, "depth": [1, 1, 1, 1]})
    path = teacher.save(tmp_path / f"t{suffix}")
    loaded = load_teacher(path)
    assert (loaded.name, loaded.arch, loaded.labels, loaded.task, loaded.preprocessing) == (
        "mine", "smallnet", ["a", "b", "c"], "multilabel", pre)
    assert loaded.arch_kwargs == {"width": 8, "depth": [1, 1, 1, 1]}
    assert torch.equal(loaded.predict(images(size=56)), teacher.predict(images(size=56)))
    if suffix == ".kamal.pt":  # plain data only: loads with weights_only=True
        bundle = torch.load(path, weights_only=True)
        assert bundle["format"] == "kamal-teacher" and bundle["format_version"] == 1


def test_preprocessing_can_be_overridden(resnet18_files):
    _, path = resnet18_files
    teacher = load_teacher(path, input_size=64, mean=[0.5] * 3, std=[0.25] * 3)
    assert teacher.preprocessing == Preprocessing(64, (0.5,) * 3, (0.25,) * 3)


# --- refusing code --------------------------------------------------------------------------------

class CreatesFile:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):  # unpickling this object would create the file
        return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save({"state_dict": CreatesFile(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(CreatesFile(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="pickled Python objects.*could run arbitrary code.*--trust") as err:
        load_teacher(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_pickled_module_needs_explicit_trust(tmp_path):
    model = torchvision.models.resnet18(num_classes=3)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"torchvision\.models\.resnet\.ResNet"):
        load_teacher(tmp_path / "whole.pt", labels=["a", "b", "c"])
    teacher = load_teacher(tmp_path / "whole.pt", labels=["a", "b", "c"], trust=True)
    assert teacher.arch == "resnet18" and teacher.source_format == "pickled-module"


# --- error paths ----------------------------------------------------------------------------------

def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: file not found"):
        load_teacher(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_teacher(tmp_path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("these are my notes, not weights")
    with pytest.raises(CheckpointError, match="notes.pt: is not a PyTorch checkpoint"):
        load_teacher(tmp_path / "notes.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_teacher(tmp_path / "empty.pt")


def test_truncated_checkpoint(resnet18_files, tmp_path):
    _, path = resnet18_files
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth: is truncated or corrupt"):
        load_teacher(tmp_path / "cut.pth", labels=LABELS)


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="bad.safetensors: is not a readable .safetensors file"):
        load_teacher(tmp_path / "bad.safetensors")


def test_wrong_architecture_lists_missing_and_unexpected_keys(resnet18_files):
    _, path = resnet18_files
    with pytest.raises(CheckpointError, match=r"do not fit architecture 'resnet34': 96 missing keys \(layer1\.2\."):
        load_teacher(path, arch="resnet34")
    with pytest.raises(CheckpointError, match=r"missing keys.*shape mismatches, file vs model \(layer1\.0\.conv1"):
        load_teacher(path, arch="resnet50")
    state_dict = torch.load(path, weights_only=True)
    state_dict["extra.weight"] = torch.zeros(1)
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(extra\.weight\)"):
        load_teacher(path, arch="resnet18")


def test_label_count_must_match_outputs(resnet18_files, tmp_path):
    _, path = resnet18_files
    (tmp_path / "labels.txt").write_text("\n".join(LABELS[:9]))
    with pytest.raises(CheckpointError, match="9 labels .* but the classifier has 10 outputs"):
        load_teacher(path)


def test_duplicate_labels_name_the_lines(resnet18_files, tmp_path):
    _, path = resnet18_files
    (tmp_path / "labels.txt").write_text("\n".join(LABELS[:9] + ["class_3"]))
    with pytest.raises(KamalError, match="labels.txt: duplicate label 'class_3' on lines 4 and 10"):
        load_teacher(path)
    with pytest.raises(CheckpointError, match="duplicate label 'x'"):
        load_teacher(path, labels=["x"] * 10)


def test_missing_labels_say_how_to_give_them(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "net.pth")
    with pytest.raises(CheckpointError, match="has no label names.*5 lines.*net.labels.txt"):
        load_teacher(tmp_path / "net.pth")
    assert load_teacher(tmp_path / "net.pth", require_labels=False).labels[0] == "output_0"


def test_labels_file_ignores_blank_lines_and_comments(tmp_path):
    (tmp_path / "l.txt").write_text("# classes\ncat\n\ndog\n")
    assert read_labels_file(tmp_path / "l.txt") == ["cat", "dog"]
    (tmp_path / "e.txt").write_text("\n# nothing\n")
    with pytest.raises(KamalError, match="has no labels"):
        read_labels_file(tmp_path / "e.txt")


def test_bundle_from_a_newer_engine_and_damaged_bundle(tmp_path):
    torch.save({"format": "kamal-teacher", "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format version 99.*update KAmal Studio"):
        load_teacher(tmp_path / "new.pt")
    torch.save({"format": "kamal-teacher", "format_version": 1, "arch": "lenet5"}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="without the field.*labels"):
        load_teacher(tmp_path / "broken.pt")


def test_dict_without_weights(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="holds a dict without model weights"):
        load_teacher(tmp_path / "opt.pt")


def test_bad_preprocessing_values():
    with pytest.raises(KamalError, match="std values must be positive"):
        Preprocessing(32, (0, 0, 0), (1, 0, 1))
    with pytest.raises(KamalError, match="needs 3 values"):
        Preprocessing(32, (0, 0), (1, 1, 1))


def test_student_starts_from_pretrained_weights_with_another_head(resnet18_files, tmp_path):
    """init = "checkpoint": the trunk is the file's, a head of other shape keeps its own weights."""
    source, path = resnet18_files
    student = torchvision.models.resnet18(num_classes=3)
    head_before = student.fc.weight.clone()
    assert load_pretrained(student, "resnet18", path) is None  # a bare state_dict: no preprocessing of its own
    weights = source.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith("fc."):
            continue
        assert torch.equal(value, weights[key]), key
    assert torch.equal(student.fc.weight, head_before)
    wrapped = tmp_path / "wrapped.pth"  # DataParallel prefix and a wrapper dict are read too
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, wrapped)
    again = torchvision.models.resnet18(num_classes=10)
    load_pretrained(again, "resnet18", wrapped)
    assert torch.equal(again.fc.weight, source.fc.weight)  # same shape: the head is copied as well


def test_pretrained_bundle_gives_its_preprocessing(tmp_path):
    from kamal_engine.backbones import build_model
    model = build_model("smallnet", 4, width=8)
    pre = Preprocessing(40, (0.1, 0.1, 0.1), (0.3, 0.3, 0.3))
    Teacher("bb", "smallnet", ["a", "b", "c", "d"], "multiclass", pre, model,
            arch_kwargs={"width": 8}).save(tmp_path / "bb.kamal.pt")
    student = build_model("smallnet", 2, width=8)
    assert load_pretrained(student, "smallnet", tmp_path / "bb.kamal.pt") == pre
    assert torch.equal(student.stages[3][0].conv1.weight, model.stages[3][0].conv1.weight)


def test_pretrained_weights_of_another_architecture_are_refused(resnet18_files):
    _, path = resnet18_files
    from kamal_engine.backbones import build_model
    with pytest.raises(CheckpointError, match=r"r18\.pth: does not fit the student's architecture 'smallnet': "
                                              r"\d+ missing keys \(stem"):
        load_pretrained(build_model("smallnet", 2), "smallnet", path)
    with pytest.raises(CheckpointError, match=r"shape mismatches, file vs student \(layer1\.0\.conv1\.weight "
                                              r"\[64, 64, 3, 3\] vs \[32, 32, 3, 3\]"):
        thin = torchvision.models.resnet18(num_classes=2)
        thin.layer1[0].conv1 = torch.nn.Conv2d(32, 32, 3, 1, 1, bias=False)  # the same keys, another shape
        load_pretrained(thin, "resnet18", path)
