"""Evaluating a classifier on a labelled set: AP per label and mAP, or top-1 accuracy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .data import LabelledSet, batches
from .errors import DataError, KamalError
from .metrics import mean_ap, per_label_ap, top1_accuracy
from .selection import TaskSelection
from .targetnet import Student

Predictor = Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, 3, H, W) -> probabilities (N, L)


@dataclass
class Evaluation:
    """The result of :func:`evaluate`. ``ap``/``mean_ap`` for multi-label, ``accuracy`` for multi-class."""

    task: str
    n_images: int
    ap: dict[str, float] = field(default_factory=dict)
    mean_ap: float = math.nan
    accuracy: float = math.nan
    not_evaluated: list[str] = field(default_factory=list)  # model labels the data has no column for
    present: dict[str, float] = field(default_factory=dict)  # per label: share of images called present (p > 0.5)

    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v
        d = asdict(self)
        d["ap"] = {k: clean(v) for k, v in self.ap.items()}
        d["mean_ap"], d["accuracy"] = clean(self.mean_ap), clean(self.accuracy)
        return d


def predict_all(predict: Predictor, data: LabelledSet, input_size: Sequence[int], batch_size: int = 64,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Probabilities for every image of ``data``, ``(N, L)`` (under ``torch.inference_mode``)."""
    out = []
    with torch.inference_mode():
        for start, images in batches(data.paths, input_size, batch_size):
            out.append(predict(images).float().cpu().numpy())
            if progress:
                progress(start + len(images), len(data))
    return np.concatenate(out)


def evaluate(predict: Predictor, labels: Sequence[str], task: str, input_size: Sequence[int], data: LabelledSet,
             batch_size: int = 64, progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Evaluate a model with outputs ``labels`` on ``data``, matching labels by name."""
    labels = list(labels)
    if task == "multilabel":
        if data.task != "multilabel":
            raise DataError("is a multi-class folder set, but the model is multi-label: give a CSV with one 0/1 "
                            "column per label", data.source)
        common = [label for label in labels if label in data.labels]
        if not common:
            raise DataError(f"has none of the model's labels as a column (model: {', '.join(labels[:8])}; "
                            f"CSV: {', '.join(data.labels[:8])})", data.source)
        scores = predict_all(predict, data, input_size, batch_size, progress)
        model_cols = [labels.index(label) for label in common]
        data_cols = [data.labels.index(label) for label in common]
        ap = per_label_ap(scores[:, model_cols], data.targets[:, data_cols], common)
        present = {label: float((scores[:, labels.index(label)] > 0.5).mean()) for label in common}
        return Evaluation(task, len(data), ap=ap, mean_ap=mean_ap(ap),
                          not_evaluated=[label for label in labels if label not in common], present=present)
    if data.task != "multiclass":
        raise DataError("is a multi-label CSV, but the model is multi-class: give a folder with one sub-folder "
                        "per class", data.source)
    unknown = [c for c in data.labels if c not in labels]
    if unknown:
        raise DataError(f"has class folders the model does not predict: {', '.join(unknown[:8])} "
                        f"(model classes: {', '.join(labels[:8])}{'…' if len(labels) > 8 else ''})", data.source)
    scores = predict_all(predict, data, input_size, batch_size, progress)
    targets = np.asarray([labels.index(data.labels[t]) for t in data.targets])
    chosen = scores.argmax(1)
    present = {label: float((chosen == k).mean()) for k, label in enumerate(labels)}
    return Evaluation(task, len(data), accuracy=top1_accuracy(scores, targets),
                      not_evaluated=[label for label in labels if label not in data.labels], present=present)


def evaluate_teacher(teacher, data: LabelledSet, batch_size: int = 64, device: torch.device | str = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> Evaluation:
    teacher.model.to(device)
    return evaluate(teacher.predict, teacher.labels, teacher.task, teacher.preprocessing.input_size, data,
                    batch_size, progress)


def evaluate_student(student, data, device=None) -> Evaluation:
    """A student on ``data``: its outputs whose task type matches the data (CSV: multi-label ones).

    ``student`` is a :class:`Student` (moved to ``device``) or any predictor with ``labels``,
    ``groups``, ``preprocessing`` and ``predict`` (e.g. an exported ``.onnx`` in ONNX Runtime).
    """
    if isinstance(student, Student) and device is not None:
        student.net.to(device)
    positions = [p for g in student.groups if g.kind == data.task for p in g.positions]
    if data.task == "multiclass" and len({g.name for g in student.groups if g.kind == "multiclass"}) > 1:
        raise KamalError("the student has several multi-class tasks; a class-folder set can evaluate only one",
                         data.source)
    if not positions:
        kind = "multi-label" if data.task == "multilabel" else "multi-class"
        raise KamalError(f"is a {kind} set but the student has no {kind} outputs", data.source)
    index = torch.tensor(positions)
    labels = [student.labels[p] for p in positions]

    def predict(x: torch.Tensor) -> torch.Tensor:
        probabilities = student.predict(x)
        return probabilities[:, index.to(probabilities.device)]

    return evaluate(predict, labels, data.task,
                    student.preprocessing.input_size, data)


def evaluate_teacher_on_selection(teacher, selection: TaskSelection, n: int, data, device) -> Evaluation:
    """A teacher on the labels selected from it (its AP does not depend on the other outputs)."""
    covered = selection.covered_by(n)
    outputs = [o for _, columns in covered for o in columns]
    labels = [label for t, _ in covered for label in t.labels]
    teacher.model.to(device)
    if teacher.task == "multiclass" and data.task == "multiclass":
        def predict(x):
            logits = teacher.model(teacher.preprocessing(x.to(device)))[:, outputs]
            return torch.softmax(logits, 1)
        with torch.no_grad():
            return evaluate(predict, labels, "multiclass", teacher.preprocessing.input_size, data)
    return evaluate(lambda x: teacher.predict(x)[:, outputs], labels, teacher.task, teacher.preprocessing.input_size, data)
