"""Teachers: pre-trained classifiers loaded from checkpoint files (``docs/architecture.md``, "Teacher checkpoints").

A :class:`Teacher` is a model with its architecture name, label names, task type and
preprocessing. It loads from

* the native bundle (``torch.save`` of plain data, format tag ``kamal-teacher``) or a
  ``.safetensors`` file carrying the same metadata, and
* foreign checkpoints a user already has: a bare torchvision-style ``state_dict`` (also wrapped as
  ``{"state_dict": ...}`` / ``{"model": ...}``) with the labels from a sidecar text file. The
  architecture is detected from the keys and shapes, the output count from the classifier.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import __version__
from .backbones import BlockNet, build_model, detect_architecture, get_architecture, normalize_state_dict_keys, split_model
from .checkpoints import SAFETENSORS_META_KEY, RawCheckpoint, atomic_write, read_checkpoint
from .errors import CheckpointError, KamalError
from .preprocessing import Preprocessing

TEACHER_FORMAT = "kamal-teacher"
TEACHER_FORMAT_VERSION = 1
TASK_TYPES = ("multilabel", "multiclass")


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """Label names from a text file: one per line, blank lines and ``#`` comments ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KamalError("labels file not found; check the path", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KamalError(f"labels file cannot be read ({exc})", path) from None
    labels, lines = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        label = line.strip()
        if not label or label.startswith("#"):
            continue
        if label in lines:
            raise KamalError(f"duplicate label {label!r} on lines {lines[label]} and {number}; label names must be unique", path)
        lines[label] = number
        labels.append(label)
    if not labels:
        raise KamalError("labels file has no labels; write one label name per line, in output order", path)
    return labels


def check_labels(labels: Sequence[str], num_outputs: int, source: str, path: Path | None) -> list[str]:
    labels = [str(label).strip() for label in labels]
    seen: set[str] = set()
    for label in labels:
        if not label:
            raise CheckpointError(f"an empty label name was given ({source})", path)
        if label in seen:
            raise CheckpointError(f"duplicate label {label!r} ({source}); label names must be unique", path)
        seen.add(label)
    if len(labels) != num_outputs:
        raise CheckpointError(
            f"{len(labels)} labels ({source}) but the classifier has {num_outputs} outputs; "
            "give exactly one label per output, in output order",
            path,
        )
    return labels


def find_sidecar_labels(checkpoint: Path) -> Path | None:
    """``<name>.labels.txt``, ``<name>.txt`` or ``labels.txt`` beside the checkpoint."""
    stem = checkpoint.name.split(".")[0]
    for candidate in (checkpoint.with_name(f"{stem}.labels.txt"), checkpoint.with_name(f"{stem}.txt"),
                      checkpoint.with_name("labels.txt")):
        if candidate.is_file():
            return candidate
    return None


def _misfits(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], keys, model_name: str,
             unexpected: list[str] = ()) -> list[str]:
    """What of ``keys`` (the model's) the file's ``weights`` lack or hold in another shape, as sentence parts."""
    def some(items):
        return ", ".join(items[:4]) + (f", … ({len(items) - 4} more)" if len(items) > 4 else "")

    missing = [k for k in keys if k not in weights]
    mismatched = [f"{k} {list(weights[k].shape)} vs {list(own[k].shape)}"
                  for k in keys if k in weights and weights[k].shape != own[k].shape]
    return ([f"{len(missing)} missing keys ({some(missing)})"] if missing else []) + (
        [f"{len(unexpected)} unexpected keys ({some(unexpected)})"] if unexpected else []) + (
        [f"{len(mismatched)} shape mismatches, file vs {model_name} ({some(mismatched)})"] if mismatched else [])


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str, path: Path | None) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not fit."""
    own = model.state_dict()
    parts = _misfits(own, state_dict, own, "model", [k for k in state_dict if k not in own])
    if parts:
        raise CheckpointError(
            f"the weights do not fit architecture '{arch}': {'; '.join(parts)}. "
            "Check the architecture (--arch / 'arch' in the recipe) and its arguments",
            path,
        )
    model.load_state_dict(state_dict, strict=True)


def load_pretrained(model: nn.Module, arch: str, path: str | os.PathLike) -> Preprocessing | None:
    """Start ``model`` from the weights in ``path`` (``[student] init = "checkpoint"``).

    The filtered-KA paper initialises its TargetNet "with parameters pre-trained on ImageNet"; this
    reads such a file (any format :func:`read_checkpoint` knows: a native bundle, a bare
    ``state_dict``, ``.safetensors``) with ``weights_only``. Every tensor of the trunk must be there
    with the student's shape (else the architecture is wrong, and the error lists what does not fit);
    the classifier is copied only when its shape fits (a pre-trained head usually has other outputs)
    and otherwise keeps its random initialisation. Returns the file's preprocessing when it is a
    bundle that records one, else ``None``.
    """
    path = Path(path)
    raw = read_checkpoint(path)
    weights = normalize_state_dict_keys(raw.state_dict or {})
    if not weights:
        raise CheckpointError("holds no weights to start the student from", path)
    head = get_architecture(arch).classifier_key.rsplit(".", 1)[0] + "."
    own = model.state_dict()
    parts = _misfits(own, weights, [k for k in own if not k.startswith(head)], "student")
    if parts:
        raise CheckpointError(
            f"does not fit the student's architecture '{arch}': {'; '.join(parts)}. Give weights of the same "
            "architecture ([student] arch and arch_kwargs) or another init", path)
    model.load_state_dict({k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}, strict=False)
    if raw.kind == "bundle" and raw.bundle and all(k in raw.bundle for k in ("input_size", "mean", "std")):
        return Preprocessing.from_dict(raw.bundle)
    return None


@dataclass
class Teacher:
    """A pre-trained classifier with everything needed to use it as a teacher."""

    name: str
    arch: str
    labels: list[str]
    task: str
    preprocessing: Preprocessing
    model: nn.Module
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    source_format: str = "native"  # native | safetensors | state_dict | pickled-module
    task_assumed: bool = False  # True when a foreign checkpoint's task type was not given
    labels_source: str = "bundle"

    def __post_init__(self):
        if self.task not in TASK_TYPES:
            raise KamalError(f"unknown task type {self.task!r}; use one of {', '.join(TASK_TYPES)}", self.source)

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    def blocks(self, granularity: str = "stage") -> BlockNet:
        """The model as blocks + head, sharing its parameters."""
        return split_model(self.model, self.arch, granularity)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.task == "multilabel" else torch.softmax(logits, dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities for uint8 images ``(N, 3, H, W)`` (any size: preprocessing resizes)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        return self.probabilities(self.model(self.preprocessing(images.to(device))))

    def to_bundle(self) -> dict[str, Any]:
        """The native bundle: plain data only, loadable with ``torch.load(weights_only=True)``."""
        return {
            "format": TEACHER_FORMAT,
            "format_version": TEACHER_FORMAT_VERSION,
            "name": self.name,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "labels": list(self.labels),
            "task": self.task,
            **self.preprocessing.to_dict(),
            "engine_version": __version__,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the native bundle (``.safetensors`` suffix: safetensors + metadata), atomically."""
        bundle = self.to_bundle()
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file

            state_dict = bundle.pop("state_dict")
            meta = {SAFETENSORS_META_KEY: json.dumps(bundle)}
            return atomic_write(path, lambda tmp: save_file(state_dict, str(tmp), metadata=meta))
        return atomic_write(path, lambda tmp: torch.save(bundle, tmp))


def _bundle_fields(raw: RawCheckpoint) -> dict[str, Any]:
    bundle, path = raw.bundle or {}, raw.path
    if bundle.get("format") != TEACHER_FORMAT:
        raise CheckpointError(
            f"is a '{bundle.get('format')}' file, not a teacher ('{TEACHER_FORMAT}'); open it where that kind of file is expected",
            path,
        )
    version = bundle.get("format_version")
    if not isinstance(version, int) or version > TEACHER_FORMAT_VERSION:
        raise CheckpointError(
            f"is a teacher bundle of format version {version!r}; this engine reads up to version "
            f"{TEACHER_FORMAT_VERSION}: update KAmal Studio",
            path,
        )
    missing = [k for k in ("arch", "labels", "task", "input_size", "mean", "std", "state_dict") if k not in bundle]
    if missing:
        raise CheckpointError(f"is a teacher bundle without the field(s) {', '.join(missing)}; it is damaged", path)
    return bundle


@dataclass(frozen=True)
class TeacherOverrides:
    """What a caller says of a teacher file (a recipe's ``[[teachers]]`` keys, ``kamal inspect``'s
    options): each field given fills in, or overrides, what the file holds."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    labels: Sequence[str] | None = None
    labels_file: str | os.PathLike | None = None
    task: str | None = None
    input_size: int | Sequence[int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    name: str | None = None


@dataclass
class _FileFacts:
    """What a checkpoint file says of its teacher, with the overrides applied (labels still unnamed)."""

    arch: str | None
    arch_kwargs: dict[str, Any] | None
    task: str
    task_assumed: bool
    preprocessing: Preprocessing | None
    labels: list[str] | None
    source_format: str
    name: str | None

    @classmethod
    def of(cls, raw: RawCheckpoint, path: Path, o: TeacherOverrides) -> "_FileFacts":
        if raw.kind == "bundle":
            bundle = _bundle_fields(raw)
            return cls(o.arch or bundle["arch"],
                       o.arch_kwargs if o.arch_kwargs is not None else dict(bundle.get("arch_kwargs") or {}),
                       o.task or bundle["task"], False, Preprocessing(bundle["input_size"], bundle["mean"], bundle["std"]),
                       list(bundle["labels"]), "safetensors" if path.suffix == ".safetensors" else "native",
                       o.name or bundle.get("name"))
        source_format = "pickled-module" if raw.kind == "module" else (
            "safetensors" if path.suffix == ".safetensors" else "state_dict")
        return cls(o.arch, o.arch_kwargs, o.task or "multiclass", o.task is None, None, None, source_format, o.name)


def _label_names(o: TeacherOverrides, facts: _FileFacts, path: Path, num_outputs: int,
                 require_labels: bool) -> tuple[list[str], str]:
    """The teacher's label names and where they came from: given, a labels file, the bundle, a sidecar
    file beside the checkpoint, or (``require_labels`` false) ``output_0 ...``."""
    if o.labels is not None:
        labels, source = list(o.labels), "given labels"
    elif o.labels_file is not None:
        labels, source = read_labels_file(o.labels_file), f"labels file {o.labels_file}"
    elif facts.labels is not None:
        labels, source = facts.labels, "bundle"
    else:
        sidecar = find_sidecar_labels(path)
        if sidecar is not None:
            labels, source = read_labels_file(sidecar), f"labels file {sidecar}"
        elif require_labels:
            raise CheckpointError(
                f"has no label names: give a labels file (one label per line, {num_outputs} lines) with "
                f"--labels / 'labels_file' in the recipe, or put {path.name.split('.')[0]}.labels.txt beside it",
                path,
            )
        else:
            labels, source = [f"output_{i}" for i in range(num_outputs)], "unnamed outputs"
    return check_labels(labels, num_outputs, source, path), source


def load_teacher(path: str | os.PathLike, overrides: TeacherOverrides | None = None, *, trust: bool = False,
                 require_labels: bool = True, raw: RawCheckpoint | None = None, **given: Any) -> Teacher:
    """Load a teacher from ``path``; ``overrides`` (or its fields as keyword arguments, ``given``) fill
    in or override what the file lacks.

    For foreign checkpoints the labels come from ``labels``, ``labels_file`` or a sidecar file
    (:func:`find_sidecar_labels`); with ``require_labels=False`` (inspection) outputs without
    names are called ``output_0 ...``. Preprocessing defaults to the torchvision convention
    (ImageNet mean/std, the architecture's usual input size). ``raw`` is the already read file.
    """
    path = Path(path)
    o = replace(overrides or TeacherOverrides(), **given)
    raw = raw if raw is not None else read_checkpoint(path, trust=trust)
    facts = _FileFacts.of(raw, path, o)
    state_dict = normalize_state_dict_keys(raw.state_dict or {})
    if not state_dict:
        raise CheckpointError("holds no weights", path)
    arch, arch_kwargs = facts.arch, facts.arch_kwargs
    if arch is None:
        try:
            arch, detected_kwargs = detect_architecture(state_dict)
        except CheckpointError as exc:
            raise CheckpointError(str(exc), path) from None
        arch_kwargs = {**detected_kwargs, **(arch_kwargs or {})}
    spec = get_architecture(arch)
    classifier = state_dict.get(spec.classifier_key)
    if classifier is None:
        raise CheckpointError(
            f"has no classifier weight '{spec.classifier_key}' expected for architecture '{arch}'; "
            "check the architecture (--arch / 'arch' in the recipe)",
            path,
        )
    num_outputs = int(classifier.shape[0])
    labels, labels_source = _label_names(o, facts, path, num_outputs, require_labels)
    preprocessing = (facts.preprocessing or Preprocessing((spec.default_input_size,) * 2)).replace(
        o.input_size, o.mean, o.std)
    model = build_model(arch, num_outputs, **(arch_kwargs or {}))
    load_weights(model, state_dict, arch, path)
    model.eval()
    return Teacher(name=facts.name or path.name.split(".")[0], arch=arch, arch_kwargs=dict(arch_kwargs or {}),
                   labels=labels, task=facts.task, preprocessing=preprocessing, model=model, source=path,
                   source_format=facts.source_format, task_assumed=facts.task_assumed, labels_source=labels_source)
