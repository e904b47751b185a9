"""``kd``: plain multi-teacher knowledge distillation of the selected outputs (Hinton et al., 2015).

The baseline of the comparison tables. A student of the chosen architecture gets a new classifier
with one output per selected label and is trained end to end on the unlabeled images against the
teachers' soft predictions, with the same soft-target cross entropy as filtered-KA's Eq. 7
(binary per multi-label output, renormalised softmax per multi-class task; temperature 1, since
multi-label sigmoid outputs have none). Initialised from a teacher (all but the classifier) or
randomly. Same optimiser and schedule as ``filtered-ka``; by default as many passes over the data
(4 blocks x 3 epochs + 3 fine-tuning epochs = 15). Checkpoints after every epoch.
"""

from __future__ import annotations

import torch

from ..events import StageStarted
from ..training import poly_schedule, set_mode
from . import MethodInfo, MethodResult, Param
from .common import RunContext, steps_per_epoch, whole_student


def run(ctx: RunContext) -> MethodResult:
    p, selection, device = ctx.params, ctx.selection, ctx.device
    target = whole_student(ctx).to(device)
    n_blocks = len(target.trunk)
    images, batch = ctx.images, p["batch_size"]
    spe = steps_per_epoch(len(images), batch)
    total = p["epochs"] * spe
    state = ctx.checkpoint.load() or {}
    done = state.get("epochs_done", 0)
    if done:
        target.load_state_dict(state["targetnet"])
    loop = ctx.loop(total, state.get("step", 0))
    ctx.emit(StageStarted("train", None, None, n_blocks, p["epochs"], total))
    set_mode([target], [t.model for t in selection.teachers])
    optimizer = ctx.sgd(target.parameters(), p["lr"])
    schedule = poly_schedule(optimizer, total, p["poly_power"])
    if done:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])

    def step(idx):
        return ctx.soft_target_step(lambda x: target(ctx.student_preprocessing(x)), idx, optimizer, schedule)

    for epoch in range(done + 1, p["epochs"] + 1):
        torch.manual_seed(ctx.phase_seed(epoch))
        loop.run_epoch(images.batches(batch, torch.Generator().manual_seed(ctx.phase_seed(epoch))), step,
                       "train", None, epoch)
        ctx.checkpoint.save({"epochs_done": epoch, "step": loop.state.step, "targetnet": target.state_dict(),
                             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
    target.eval()
    return MethodResult(target, "stage", {"epochs": p["epochs"]})


METHOD = MethodInfo(
    id="kd",
    mode="data",
    title="Knowledge distillation (baseline)",
    paper="Hinton et al., Distilling the Knowledge in a Neural Network, 2015",
    summary="One student with a new classifier for the selected labels, trained end to end on unlabeled images "
            "against the teachers' soft predictions: the baseline the amalgamation methods are compared to.",
    params=(
        Param("epochs", 15, "epochs over the unlabeled images", minimum=1),
        Param("batch_size", 16, "images per step", minimum=2),
        Param("lr", 0.01, "base learning rate (poly policy)", minimum=0.0),
        Param("momentum", 0.9, "SGD momentum", minimum=0.0),
        Param("weight_decay", 5e-3, "weight decay", minimum=0.0),
        Param("poly_power", 0.9, "power of the poly learning-rate policy", minimum=0.0),
    ),
    run=run,
)
