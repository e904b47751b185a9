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

import itertools
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
class BranchSizes:
    """Parameter counts of the parts Eq. 10 assembles, so a plan's size is known without building it.

    ``trunk[k-1]``: student block k; ``tail[n][k-1]``: teacher n after block k (its remaining blocks
    and its head); ``filters[(k, n)]``: the filter joining student block k to teacher n.
    """

    trunk: Sequence[int]
    tail: Sequence[Sequence[int]]
    filters: dict[tuple[int, int], int]

    def size(self, plan: dict[str, int], teacher_of: dict[str, int]) -> int:
        """Parameters of the TargetNet of ``plan`` (task → block); tasks of one teacher at one block share
        a branch, trunk blocks after the deepest branch point are dropped."""
        groups = {(teacher_of[task], k) for task, k in plan.items()}
        depth = max(k for _, k in groups)
        return sum(self.trunk[:depth]) + sum(self.tail[n][k - 1] + self.filters[(k, n)] for n, k in groups)


def fit_branch_plan(plan: dict[str, int], converged: dict[str, Sequence[float]], teacher_of: dict[str, int],
                    sizes: BranchSizes, budget: int | None) -> tuple[dict[str, int], str]:
    """Eq. 9's ``plan`` if its TargetNet has at most ``budget`` parameters, else the best plan that does.

    Returns the plan and how it was found (``"eq9"``, ``"merged"`` or ``"over-budget"``). Over budget,
    every teacher's tasks share one branch point (a teacher's labels branching at two blocks copy its
    tail twice, the usual reason Eq. 10 grows): among the plans that give each teacher one block and
    fit, the one of least summed converged loss (ties: the smaller net). With many teachers and blocks
    the search is greedy: from each teacher's joint Eq. 9 block, it makes the move (one teacher to a
    deeper block, or every teacher to at least a deeper block) that saves parameters at the least loss
    per parameter, until a move fits; then the fitting move of least loss. When no plan fits (the
    student alone is bigger than the budget), every task branches at the last block.
    """
    if budget is None or sizes.size(plan, teacher_of) <= budget:
        return dict(plan), "eq9"
    tasks_of: dict[int, list[str]] = {}
    for task in plan:
        tasks_of.setdefault(teacher_of[task], []).append(task)
    teachers = sorted(tasks_of)
    n_blocks = len(sizes.trunk)

    def loss(n: int, k: int) -> float:
        values = [converged[t][k - 1] for t in tasks_of[n]]
        return sum(v if v is not None and math.isfinite(v) else math.inf for v in values)

    def as_plan(blocks: dict[int, int]) -> dict[str, int]:
        return {task: blocks[teacher_of[task]] for task in plan}

    if n_blocks ** len(teachers) <= 4096:
        best = None
        for combo in itertools.product(range(1, n_blocks + 1), repeat=len(teachers)):
            blocks = dict(zip(teachers, combo))
            candidate = as_plan(blocks)
            size = sizes.size(candidate, teacher_of)
            key = (size > budget, sum(loss(n, k) for n, k in blocks.items()) if size <= budget else size, size)
            if best is None or key < best[0]:
                best = (key, candidate)
        return best[1], ("merged" if not best[0][0] else "over-budget")
    blocks = {n: min(range(1, n_blocks + 1), key=lambda k: (loss(n, k), -k)) for n in teachers}

    def total(b: dict[int, int]) -> float:
        return sum(loss(n, k) for n, k in b.items())

    while sizes.size(as_plan(blocks), teacher_of) > budget:
        now, base = sizes.size(as_plan(blocks), teacher_of), total(blocks)
        moves = [{**blocks, n: j} for n in teachers for j in range(blocks[n] + 1, n_blocks + 1)]
        moves += [{n: max(k, j) for n, k in blocks.items()} for j in range(2, n_blocks + 1)]  # a deeper floor
        fitting = [m for m in moves if sizes.size(as_plan(m), teacher_of) <= budget]
        if fitting:
            blocks = min(fitting, key=lambda m: (total(m), sizes.size(as_plan(m), teacher_of)))
            break
        saving = [(m, now - sizes.size(as_plan(m), teacher_of)) for m in moves]
        saving = [(max(total(m) - base, 0.0) / saved, i) for i, (m, saved) in enumerate(saving) if saved > 0]
        if not saving:
            return as_plan({n: n_blocks for n in teachers}), "over-budget"
        blocks = moves[min(saving)[1]]
    return as_plan(blocks), "merged"


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
