"""``kd``: plain multi-teacher knowledge distillation of the selected outputs (Hinton et al., 2015).

The baseline of the comparison tables. A student of the chosen architecture gets a new classifier
with one output per selected label and is trained end to end on the unlabeled images against the
teachers' soft predictions, with the same soft-target cross entropy as filtered-KA's Eq. 7
(binary per multi-label output, renormalised softmax per multi-class task; temperature 1, since
multi-label sigmoid outputs have none). Initialised from a teacher (all but the classifier) or
randomly. Same optimiser and schedule as ``filtered-ka``; by default as many passes over the data
(4 blocks x 3 epochs + 3 fine-tuning epochs = 15). Checkpoints after every epoch. Seeds: epoch e
is phase e.
"""

from __future__ import annotations

from . import MethodInfo, MethodResult, Param
from .common import RunContext, sgd_params, whole_student
from .phases import Phase, sgd_epochs


def run(ctx: RunContext) -> MethodResult:
    """Epochs of Eq. 7 end to end, resumed after the last finished epoch."""
    p, saved = ctx.params, ctx.saved()
    target = whole_student(ctx).to(ctx.device)
    if saved.get("epochs_done"):
        target.load_state_dict(saved["targetnet"])
    spe = ctx.images.steps_per_epoch(p["batch_size"])
    loop = ctx.loop(p["epochs"] * spe)
    teachers = [t.model for t in ctx.selection.teachers]
    sgd_epochs(ctx, loop, Phase("train", [target], teachers, p["lr"], p["epochs"], spe, blocks=len(target.trunk)),
               batches=lambda epoch: ctx.images.batches(p["batch_size"], ctx.seeded(epoch)),
               loss=lambda idx: ctx.soft_target_loss(lambda x: target(ctx.student_preprocessing(x)), idx),
               resume=saved, after_epoch=lambda epoch, state: ctx.save(loop, targetnet=target.state_dict(), **state))
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
        *sgd_params(batch_size=16, weight_decay=5e-3),
    ),
    run=run,
    distributed=True,
)
