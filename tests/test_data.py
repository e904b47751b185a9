import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score

from kamal_engine.data import list_images, load_image, read_labelled
from kamal_engine.errors import DataError
from kamal_engine.evaluation import evaluate


def write_image(path, value=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8), mode="L").save(path)


@pytest.fixture
def csv_set(tmp_path):
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.png", value=60 * i)
    (tmp_path / "labels.csv").write_text("image,cat,dog\nimg/0.png,1,0\nimg/1.png,0,1\nimg/2.png,1,1\nimg/3.png,0,0\n")
    return tmp_path / "labels.csv"


def test_csv_set(csv_set):
    data = read_labelled(csv_set)
    assert data.task == "multilabel" and data.labels == ["cat", "dog"] and len(data) == 4
    assert data.targets.tolist() == [[1, 0], [0, 1], [1, 1], [0, 0]]


@pytest.mark.parametrize("text,message", [
    ("file,cat\nimg/0.png,1\n", "no 'image' column"),
    ("image\nimg/0.png\n", "no label columns"),
    ("image,cat\nimg/0.png,yes\n", "line 2, column 'cat': expected 0 or 1, got 'yes'"),
    ("image,cat\nimg/0.png,1\nimg/9.png,0\n", "line 3: image 'img/9.png' not found"),
    ("image,cat,dog\nimg/0.png,1\n", "line 2 has 2 fields, the header has 3"),
    ("image,cat,cat\nimg/0.png,1,0\n", "duplicate label column"),
])
def test_csv_errors_name_file_and_line(csv_set, text, message):
    bad = csv_set.with_name("bad.csv")
    bad.write_text(text)
    with pytest.raises(DataError, match="bad.csv: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        read_labelled(bad)


def test_class_folders_and_image_loading(tmp_path):
    write_image(tmp_path / "cat" / "a.png")
    write_image(tmp_path / "dog" / "b.jpg", size=(5, 7))
    data = read_labelled(tmp_path)
    assert data.task == "multiclass" and data.labels == ["cat", "dog"] and data.targets.tolist() == [0, 1]
    image = load_image(tmp_path / "dog" / "b.jpg", size=(4, 6))
    assert image.shape == (3, 4, 6) and image.dtype == torch.uint8
    assert len(list_images(tmp_path)) == 2


def test_image_and_folder_errors(tmp_path):
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(DataError, match="broken.png: image cannot be read"):
        load_image(tmp_path / "broken.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "missing")
    with pytest.raises(DataError, match="neither a .csv"):
        read_labelled(tmp_path / "broken.png")


def brightness_model(images):
    """A fake 'cat' detector: probability = mean brightness; 'dog' = 1 - brightness."""
    p = images.float().mean(dim=(1, 2, 3)) / 255
    return torch.stack([p, 1 - p], 1)


def test_evaluate_multilabel_matches_labels_by_name(csv_set):
    data = read_labelled(csv_set)
    result = evaluate(brightness_model, ["cat", "dog"], "multilabel", (8, 8), data, batch_size=3)
    # cat scores 0, .24, .47, .71 for targets 1, 0, 1, 0: hits at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2
    assert result.ap["cat"] == pytest.approx(0.5)
    assert result.ap["dog"] == pytest.approx(average_precision_score([0, 1, 1, 0], [1, 0.765, 0.53, 0.294]))
    assert result.mean_ap == pytest.approx(np.mean(list(result.ap.values())))
    only_cat = evaluate(lambda x: brightness_model(x)[:, :1], ["cat", "bird"][:1], "multilabel", (8, 8), data)
    assert list(only_cat.ap) == ["cat"]
    partial = evaluate(lambda x: torch.cat([brightness_model(x), brightness_model(x)[:, :1]], 1),
                       ["cat", "dog", "bird"], "multilabel", (8, 8), data)
    assert partial.not_evaluated == ["bird"]


def test_evaluate_errors(csv_set, tmp_path):
    data = read_labelled(csv_set)
    with pytest.raises(DataError, match="none of the model's labels"):
        evaluate(brightness_model, ["car", "bus"], "multilabel", (8, 8), data)
    with pytest.raises(DataError, match="model is multi-class"):
        evaluate(brightness_model, ["cat", "dog"], "multiclass", (8, 8), data)
    write_image(tmp_path / "folders" / "horse" / "a.png")
    with pytest.raises(DataError, match="class folders the model does not predict: horse"):
        evaluate(brightness_model, ["cat", "dog"], "multiclass", (8, 8), read_labelled(tmp_path / "folders"))


def test_evaluate_multiclass_accuracy(tmp_path):
    write_image(tmp_path / "dog" / "dark.png", value=10)
    write_image(tmp_path / "cat" / "bright.png", value=250)
    write_image(tmp_path / "cat" / "dark.png", value=5)
    result = evaluate(brightness_model, ["cat", "dog"], "multiclass", (8, 8), read_labelled(tmp_path))
    assert result.accuracy == pytest.approx(2 / 3)
