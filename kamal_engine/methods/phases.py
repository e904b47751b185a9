"""The training phases the methods share: epochs of SGD with the poly policy, a student block's phase
and the fine-tuning of the branched TargetNet.

A method supplies its per-step loss, ``loss(idx) -> (loss tensor, values to log)``, and its batches;
the phase does the rest, once for every method: the stage event, which modules train and which stay
frozen, the optimiser and schedule, the optimiser step (:func:`~.common.descend`), the epochs
through the run's step loop (progress, ETA, metrics, cancellation, the NaN check) and, for the
fine-tuning, resuming from the run's checkpoint (``docs/architecture.md``, "Adding a method").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..backbones.blocks import BlockNet
from ..events import StageStarted
from ..training import StepLoop, poly_schedule, set_mode
from .common import RunContext, descend

Loss = Callable[[torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]  # batch indices -> (loss, logged values)


@dataclass
class Phase:
    """What one phase trains: its stage (and block) in the events, the modules trained (train mode,
    gradients) and frozen (eval mode, none), the base rate and the epochs; ``parameters`` are the
    optimiser's parameters or parameter groups when not simply all of ``trainable``'s; ``extra`` are
    modules among those parameters whose mode and gradients are their own (adaptive-ka's λ, fixed
    with ``scale = "off"``): left as they are, but reduced with ``trainable`` in a distributed run;
    ``unused``: a step may leave some parameters without a gradient (adaptive-ka's bridge of a teacher
    no image of the batch selected), which DDP must then look for."""

    stage: str
    trainable: Sequence[nn.Module]
    frozen: Sequence[nn.Module]
    lr: float
    epochs: int
    steps_per_epoch: int
    block: int | None = None
    name: str | None = None
    blocks: int | None = None
    epoch_offset: int = 0  # epochs are numbered from epoch_offset + 1 in the events and metrics
    parameters: list | None = None
    extra: Sequence[nn.Module] = ()
    unused: bool = False


def sgd_epochs(ctx: RunContext, loop: StepLoop, phase: Phase, batches: Callable[[int], Iterable[torch.Tensor]],
               loss: Loss, resume: dict | None = None, after_epoch: Callable[[int, dict], None] | None = None) -> None:
    """``phase.epochs`` epochs of SGD (``ctx.params``' momentum and weight decay) with the poly policy
    from ``phase.lr`` to 0 on ``loss``; ``batches(epoch)`` gives one epoch's index batches.

    Epoch by epoch resumable: ``resume`` (as ``after_epoch`` got it: ``epochs_done``, ``optimizer``,
    ``schedule``) continues after its last epoch; ``after_epoch(epoch, state)`` is called after every
    epoch with that state, to be checkpointed."""
    total = phase.epochs * phase.steps_per_epoch
    ctx.emit(StageStarted(phase.stage, phase.block, phase.name, phase.blocks, phase.epochs, total))
    set_mode(phase.trainable, phase.frozen)
    optimizer = ctx.sgd(phase.parameters or [q for m in phase.trainable for q in m.parameters()], phase.lr,
                        fused=not phase.unused)
    schedule = poly_schedule(optimizer, total, ctx.params["poly_power"])
    done = (resume or {}).get("epochs_done", 0)
    if done:
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])

    label = phase.stage if phase.name is None else f"{phase.stage} {phase.name}"
    profile, world = ctx.profile, ctx.world
    objective = world.objective([*phase.trainable, *phase.extra], loss, phase.unused)  # distributed: DDP

    def step(idx: torch.Tensor) -> dict[str, float]:
        with profile.part(f"{label} forward", len(idx)):
            value, logged = objective(idx)
        descend(value, optimizer, schedule, profile, label)
        return world.average(logged)

    first = phase.epoch_offset + 1
    for epoch in range(first + done, first + phase.epochs):
        loop.run_epoch(iter(batches(epoch)), step, phase.stage, phase.block, epoch)
        world.settle(phase.trainable)  # every rank with rank 0's batch-norm statistics, as the checkpoint
        if after_epoch is not None:
            after_epoch(epoch, {"epochs_done": epoch - phase.epoch_offset, "optimizer": optimizer.state_dict(),
                                "schedule": schedule.state_dict()})


def train_block(ctx: RunContext, loop: StepLoop, student: BlockNet, k: int, filters: Iterable[nn.Module], *,
                epochs: int, steps_per_epoch: int, batches: Callable[[], Iterable[torch.Tensor]], loss: Loss,
                epoch_offset: int = 0) -> None:
    """A block-wise method's phase for student block k (1-based): ``T^k`` and its teacher-level filters
    are trained at the base rate ``lr``, the student's earlier blocks ``T^1..T^{k-1}`` stay frozen."""
    blocks = list(student.blocks)
    phase = Phase("amalgamate", [blocks[k - 1], *filters], blocks[:k - 1], ctx.params["lr"], epochs, steps_per_epoch,
                  k, student.block_names[k - 1], len(blocks), epoch_offset)
    sgd_epochs(ctx, loop, phase, lambda epoch: batches(), loss)


def finetune(ctx: RunContext, loop: StepLoop, net: nn.Module, *, phase: int, blocks: int, steps_per_epoch: int,
             batches: Callable[[torch.Generator], Iterable[torch.Tensor]],
             loss: Callable[[torch.Generator], Loss]) -> None:
    """The last phase of the block-wise methods: the whole branched TargetNet ``net`` trained for
    ``finetune_epochs`` at ``finetune_lr``; a resumed run whose fine-tuning had finished loads it.

    ``blocks`` is the student's block count (for the events); ``batches(draw)`` and ``loss(draw)`` get
    the phase's generator (:meth:`RunContext.seeded`)."""
    p, saved = ctx.params, ctx.saved()
    if saved.get("finetuned"):
        net.load_state_dict(saved["targetnet"])
        return
    if p["finetune_epochs"] <= 0:
        return
    draw = ctx.seeded(phase)
    sgd_epochs(ctx, loop, Phase("finetune", [net], [], p["finetune_lr"], p["finetune_epochs"], steps_per_epoch,
                                blocks=blocks), lambda epoch: batches(draw), loss(draw))
    ctx.save(loop, finetuned=True, targetnet=net.state_dict())
