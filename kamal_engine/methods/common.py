"""What a method gets from the runner, and helpers the methods share."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..backbones import split_model
from ..events import CancelToken, Emit
from ..preprocessing import Preprocessing
from ..selection import TaskSelection
from ..targetnet import Branch, BranchSpec, TargetNet, TaskGroup
from ..training import MetricsLog, StepLoop, UnlabeledImages, autocast, task_losses


@dataclass
class RunContext:
    selection: TaskSelection
    student: nn.Module  # initialised student network
    student_arch: str
    student_arch_kwargs: dict[str, Any]
    student_preprocessing: Preprocessing
    images: UnlabeledImages | None
    targets: list[torch.Tensor] | None  # per teacher: probabilities on every image for its selected outputs
    device: torch.device
    precision: str
    params: dict[str, Any]
    seed: int
    emit: Emit
    cancel: CancelToken
    metrics: MetricsLog
    checkpoint: Any  # runner.Checkpointer: load() -> dict | None, save(dict)
    evaluate: Callable[[Any], Any] | None  # TargetNet -> Evaluation, when a validation set is given
    method_id: str = ""
    output_dir: Path | None = None  # the run's folder (for by-products such as adaptive-ka's component nets)

    def phase_seed(self, phase: int) -> int:
        """A seed per phase (block, fine-tuning...), so a resumed run repeats the same draws."""
        return self.seed * 1009 + phase

    def loop(self, total_steps: int, start_step: int) -> StepLoop:
        names = {f"teacher:{t.name}": t.name for t in self.selection.teachers}
        task_teacher = {f"task:{t.name}": self.selection.teachers[t.teacher].name for t in self.selection.tasks}

        def teacher_of(key: str) -> tuple[str, str]:
            if key in names:
                return names[key], ""
            if key in task_teacher:
                return task_teacher[key], key.split(":", 1)[1]
            return "", ""

        return StepLoop(self.emit, self.cancel, self.metrics, total_steps, start_step, teacher_of)

    def all_targets(self, idx: torch.Tensor) -> torch.Tensor:
        """Soft targets of every selected output, in the student's label order, for images ``idx``."""
        return torch.cat([t[idx] for t in self.targets], 1).to(self.device)

    def sgd(self, parameters, lr: float) -> torch.optim.Optimizer:
        p = self.params
        return torch.optim.SGD(parameters, lr=lr, momentum=p["momentum"], weight_decay=p["weight_decay"])

    def batch_losses(self, forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """Per-task soft-target losses (Eq. 7's terms) of ``forward`` on images ``idx``; ``forward`` maps
        uint8 images to the logits of every selected output in label order."""
        with autocast(self.device, self.precision):
            logits = forward(self.images.images[idx].to(self.device))
        return task_losses(logits, self.all_targets(idx), self.selection.tasks)

    def soft_target_step(self, forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor,
                         optimizer: torch.optim.Optimizer, schedule) -> dict[str, float]:
        """One SGD step on Eq. 7, ``L = 1/|C| Σ_tasks ℓ``; returns the logged losses."""
        per_task = self.batch_losses(forward, idx)
        loss = per_task.sum() / len(self.selection.tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss_dict(loss, per_task, self.selection)


def loss_dict(loss: torch.Tensor, per_task: torch.Tensor, selection: TaskSelection) -> dict[str, float]:
    """``{"loss", "teacher:<name>" (mean over its tasks), "task:<name>"}`` for metrics and events."""
    values = per_task.detach().cpu().tolist()
    out = {"loss": float(loss.detach())}
    for n, teacher in enumerate(selection.teachers):
        idx = [i for i, t in enumerate(selection.tasks) if t.teacher == n]
        if idx:
            out[f"teacher:{teacher.name}"] = sum(values[i] for i in idx) / len(idx)
    out.update({f"task:{t.name}": v for t, v in zip(selection.tasks, values)})
    return out


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    full, rest = divmod(n_images, batch_size)
    return full + (1 if rest >= 2 else 0)


def copy_module(module: nn.Module) -> nn.Module:
    """An independent copy (the TargetNet owns its parts; the frozen teachers stay untouched)."""
    return copy.deepcopy(module)


def whole_net(model: nn.Module, arch: str, arch_kwargs: dict[str, Any], labels: list[str], tasks) -> TargetNet:
    """``model`` as one unbranched TargetNet: all its blocks and its own head, whose outputs are
    ``labels`` in order; ``tasks`` (with ``kind``, ``positions``, ``name``) group them."""
    net = split_model(model, arch, "stage")
    spec = BranchSpec(block=len(net), source="student", arch=arch, arch_kwargs=dict(arch_kwargs),
                      num_outputs=len(labels), granularity="stage", filter={"kind": "identity"},
                      outputs=list(range(len(labels))), positions=list(range(len(labels))),
                      tasks=[t.name for t in tasks])
    return TargetNet(list(net.blocks), net.block_names, [Branch(nn.Identity(), [], net.head, spec.outputs)],
                     [spec], labels, [TaskGroup(t.kind, list(t.positions), t.name) for t in tasks])


def whole_student(ctx: RunContext) -> TargetNet:
    """The student as one unbranched TargetNet: all its blocks, its own head for every selected label
    (the form of the ``kd``, ``dafl`` and ``adaptive-ka`` students)."""
    return whole_net(ctx.student, ctx.student_arch, ctx.student_arch_kwargs, ctx.selection.labels,
                     ctx.selection.tasks)
