"""What a method gets from the runner (:class:`RunContext`), and the helpers every method shares:
seeding a phase, resuming from the run's checkpoint, one optimiser step, the loss bookkeeping.

The shared phases built on these (block-wise training, fine-tuning) are in :mod:`.phases`, the
block pairing and regrouping of the block-wise methods in :mod:`.blockwise`
(``docs/architecture.md``, "Adding a method").
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..backbones import split_model
from ..distributed import SINGLE, World, batch_count
from ..events import CancelToken, Emit
from ..preprocessing import Preprocessing
from ..profiling import RunProfile
from ..selection import TaskSelection
from ..targetnet import Branch, BranchSpec, TargetNet, TaskGroup
from ..training import MetricsLog, StepLoop, UnlabeledImages, autocast, task_losses, to_device
from . import Param


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
    profile: RunProfile = field(default_factory=RunProfile)  # where the run's time goes (report.json)
    world: World = SINGLE  # a distributed run's processes (:mod:`kamal_engine.distributed`)

    def phase_seed(self, phase: int) -> int:
        """A seed per phase (block, fine-tuning...), so a resumed run repeats the same draws."""
        return self.seed * 1009 + phase

    def draw(self, phase: int) -> torch.Generator:
        """A generator of ``phase``'s seed, for the phase's batches and noise (torch's global generator
        is left alone)."""
        return torch.Generator().manual_seed(self.phase_seed(phase))

    def rank_draw(self, phase: int) -> torch.Generator:
        """:meth:`draw` for what each rank of a distributed run must draw for itself (a data-free
        method's latent codes: the ranks generate different images); one process: :meth:`draw`."""
        if not self.world.distributed:
            return self.draw(phase)
        return torch.Generator().manual_seed(self.phase_seed(phase) + 1_000_003 * self.world.rank)

    def seeded(self, phase: int) -> torch.Generator:
        """Seed torch's global generator for ``phase`` (new layers' initial weights) and return
        :meth:`draw`'s generator: the draws of a phase do not depend on the phases before it, so a
        resumed run repeats them. A method numbers its own phases (its module says how)."""
        torch.manual_seed(self.phase_seed(phase))
        return self.draw(phase)

    def saved(self) -> dict[str, Any]:
        """What the run's checkpoint holds (``{}`` for a fresh run): the finished phases' state."""
        return self.checkpoint.load() or {}

    def save(self, loop: StepLoop, **parts: Any) -> None:
        """Checkpoint after a phase: ``parts`` merged into the saved state, with the loop's step
        (where a resumed run continues; a part set to None is dropped)."""
        state = {**self.saved(), **parts, "step": loop.state.step}
        self.checkpoint.save({k: v for k, v in state.items() if v is not None})

    def loop(self, total_steps: int) -> StepLoop:
        """The step loop of the run, continuing at the checkpoint's step; metrics rows name the teacher
        (``teacher:<name>``) and the task (``task:<name>``) a logged value belongs to."""
        task_teacher = {f"task:{t.name}": self.selection.teachers[t.teacher].name for t in self.selection.tasks}

        def teacher_of(key: str) -> tuple[str, str]:
            if key.startswith("teacher:"):
                return key.split(":", 1)[1], ""
            if key in task_teacher:
                return task_teacher[key], key.split(":", 1)[1]
            return "", ""

        return StepLoop(self.emit, self.cancel, self.metrics, total_steps, self.saved().get("step", 0), teacher_of,
                        self.world.size, sync_every=16 if self.device.type == "cuda" else 1)

    def all_targets(self, idx: torch.Tensor) -> torch.Tensor:
        """Soft targets of every selected output, in the student's label order, for images ``idx``."""
        return to_device(torch.cat([t[idx] for t in self.targets], 1), self.device)

    def sgd(self, parameters, lr: float, fused: bool = True) -> torch.optim.Optimizer:
        """SGD with the run's momentum and weight decay: the fused kernel (one pass over each tensor; 3x
        faster than foreach on the CPU) unless ``fused`` is False — a parameter whose momentum exists but
        that got no gradient this step makes it fail (adaptive-ka's bridges): then one kernel per operation
        for all tensors (foreach; torch's CPU default is a loop)."""
        p = self.params
        fused = fused and self.device.type in ("cpu", "cuda")
        return torch.optim.SGD(parameters, lr=lr, momentum=p["momentum"], weight_decay=p["weight_decay"],
                               **({"fused": True} if fused else {"foreach": True}))

    def batch_losses(self, forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor,
                     images: bool = True) -> torch.Tensor:
        """Per-task soft-target losses (Eq. 7's terms) of ``forward`` on images ``idx``; ``forward`` maps
        uint8 images to the logits of every selected output in label order (``images=False``: it gets
        None, having its input elsewhere, e.g. filtered-ka's prefix cache)."""
        with autocast(self.device, self.precision):
            logits = forward(to_device(self.images.images[idx], self.device) if images else None)
        return task_losses(logits, self.all_targets(idx), self.selection.tasks)

    def soft_target_loss(self, forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor,
                         images: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 7 on images ``idx``, ``L = 1/|C| Σ_tasks ℓ``, and the values to log."""
        per_task = self.batch_losses(forward, idx, images)
        loss = per_task.sum() / len(self.selection.tasks)
        return loss, loss_dict(loss, per_task, self.selection)


def descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule=None, profile: RunProfile | None = None,
            label: str = "") -> None:
    """One optimiser step on ``loss`` (gradients cleared first), and one of the schedule; with ``profile``
    the backward pass and the update are timed as ``<label> backward`` and ``<label> update``."""
    part = profile.part if profile is not None else (lambda name: nullcontext())
    with part(f"{label} backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with part(f"{label} update"):
        optimizer.step()
        if schedule is not None:
            schedule.step()



@dataclass(frozen=True)
class Term:
    """A named term of a method's total loss, weighted by the method parameter ``weight`` (None: 1),
    so the report and the metrics list each term (as torchdistill's ``sub_terms``)."""

    name: str
    weight: str | None = None

    def factor(self, params: dict[str, Any]) -> float:
        return 1.0 if self.weight is None else float(params[self.weight])


def total_loss(terms: Sequence[Term], values: dict[str, torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
    """``Σ weight · value`` over ``terms``, in their order."""
    total = None
    for term in terms:
        part = term.factor(params) * values[term.name]
        total = part if total is None else total + part
    return total


def describe_terms(terms: Sequence[Term], params: dict[str, Any], means: dict[str, float] | None = None,
                   prefix: str = "") -> list[dict[str, Any]]:
    """The terms for the report: name, weight, the parameter that sets it and, where ``means`` (an
    epoch's means, as :meth:`StepLoop.run_epoch` returns them, keyed ``prefix + name``) has it, the
    term's mean over the last epoch trained."""
    rows = []
    for t in terms:
        row = {"term": t.name, "weight": t.factor(params), "param": t.weight}
        if means and prefix + t.name in means:
            row["last_epoch_mean"] = means[prefix + t.name]
        rows.append(row)
    return rows


def sgd_params(*, batch_size: int, weight_decay: float, batch_help: str = "images per step",
               lr_help: str = "base learning rate (poly policy)", weight_decay_help: str = "weight decay",
               poly_help: str = "power of the poly learning-rate policy") -> tuple[Param, ...]:
    """The ``Param`` rows of SGD with the poly policy, which every SGD-trained method has:
    ``batch_size``, ``lr``, ``momentum``, ``weight_decay``, ``poly_power``."""
    return (
        Param("batch_size", batch_size, batch_help, minimum=2),
        Param("lr", 0.01, lr_help, minimum=0.0),
        Param("momentum", 0.9, "SGD momentum", minimum=0.0),
        Param("weight_decay", weight_decay, weight_decay_help, minimum=0.0),
        Param("poly_power", 0.9, poly_help, minimum=0.0),
    )


def columns(outputs: list[int]) -> slice | list[int]:
    """``outputs`` as an index of the columns: a slice when they are consecutive (a view, no gather and no
    scatter in the backward pass, e.g. every output of a teacher), else the list."""
    if outputs and outputs == list(range(outputs[0], outputs[0] + len(outputs))):
        return slice(outputs[0], outputs[0] + len(outputs))
    return outputs


def loss_dict(loss: torch.Tensor, per_task: torch.Tensor, selection: TaskSelection) -> dict[str, torch.Tensor]:
    """``{"loss", "teacher:<name>" (mean over its tasks), "task:<name>"}`` for metrics and events, as
    0-d tensors where they were computed (the step loop brings them to the host: ``StepLoop``)."""
    per_task = per_task.detach()
    out = {"loss": loss.detach()}
    for n, teacher in enumerate(selection.teachers):
        idx = [i for i, t in enumerate(selection.tasks) if t.teacher == n]
        if idx:
            out[f"teacher:{teacher.name}"] = per_task[columns(idx)].mean()
    out.update({f"task:{t.name}": per_task[i] for i, t in enumerate(selection.tasks)})
    return out


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return batch_count(n_images, batch_size)


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
