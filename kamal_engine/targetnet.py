"""The branched student, TargetNet (filtered-KA Eq. 10), its branch plan, and the student bundle.

Each task i (see :mod:`.selection`) branches out of the shared student trunk at block S_i: its
stream is ``[T^1 .. T^{S_i}]``, then the teacher-level filter ``f^n_{S_i}``, then teacher n's
remaining blocks ``A_n^{S_i+1} .. A_n^B`` and its head, of which only the task's outputs are kept.
Tasks of one teacher that branch at the same block share one tail (one :class:`Branch`). Trunk
blocks after the deepest branch point are dropped. The ``kd`` baseline is the degenerate case of
one branch at the last block whose "tail" is the student's own classifier head.

The student bundle (format ``kamal-student``) is plain data, loadable with ``weights_only=True``,
and self-contained: it records how to rebuild every part (architectures, block granularity, filter
specs) and the TargetNet's state dict, so no teacher file is needed to use the student.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import __version__
from .backbones import build_model, split_model
from .checkpoints import atomic_write, read_checkpoint
from .errors import CheckpointError
from .filters import build_filter
from .preprocessing import Preprocessing

STUDENT_FORMAT = "kamal-student"
STUDENT_FORMAT_VERSION = 1


def choose_branch_points(converged: dict[str, Sequence[float]]) -> dict[str, int]:
    """Eq. 9: each task branches out at the block of minimum converged loss (1-based).

    ``converged[task][k-1]`` is the task's converged loss when block k was trained. NaN losses are
    ignored; among equal minima the deepest block wins (more shared blocks, a smaller TargetNet).
    """
    plan = {}
    for task, losses in converged.items():
        finite = [(loss, k) for k, loss in enumerate(losses, 1) if loss is not None and math.isfinite(loss)]
        if not finite:
            raise ValueError(f"task {task!r} has no finite converged loss: the training diverged")
        best = min(loss for loss, _ in finite)
        plan[task] = max(k for loss, k in finite if loss == best)
    return plan


@dataclass
class BranchSpec:
    """How to rebuild one branch: the part of a network that follows the trunk at ``block``."""

    block: int  # number of trunk blocks before the branch (1..B)
    source: str  # name of the network the tail comes from (a teacher's name, or "student")
    arch: str
    arch_kwargs: dict[str, Any]
    num_outputs: int  # outputs of that network's head
    granularity: str
    filter: dict[str, Any]
    outputs: list[int]  # head outputs the branch keeps
    positions: list[int]  # where they go among the student's outputs
    tasks: list[str] = field(default_factory=list)


@dataclass
class TaskGroup:
    """Output positions that share one probability function: sigmoid each, or one softmax."""

    kind: str  # "multilabel" | "multiclass"
    positions: list[int]
    name: str = ""


class Branch(nn.Module):
    """``head(tail(filter(feature)))[:, outputs]``."""

    def __init__(self, filter: nn.Module, tail: Sequence[nn.Module], head: nn.Module, outputs: Sequence[int]):
        super().__init__()
        self.filter = filter
        self.tail = nn.ModuleList(tail)
        self.head = head
        self.register_buffer("outputs", torch.tensor(list(outputs), dtype=torch.long), persistent=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self.filter(feature)
        for block in self.tail:
            x = block(x)
        return self.head(x).index_select(1, self.outputs)


class TargetNet(nn.Module):
    """The shared trunk and the branches; ``forward`` gives logits in the user's label order."""

    def __init__(self, trunk: Sequence[nn.Module], trunk_names: Sequence[str], branches: Sequence[Branch],
                 specs: Sequence[BranchSpec], labels: Sequence[str], groups: Sequence[TaskGroup]):
        super().__init__()
        depth = max(s.block for s in specs)
        self.trunk = nn.ModuleList(list(trunk)[:depth])
        self.trunk_names = list(trunk_names)[:depth]
        self.branches = nn.ModuleList(branches)
        self.specs = list(specs)
        self.labels = list(labels)
        self.groups = list(groups)
        order = [p for s in self.specs for p in s.positions]
        if sorted(order) != list(range(len(self.labels))):
            raise ValueError("the branches do not cover every output exactly once")
        inverse = [order.index(p) for p in range(len(self.labels))]
        self.register_buffer("order", torch.tensor(inverse, dtype=torch.long), persistent=False)
        self._taps = sorted({s.block for s in self.specs})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = {}
        for k, block in enumerate(self.trunk, 1):
            x = block(x)
            if k in self._taps:
                taps[k] = x
        parts = [branch(taps[spec.block]) for branch, spec in zip(self.branches, self.specs)]
        return torch.cat(parts, 1).index_select(1, self.order)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid per multi-label output, softmax within each multi-class task."""
        out = torch.sigmoid(logits)
        for group in self.groups:
            if group.kind == "multiclass":
                index = torch.tensor(group.positions, device=logits.device)
                out = out.index_copy(1, index, torch.softmax(logits.index_select(1, index), dim=1))
        return out

    def describe(self) -> dict[str, Any]:
        return {"trunk": self.trunk_names,
                "branches": [{"block": self.trunk_names[s.block - 1], "source": s.source,
                              "filter": s.filter.get("kind"), "tasks": s.tasks,
                              "labels": [self.labels[p] for p in s.positions]} for s in self.specs]}


def build_branch(spec: BranchSpec, model: nn.Module | None = None) -> Branch:
    """A branch from its spec; with ``model`` (a teacher) its tail and head are that model's modules."""
    if model is None:
        model = build_model(spec.arch, spec.num_outputs, **spec.arch_kwargs)
    net = split_model(model, spec.arch, spec.granularity)
    return Branch(build_filter(spec.filter), list(net.blocks)[spec.block:], net.head, spec.outputs)


@dataclass
class Student:
    """A trained TargetNet with what is needed to use it: preprocessing, labels, task groups."""

    net: TargetNet
    preprocessing: Preprocessing
    student_arch: str
    student_arch_kwargs: dict[str, Any]
    granularity: str
    method: str
    info: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def labels(self) -> list[str]:
        return self.net.labels

    @property
    def groups(self) -> list[TaskGroup]:
        return self.net.groups

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities for uint8 images ``(N, 3, H, W)``."""
        self.net.eval()
        device = next(self.net.parameters()).device
        return self.net.probabilities(self.net(self.preprocessing(images.to(device))))

    def to_bundle(self) -> dict[str, Any]:
        return {
            "format": STUDENT_FORMAT,
            "format_version": STUDENT_FORMAT_VERSION,
            "engine_version": __version__,
            "method": self.method,
            "labels": list(self.labels),
            "groups": [asdict(g) for g in self.net.groups],
            **self.preprocessing.to_dict(),
            "student": {"arch": self.student_arch, "arch_kwargs": dict(self.student_arch_kwargs),
                        "granularity": self.granularity, "trunk": list(self.net.trunk_names)},
            "branches": [asdict(s) for s in self.net.specs],
            "info": self.info,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
        }

    def save(self, path: str | os.PathLike) -> Path:
        bundle = self.to_bundle()
        return atomic_write(path, lambda tmp: torch.save(bundle, tmp))


def student_from_bundle(bundle: dict[str, Any], path: Path | None = None) -> Student:
    if bundle.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"is a '{bundle.get('format')}' file, not a student bundle ('{STUDENT_FORMAT}')", path)
    if not isinstance(bundle.get("format_version"), int) or bundle["format_version"] > STUDENT_FORMAT_VERSION:
        raise CheckpointError(f"is a student bundle of format version {bundle.get('format_version')!r}; this "
                              f"engine reads up to version {STUDENT_FORMAT_VERSION}: update KAmal Studio", path)
    try:
        s = bundle["student"]
        specs = [BranchSpec(**b) for b in bundle["branches"]]
        depth = max(spec.block for spec in specs)
        trunk_net = split_model(build_model(s["arch"], 1, **s["arch_kwargs"]), s["arch"], s["granularity"])
        net = TargetNet(list(trunk_net.blocks)[:depth], s["trunk"], [build_branch(spec) for spec in specs], specs,
                        bundle["labels"], [TaskGroup(**g) for g in bundle["groups"]])
        net.load_state_dict(bundle["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"is a damaged student bundle ({type(exc).__name__}: {exc})", path) from None
    net.eval()
    return Student(net, Preprocessing(bundle["input_size"], bundle["mean"], bundle["std"]), s["arch"],
                   s["arch_kwargs"], s["granularity"], bundle.get("method", "?"), bundle.get("info", {}), path)


def load_student(path: str | os.PathLike) -> Student:
    """A student bundle written by ``kamal run``."""
    raw = read_checkpoint(path)
    if raw.kind != "bundle":
        raise CheckpointError("is not a student bundle (it holds bare weights); give the student.kamal.pt a run "
                              "wrote", Path(path))
    return student_from_bundle(raw.bundle, Path(path))
