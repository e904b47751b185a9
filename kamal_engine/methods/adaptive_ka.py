"""``adaptive-ka``: a customised student from heterogeneous teachers (Shen et al., ICCV 2019).

``adaptive-ka-heterogeneous-teachers.txt``. Teachers ("source nets") may cover the same label and
differ in architecture; a label may be selected from every teacher that has it.

* **Stage 1**: one *component net* per selected task (a label, or a multi-class task), learned from
  the teachers covering it.
* **Stage 2**: the component nets are amalgamated the same way into the *target net*, which has
  every selected output. The component nets are kept as by-products in ``components/`` of the run
  folder, as native teacher bundles: the paper's modular units, usable as teachers of a later run.
* ``variant = "one-shot"``: the teachers straight into the target net (the paper's Table 9
  comparison).

One amalgamation round (:class:`AmalgamationRound`) trains a student on the unlabeled images with
Eq. 8, ``L = Σ_{l<L} (L_a^{l,t_se} + L_reg^{l,t_se}) + L_soft^{t_se}``:

* **Selective learning** (Eq. 5-6): for every image, the teacher with the least entropy impurity
  of its prediction is chosen. For a multi-label output the impurity is the binary entropy of its
  sigmoid; for a multi-class task the entropy of the softmax over the selected classes. Entropies
  are divided by their maximum (ln 2, ln K) so tasks of different kinds compare.
* **Transfer bridge** (Eq. 1-4, :mod:`kamal_engine.methods.bridge`) at every student block, paired with
  the selected teacher's block of the same relative depth. The head (pooling + classifier) is the
  L-th block, whose output is the score vector of Eq. 7.
* **Soft-target loss with a learnable scale** (Eq. 7): ``1/C_cls ||F_s − λ_t F_t||²`` on the logits.

Readings where the paper leaves room:

* A round whose teachers cover different tasks (stage 2, one-shot) has no single "least ambiguous
  teacher" for every output. Each task's soft target comes from the least ambiguous teacher among
  those covering *that task*; the transfer bridge follows the teacher whose mean impurity over the
  tasks it covers is least. In stage 1 (one task) both are the paper's ``t_se``.
* ``λ_t`` "compensates the scale difference" between teachers. Unconstrained, ``λ_t → 0`` with the
  student's logits is a descent direction of Eq. 7 whenever the fit is imperfect (a collapse like
  the one Eq. 3 prevents for the features). ``scale = "relative"`` (default) therefore learns only
  the teachers' scales relative to each other, ``λ_t = exp(s_t − mean_t s_t)`` (geometric mean 1; a
  single teacher keeps λ = 1); ``scale = "free"`` is Eq. 7 as printed (λ_t learned, from 1); ``"off"``
  fixes λ = 1. λ is not weight-decayed.
* Ablations (the paper's Table 8): ``transfer_bridge = false`` drops L_a and L_reg;
  ``selective = false`` learns from every covering teacher with equal weight.

The paper's optimiser settings are in its supplementary material, which we do not have: SGD with
momentum 0.9, the poly policy and weight decay 5e-4 are our choice (the other methods' schedule).

Seeds (:meth:`~.common.RunContext.seeded`): component i (1-based) is phase i, the target net phase
|tasks| + 1; epoch e of phase n draws its batches from phase 1000 n + e.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import build_model, split_model
from ..backbones.blocks import BlockNet
from ..errors import KamalError
from ..preprocessing import Preprocessing
from ..teacher import Teacher
from ..training import StepLoop, autocast, set_mode, to_device
from . import MethodInfo, MethodResult, Param
from .bridge import TransferBridge, paired_block
from .common import RunContext, sgd_params, whole_net
from .phases import Phase, sgd_epochs


def entropy_impurity(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Eq. 5, ``I(p) = −Σ_i p_i log p_i`` per sample, divided by its maximum (ln 2 or ln K).

    ``kind = "multilabel"``: ``logits`` (N, 1), the binary entropy of the sigmoid (averaged over the
    columns when there are several); ``"multiclass"``: (N, K), the entropy of the softmax.
    """
    logits = logits.float()
    if kind == "multilabel":
        p = torch.sigmoid(logits)
        # -p log p - (1-p) log(1-p), written with logsigmoid so a saturated output gives 0, not NaN
        h = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))
        return (h / math.log(2)).mean(1)
    log_p = F.log_softmax(logits, dim=1)
    h = -(log_p.exp() * log_p).sum(1)
    return h / math.log(logits.shape[1]) if logits.shape[1] > 1 else h


def select_teacher(impurity: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``t_se = argmin_t I(p^t(x))`` per sample; ``impurity`` (N, T), ``inf`` where a teacher
    does not cover the task. Ties go to the teacher listed first."""
    return impurity.argmin(1)


class LogitScale(nn.Module):
    """λ_t of Eq. 7, one per teacher of a round (see the module docstring for the three modes)."""

    def __init__(self, teachers: int, mode: str = "relative"):
        super().__init__()
        if mode not in ("relative", "free", "off"):
            raise ValueError(f"unknown scale mode {mode!r}")
        self.mode = mode
        self.raw = nn.Parameter(torch.ones(teachers) if mode == "free" else torch.zeros(teachers),
                                requires_grad=mode != "off")

    def forward(self) -> torch.Tensor:
        if self.mode == "free":
            return self.raw
        if self.mode == "off":
            return torch.ones_like(self.raw)
        return torch.exp(self.raw - self.raw.mean())


@dataclass
class RoundTask:
    """A task of one round: its outputs' positions among the round student's outputs."""

    name: str
    kind: str
    positions: tuple[int, ...]
    labels: tuple[str, ...]


@dataclass
class Source:
    """A teacher of one round: a frozen network as blocks, how it sees an image, and which of its
    output columns stand for each round task it covers (``columns[task index]``)."""

    name: str
    net: BlockNet
    preprocessing: Preprocessing
    columns: dict[int, tuple[int, ...]]


class AmalgamationRound(nn.Module):
    """Eq. 8 for one student and its teachers; holds the transfer bridges and the scales λ_t."""

    def __init__(self, student: BlockNet, student_preprocessing: Preprocessing, sources: Sequence[Source],
                 tasks: Sequence[RoundTask], params: dict[str, Any]):
        super().__init__()
        self.student, self.student_preprocessing = student, student_preprocessing
        self.sources, self.tasks = list(sources), list(tasks)
        self.selective, self.use_bridge = params["selective"], params["transfer_bridge"]
        self.outputs = sum(len(t.positions) for t in self.tasks)
        shapes = student.output_shapes(student_preprocessing.input_size)
        self.pairs: list[tuple[int, int, int]] = []  # (student block, source index, source block), 1-based blocks
        bridges = {}
        for t, src in enumerate(self.sources):
            src_shapes = src.net.output_shapes(src.preprocessing.input_size)
            for l in range(1, len(shapes) + 1):
                m = paired_block(l, len(shapes), len(src_shapes))
                self.pairs.append((l, t, m))
                bridges[f"{l}_{t}"] = TransferBridge(shapes[l - 1], src_shapes[m - 1])
        self.bridges = nn.ModuleDict(bridges if self.use_bridge else {})
        self.scale = LogitScale(len(self.sources), params["scale"])
        covers = torch.zeros(len(self.tasks), len(self.sources), dtype=torch.bool)
        for t, src in enumerate(self.sources):
            for i in src.columns:
                covers[i, t] = True
        if not covers.any(1).all():
            raise ValueError("every task of a round needs a teacher")
        self.register_buffer("covers", covers, persistent=False)

    def weights(self, impurity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample weights of each teacher: for each task's soft target (N, tasks, T) and for the
        transfer bridge (N, T). One-hot on the least ambiguous teacher (Eq. 6), or uniform over the
        covering teachers without selective learning."""
        covers = self.covers.to(impurity.device)
        if self.selective:
            per_task = F.one_hot(select_teacher(impurity.flatten(0, 1)), len(self.sources)).float()
            per_task = per_task.view(*impurity.shape)
        else:
            per_task = covers.float().unsqueeze(0).expand(impurity.shape[0], -1, -1)
            per_task = per_task / per_task.sum(2, keepdim=True)
        covering = covers.any(0)  # teachers covering at least one task
        mean_impurity = torch.where(covers, impurity, torch.zeros_like(impurity)).sum(1) / covers.sum(0).clamp(min=1)
        mean_impurity = torch.where(covering, mean_impurity, torch.full_like(mean_impurity, math.inf))
        if self.selective:
            feature = F.one_hot(select_teacher(mean_impurity), len(self.sources)).float()
        else:
            feature = (covering.float() / covering.sum()).expand(impurity.shape[0], -1)
        return per_task, feature

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of Eq. 8 on uint8 ``images``, each a per-sample mean, plus the feature teacher's
        weights (``"feature_weights"``, (N, T)) for logging."""
        features = self.student.features(self.student_preprocessing(images))
        logits = self.student.head(features[-1]).float()
        n = images.shape[0]
        teacher_features, teacher_logits = [], []
        with torch.no_grad():
            for src in self.sources:
                feats = src.net.features(src.preprocessing(images))
                teacher_features.append(feats)
                teacher_logits.append(src.net.head(feats[-1]).float())
            impurity = torch.full((n, len(self.tasks), len(self.sources)), math.inf, device=logits.device)
            for t, src in enumerate(self.sources):
                for i, cols in src.columns.items():
                    impurity[:, i, t] = entropy_impurity(teacher_logits[t][:, list(cols)], self.tasks[i].kind)
            per_task, feature = self.weights(impurity)
        lam = self.scale()
        soft = logits.new_zeros(n)
        for t, src in enumerate(self.sources):
            for i, cols in src.columns.items():
                w = per_task[:, i, t]
                if not bool(w.any()):
                    continue
                student_scores = logits[:, list(self.tasks[i].positions)]
                error = (student_scores - lam[t] * teacher_logits[t][:, list(cols)]).pow(2).sum(1)
                soft = soft + w * error
        soft = soft / self.outputs  # Eq. 7: 1/C_cls ||F_s − λ_t F_t||²
        transfer, reg = logits.new_zeros(n), logits.new_zeros(n)
        if self.use_bridge:
            for l, t, m in self.pairs:
                w = feature[:, t]
                if not bool(w.any()):
                    continue
                bridge = self.bridges[f"{l}_{t}"]
                transfer = transfer + w * bridge(features[l - 1], teacher_features[t][m - 1])
                reg = reg + w * bridge.regulariser()
        total = transfer + reg + soft
        return {"loss": total.mean(), "soft": soft.mean(), "transfer": transfer.mean(), "reg": reg.mean(),
                "per_sample": total.detach(), "feature_weights": feature}


def slug(name: str) -> str:
    """A file-name-safe form of a task name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def new_network(ctx: RunContext, outputs: int, width: int) -> tuple[nn.Module, dict[str, Any]]:
    """A student-architecture network with ``outputs`` outputs (``width`` > 0 overrides its width),
    starting from the initial student's weights wherever the shapes agree."""
    kwargs = dict(ctx.student_arch_kwargs)
    if width:
        if ctx.student_arch not in ("smallnet", "lenet5"):
            raise KamalError(f"component_width works with the smallnet and lenet5 students, not {ctx.student_arch}; "
                             "set component_width = 0 (the student's own width)")
        kwargs["width"] = width
    model = build_model(ctx.student_arch, outputs, **kwargs)
    own, initial = model.state_dict(), ctx.student.state_dict()
    model.load_state_dict({k: v for k, v in initial.items() if k in own and own[k].shape == v.shape}, strict=False)
    return model, kwargs


def train_round(ctx: RunContext, loop: StepLoop, phase: int, stage: str, model: nn.Module, sources: list[Source],
                round_tasks: list[RoundTask], epochs: int, title: tuple[int | None, str | None, int | None],
                components: dict[str, dict]) -> AmalgamationRound:
    """One round (Eq. 8) of ``model`` for ``epochs`` epochs, resumed from a checkpoint of this phase;
    the round's ``selection_share`` says how often each teacher was selected in the last epoch."""
    p, device, images = ctx.params, ctx.device, ctx.images
    spe = images.steps_per_epoch(p["batch_size"])  # a distributed run: this rank's steps
    ctx.seeded(phase)  # the bridges' initial weights
    model.to(device)
    round_ = AmalgamationRound(split_model(model, ctx.student_arch, p["granularity"]), ctx.student_preprocessing,
                               sources, round_tasks, p).to(device)
    current = ctx.saved().get("current") or {}
    resume = current if current.get("phase") == phase else None
    if resume:
        model.load_state_dict(current["model"])
        round_.load_state_dict(current["round"])
    share = torch.zeros(len(sources), device=device)  # the feature teacher's weights summed over the epoch's images

    def batches(epoch: int):
        share.zero_()
        return images.batches(p["batch_size"], ctx.seeded(phase * 1000 + epoch))

    def loss(idx: torch.Tensor):
        with autocast(device, ctx.precision):
            terms = round_(to_device(images.images[idx], device))
        weights = terms["feature_weights"].detach().float()  # everything stays on the device (StepLoop)
        totals = weights.sum(0)
        share.add_(totals)
        out = {k: terms[k].detach() for k in ("loss", "soft", "transfer", "reg")}
        weighted = (weights * terms["per_sample"].detach().float()[:, None]).sum(0)
        if ctx.world.distributed:  # every rank logs the same keys: the teachers the whole step's batch selected
            weighted, totals = ctx.world.sum(torch.stack([weighted, totals])).to(device)
        per_teacher = weighted / totals.clamp_min(1e-12)
        selected = totals.gt(0).tolist()  # this method's one wait per step: which teachers the batch selected
        for t, src in enumerate(sources):  # a teacher no image of the batch selected: not logged this step
            if selected[t]:
                out[f"teacher:{src.name}"] = per_teacher[t]
        return terms["loss"], out

    def checkpoint(epoch: int, state: dict) -> None:
        ctx.save(loop, components=components, current={"phase": phase, **state, "model": model.state_dict(),
                                                        "round": round_.state_dict(),
                                                        "share": ctx.world.sum(share).tolist()})

    block, block_name, blocks = title
    trainable = list(model.parameters()) + list(round_.bridges.parameters())
    parameters = [{"params": trainable}, {"params": [round_.scale.raw], "weight_decay": 0.0}]  # λ not decayed
    phase_ = Phase(stage, [model, round_.bridges], [s.net for s in sources], p["lr"], epochs, spe, block, block_name,
                   blocks, parameters=parameters, extra=[round_.scale], unused=True)
    sgd_epochs(ctx, loop, phase_, batches, loss, resume=resume, after_epoch=checkpoint)
    model.eval()
    round_.eval()
    last = current["share"] if resume and resume["epochs_done"] >= epochs else ctx.world.sum(share).tolist()
    round_.selection_share = {s.name: v / max(1e-9, sum(last)) for s, v in zip(sources, last)}
    return round_


def teachers_of(selection, granularity: str, task_index: int | None) -> list[Source]:
    """Stage 1 (one task): the teachers covering it; one-shot (None): every teacher covering a task."""
    sources, tasks = [], selection.tasks
    for n, teacher in enumerate(selection.teachers):
        covered = selection.covered_by(n)
        if task_index is not None:
            columns = {0: cols for task, cols in covered if task is tasks[task_index]}
        else:
            columns = {tasks.index(task): cols for task, cols in covered}
        if columns:
            sources.append(Source(teacher.name, teacher.blocks(granularity), teacher.preprocessing, columns))
    return sources


def component_net(ctx: RunContext, loop: StepLoop, i: int, components: dict[str, dict]
                  ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Stage 1 for task i (1-based): its component net (trained, or as a resumed run had finished it),
    its constructor arguments and its report entry; saved in ``components/`` of the run folder."""
    p, task = ctx.params, ctx.selection.tasks[i - 1]
    ctx.seeded(i)  # the new classifier's draw does not depend on earlier phases
    model, kwargs = new_network(ctx, len(task.labels), p["component_width"])
    round_tasks = [RoundTask(task.name, task.kind, tuple(range(len(task.labels))), tuple(task.labels))]
    sources = teachers_of(ctx.selection, p["granularity"], i - 1)
    entry: dict[str, Any] = {"teachers": [s.name for s in sources]}
    if task.name in components:
        model.load_state_dict(components[task.name]["model"])
        model.to(ctx.device).eval()
    else:
        round_ = train_round(ctx, loop, i, "component", model, sources, round_tasks, p["component_epochs"],
                             (i, task.name, len(ctx.selection.tasks)), components)
        components[task.name] = {"model": model.state_dict(), "share": round_.selection_share,
                                 "scales": {s.name: float(v) for s, v in zip(sources, round_.scale().detach().cpu())}}
        ctx.save(loop, components=components, current=None)
    entry["selection_share"] = components[task.name]["share"]
    entry["scales"] = components[task.name]["scales"]
    if ctx.output_dir is not None and ctx.world.main:  # a distributed run: rank 0 writes
        path = ctx.output_dir / "components" / f"{slug(task.name)}.kamal.pt"
        Teacher(f"component-{slug(task.name)}", ctx.student_arch, list(task.labels), task.kind,
                ctx.student_preprocessing, model, arch_kwargs=kwargs).save(path)
        entry["file"] = str(path)
    if ctx.evaluate is not None:
        evaluation = ctx.evaluate(whole_net(model, ctx.student_arch, kwargs, list(task.labels), round_tasks))
        entry["validation"] = {"ap": evaluation.ap, "mean_ap": evaluation.mean_ap, "accuracy": evaluation.accuracy}
    return model, kwargs, entry


def run(ctx: RunContext) -> MethodResult:
    """Two-stage: a component net per task, then the target net from them; one-shot: the target net from
    the teachers."""
    p, selection, tasks = ctx.params, ctx.selection, ctx.selection.tasks
    spe = ctx.images.steps_per_epoch(p["batch_size"])  # a distributed run: this rank's steps
    two_stage = p["variant"] == "two-stage"
    for t in selection.teachers:
        t.model.to(ctx.device)
    set_mode([], [t.model for t in selection.teachers])
    loop = ctx.loop((len(tasks) * p["component_epochs"] * spe if two_stage else 0) + p["target_epochs"] * spe)
    report: dict[str, Any] = {"variant": p["variant"], "granularity": p["granularity"]}
    if two_stage:
        components = dict(ctx.saved().get("components", {}))
        nets = [component_net(ctx, loop, i, components) for i in range(1, len(tasks) + 1)]
        report["components"] = {task.name: entry for task, (_, _, entry) in zip(tasks, nets)}
        sources = [Source(f"component:{task.name}", split_model(model, ctx.student_arch, p["granularity"]),
                          ctx.student_preprocessing, {i: tuple(range(len(task.labels)))})
                   for i, (task, (model, _, _)) in enumerate(zip(tasks, nets))]
        set_mode([], [model for model, _, _ in nets])
    else:
        components, sources = {}, teachers_of(selection, p["granularity"], None)
    target_tasks = [RoundTask(t.name, t.kind, tuple(t.positions), tuple(t.labels)) for t in tasks]
    round_ = train_round(ctx, loop, len(tasks) + 1, "target", ctx.student, sources, target_tasks, p["target_epochs"],
                         (None, None, None), components)
    report["target"] = {"teachers": [s.name for s in sources], "selection_share": round_.selection_share,
                        "scales": {s.name: float(v) for s, v in zip(sources, round_.scale().detach().cpu())}}
    net = whole_net(ctx.student.cpu(), ctx.student_arch, ctx.student_arch_kwargs, selection.labels, tasks)
    net.to(ctx.device).eval()
    return MethodResult(net, "stage", report)


METHOD = MethodInfo(
    id="adaptive-ka",
    mode="data",
    title="Adaptive knowledge amalgamation (heterogeneous teachers)",
    paper="Shen et al., Customizing Student Networks From Heterogeneous Teachers via Adaptive Knowledge "
          "Amalgamation, ICCV 2019",
    summary="Teachers may share labels and differ in architecture. For every image the student learns from the "
            "least ambiguous teacher (entropy), its features through a transfer bridge and its logits with a "
            "learnable scale: first one component net per task, then the target net from the component nets.",
    params=(
        Param("variant", "two-stage", "'two-stage': component nets, then the target net; 'one-shot': the teachers "
              "straight into the target net", choices=("two-stage", "one-shot")),
        Param("component_epochs", 6, "epochs over the unlabeled images for each component net", minimum=1),
        Param("target_epochs", 6, "epochs over the unlabeled images for the target net", minimum=1),
        Param("component_width", 0, "width of the component nets (0: the student's; the paper makes the target "
              "wider than the components)", minimum=0),
        Param("selective", True, "selective learning: each image learns from the least ambiguous teacher (Eq. 5-6); "
              "off: from every covering teacher equally"),
        Param("transfer_bridge", True, "feature alignment and its regulariser (Eq. 1-4); off: logits only"),
        Param("scale", "relative", "λ_t of Eq. 7: 'relative' (teachers' scales relative to each other), 'free' "
              "(as printed), 'off' (λ = 1)", choices=("relative", "free", "off")),
        Param("granularity", "stage", "blocks the transfer bridges sit after: 'stage' or 'unit'",
              choices=("stage", "unit")),
        *sgd_params(batch_size=32, weight_decay=5e-4, weight_decay_help="weight decay (not on λ)"),
    ),
    run=run,
    shared_labels=True,
    distributed=True,
    soft_targets=False,
)
