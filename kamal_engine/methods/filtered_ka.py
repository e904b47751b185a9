"""``filtered-ka``: amalgamating filtered knowledge into a task-customised student (Ye et al., IJCAI 2019).

Algorithm 1 of ``filtered-ka-ijcai2019.txt``, block by block (Sections 3.2-3.5):

1. For block k = 1..B, the student's earlier blocks ``T^1..T^{k-1}`` are frozen. The student
   feature ``F_u^k = T^k(F_u^{k-1})`` goes through a teacher-level filter ``f_k^n`` per teacher
   (Eq. 4; :class:`~kamal_engine.filters.TeacherFilter`) and replaces teacher n's own ``F_n^k``:
   teacher n's remaining blocks and head produce ``O_un`` (Eq. 6). Only the selected outputs count
   (task-level filter g). The loss (Eq. 7) is ``L_u = 1/|C| Σ_n Σ_i ℓ(O^i_n, O^i_un)`` with ``O_n``
   the teacher's own prediction on the real image and ℓ the soft-target cross entropy of Eq. 2
   (binary per label for multi-label teachers; over the renormalised selected classes for a
   multi-class teacher). ``T^k`` and every ``f_k^n`` are trained; teachers are frozen.
2. After block k, each task's converged loss ``L^i_k`` is measured: the loss of Eq. 7 per task,
   averaged over the whole unlabeled set in eval mode with the block's final weights (reading
   "convergence loss value" of Algorithm 1 line 10 as the loss once training of the block ended).
3. Branch-out (Eq. 9): ``S_i = argmin_k L^i_k``; ties go to the deeper block (more sharing).
4. Regroup (Eq. 10) into a :class:`~kamal_engine.targetnet.TargetNet`: shared trunk up to each
   branch point, the filter ``f^n_{S_i}``, copies of teacher n's blocks after ``S_i`` and its head.
5. Fine-tune the whole TargetNet against the teachers' soft predictions (Algorithm 1 line 14).

Optimisation as in Section 4.1: SGD with the poly policy (power 0.9), base learning rate 0.01,
weight decay 5e-3 (momentum 0.9 is our choice; the paper does not give it). The paper's batch size
16 is kept as the default. When a teacher's block k differs from the student's in shape, a 1x1-conv
+ resize adapter replaces the SE filter (the paper assumes equal shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backbones import split_model
from ..backbones.blocks import BlockNet
from ..errors import KamalError
from ..events import BlockConverged, BranchPlanChosen, StageStarted
from ..filters import build_filter, filter_spec
from ..targetnet import Branch, BranchSpec, TargetNet, TaskGroup, choose_branch_points
from ..training import poly_schedule, set_mode
from . import MethodInfo, MethodResult, Param
from .common import RunContext, copy_module, steps_per_epoch


def assemble(plan: dict[str, int], trunk_blocks, trunk_names, teacher_nets, filters, specs, selection,
             granularity: str) -> TargetNet:
    """Eq. 10: the TargetNet for ``plan`` (task name → branch block), from independent copies of the parts."""
    groups: dict[tuple[int, int], list] = {}
    for task in selection.tasks:
        groups.setdefault((task.teacher, plan[task.name]), []).append(task)
    branches, branch_specs = [], []
    for (n, k), tasks in sorted(groups.items()):
        teacher, net = selection.teachers[n], teacher_nets[n]
        outputs = [o for t in tasks for o in t.outputs]
        spec = BranchSpec(block=k, source=teacher.name, arch=teacher.arch, arch_kwargs=dict(teacher.arch_kwargs),
                          num_outputs=teacher.num_outputs, granularity=granularity, filter=specs[k - 1][n],
                          outputs=outputs, positions=[p for t in tasks for p in t.positions],
                          tasks=[t.name for t in tasks])
        tail = [copy_module(b) for b in list(net.blocks)[k:]]
        branches.append(Branch(copy_module(filters[(k, n)]), tail, copy_module(net.head), outputs))
        branch_specs.append(spec)
    groups_out = [TaskGroup(t.kind, list(t.positions), t.name) for t in selection.tasks]
    return TargetNet([copy_module(b) for b in trunk_blocks], trunk_names, branches, branch_specs, selection.labels,
                     groups_out)


@dataclass
class PairedBlocks:
    """Student block k paired with block k of every teacher, and the filter spec joining them."""

    student: BlockNet
    teachers: list[BlockNet]
    student_shapes: list[tuple[int, ...]]  # (C, H, W) of each student block's output
    specs: list[list[dict]]  # specs[k-1][n]: student block k -> teacher n's block k+1

    @property
    def names(self) -> list[str]:
        return self.student.block_names


def pair_blocks(ctx: RunContext, granularity: str, reduction: int) -> PairedBlocks:
    """The student and the teachers as blocks at ``granularity``; an error naming the teacher when the
    block counts differ (the block-wise methods pair block k of the student with block k of each teacher)."""
    teachers = ctx.selection.teachers
    teacher_nets = [t.blocks(granularity) for t in teachers]
    student_net = split_model(ctx.student, ctx.student_arch, granularity)
    n_blocks = len(student_net)
    for teacher, net in zip(teachers, teacher_nets):
        if len(net) != n_blocks:
            raise KamalError(f"teacher '{teacher.name}' ({teacher.arch}) has {len(net)} blocks at '{granularity}' "
                             f"granularity and the student ({ctx.student_arch}) has {n_blocks}; {ctx.method_id} pairs "
                             "block k of the student with block k of every teacher: choose a student with as many "
                             "blocks or another granularity", teacher.source)
    student_shapes = student_net.output_shapes(ctx.student_preprocessing.input_size)
    teacher_shapes = [net.output_shapes(t.preprocessing.input_size) for t, net in zip(teachers, teacher_nets)]
    specs = [[filter_spec(student_shapes[k], teacher_shapes[n][k], reduction) for n in range(len(teachers))]
             for k in range(n_blocks)]
    return PairedBlocks(student_net, teacher_nets, student_shapes, specs)


def filters_state(filters: dict[tuple[int, int], torch.nn.Module]) -> dict[str, dict]:
    """The trained filters f_k^n for a checkpoint, keyed ``"k:n"``."""
    return {f"{k}:{n}": f.state_dict() for (k, n), f in filters.items()}


def restore_filters(saved: dict[str, dict], specs: list[list[dict]], device) -> dict[tuple[int, int], torch.nn.Module]:
    """The filters of :func:`filters_state`, rebuilt from their specs."""
    filters = {}
    for key, state_dict in saved.items():
        k, n = map(int, key.split(":"))
        filters[(k, n)] = build_filter(specs[k - 1][n]).to(device)
        filters[(k, n)].load_state_dict(state_dict)
    return filters


def ap_by_block(ctx: RunContext, build: Callable[[dict[str, int]], TargetNet], names: list[str]) -> dict:
    """The paper's Fig. 3 as a table: AP of the TargetNet with every task branching at block k."""
    ctx.emit(StageStarted("evaluate-branch-points", blocks=len(names)))
    table = {}
    for k in range(1, len(names) + 1):
        evaluation = ctx.evaluate(build({t.name: k for t in ctx.selection.tasks}).to(ctx.device))
        table[names[k - 1]] = {"ap": evaluation.ap, "mean_ap": evaluation.mean_ap}
    return table


def run(ctx: RunContext) -> MethodResult:
    p, selection, device = ctx.params, ctx.selection, ctx.device
    granularity = p["granularity"]
    teachers = selection.teachers
    paired = pair_blocks(ctx, granularity, p["reduction"])
    teacher_nets, student_net, specs = paired.teachers, paired.student, paired.specs
    n_blocks = len(student_net)
    active = [n for n in range(len(teachers)) if selection.tasks_of(n)]
    tasks_of = {n: selection.tasks_of(n) for n in active}
    outputs_of = {n: [o for t in tasks_of[n] for o in t.outputs] for n in active}
    n_tasks = len(selection.tasks)
    images, batch = ctx.images, p["batch_size"]
    spe = steps_per_epoch(len(images), batch)
    total = n_blocks * p["epochs_per_block"] * spe + p["finetune_epochs"] * spe

    ctx.student.to(device)
    for t in teachers:
        t.model.to(device)
    set_mode([], [t.model for t in teachers])

    state = ctx.checkpoint.load() or {}
    blocks_done = state.get("blocks_done", 0)
    converged: dict[str, list[float]] = state.get("converged", {t.name: [] for t in selection.tasks})
    filters: dict[tuple[int, int], torch.nn.Module] = {}
    if blocks_done:
        ctx.student.load_state_dict(state["student"])
        filters = restore_filters(state["filters"], specs, device)
    loop = ctx.loop(total, state.get("step", 0))

    def forward_tasks(k: int, x: torch.Tensor, fk: dict[int, torch.nn.Module]) -> torch.Tensor:
        """Per-task losses of Eq. 7 for student block k entangled with every teacher (Eq. 6)."""
        xs = ctx.student_preprocessing(x)
        with torch.no_grad():
            for block in list(student_net.blocks)[:k - 1]:
                xs = block(xs)
        feature = student_net.blocks[k - 1](xs)
        logits = [teacher_nets[n].forward_from(k, fk[n](feature))[:, outputs_of[n]] for n in active]
        return torch.cat(logits, 1)

    for k in range(blocks_done + 1, n_blocks + 1):
        name = student_net.block_names[k - 1]
        ctx.emit(StageStarted("amalgamate", k, name, n_blocks, p["epochs_per_block"], p["epochs_per_block"] * spe))
        torch.manual_seed(ctx.phase_seed(k))
        fk = {n: build_filter(specs[k - 1][n]).to(device) for n in active}
        block = student_net.blocks[k - 1]
        set_mode([block, *fk.values()], [*list(student_net.blocks)[:k - 1]])
        trainable = [q for m in (block, *fk.values()) for q in m.parameters()]
        optimizer = ctx.sgd(trainable, p["lr"])
        schedule = poly_schedule(optimizer, p["epochs_per_block"] * spe, p["poly_power"])
        generator = torch.Generator().manual_seed(ctx.phase_seed(k))

        def step(idx, k=k, fk=fk, optimizer=optimizer, schedule=schedule):
            return ctx.soft_target_step(lambda x: forward_tasks(k, x, fk), idx, optimizer, schedule)

        for epoch in range(1, p["epochs_per_block"] + 1):
            loop.run_epoch(images.batches(batch, generator), step, "amalgamate", k, epoch)

        # converged loss per task: the block's final weights, eval mode, the whole unlabeled set
        set_mode([], [block, *fk.values()])
        sums = torch.zeros(n_tasks)
        with torch.no_grad():
            for start in range(0, len(images), 128):
                ctx.cancel.check()
                idx = torch.arange(start, min(start + 128, len(images)))
                sums += ctx.batch_losses(lambda x: forward_tasks(k, x, fk), idx).cpu() * len(idx)
        values = {t.name: float(v) for t, v in zip(selection.tasks, sums / len(images))}
        for task, value in values.items():
            converged[task].append(value)
        ctx.emit(BlockConverged(k, name, values))
        filters.update({(k, n): f for n, f in fk.items()})
        ctx.checkpoint.save({
            "blocks_done": k, "step": loop.state.step, "converged": converged,
            "student": ctx.student.state_dict(),
            "filters": filters_state(filters),
        })

    plan = choose_branch_points(converged)
    names = student_net.block_names
    ctx.emit(BranchPlanChosen({task: names[k - 1] for task, k in plan.items()}))

    def build(plan_):
        return assemble(plan_, list(student_net.blocks), names, teacher_nets, filters, specs, selection, granularity)

    report = {
        "granularity": granularity,
        "blocks": names,
        "converged_loss": {task: dict(zip(names, losses)) for task, losses in converged.items()},
        "branch_points": {task: names[k - 1] for task, k in plan.items()},
    }
    if ctx.evaluate is not None and p["ap_by_block"]:  # before fine-tuning, as the paper's Fig. 3
        report["ap_by_block"] = ap_by_block(ctx, build, names)

    net = build(plan).to(device)
    if state.get("finetuned"):
        net.load_state_dict(state["targetnet"])
    elif p["finetune_epochs"] > 0:
        phase = n_blocks + 1
        ctx.emit(StageStarted("finetune", None, None, n_blocks, p["finetune_epochs"], p["finetune_epochs"] * spe))
        torch.manual_seed(ctx.phase_seed(phase))
        set_mode([net], [])
        optimizer = ctx.sgd(net.parameters(), p["finetune_lr"])
        schedule = poly_schedule(optimizer, p["finetune_epochs"] * spe, p["poly_power"])
        generator = torch.Generator().manual_seed(ctx.phase_seed(phase))

        def finetune_step(idx):
            return ctx.soft_target_step(lambda x: net(ctx.student_preprocessing(x)), idx, optimizer, schedule)

        for epoch in range(1, p["finetune_epochs"] + 1):
            loop.run_epoch(images.batches(batch, generator), finetune_step, "finetune", None, epoch)
        ctx.checkpoint.save({**(ctx.checkpoint.load() or {}), "finetuned": True, "step": loop.state.step,
                             "targetnet": net.state_dict()})
    net.eval()
    return MethodResult(net, granularity, report)


METHOD = MethodInfo(
    id="filtered-ka",
    mode="data",
    title="Filtered knowledge amalgamation",
    paper="Ye et al., Amalgamating Filtered Knowledge: Learning Task-customized Student from Multi-task "
          "Teachers, IJCAI 2019",
    summary="Block-wise: each student block is entangled into every teacher through a teacher-level filter and "
            "trained against the teachers' own predictions on unlabeled images; every task branches out at the "
            "block of minimum converged loss; then the branched TargetNet is fine-tuned.",
    params=(
        Param("granularity", "stage", "blocks the student is trained in: 'stage' (e.g. resnet layer1..4) or 'unit'",
              choices=("stage", "unit")),
        Param("epochs_per_block", 3, "epochs over the unlabeled images for each student block", minimum=1),
        Param("finetune_epochs", 6, "epochs fine-tuning the branched TargetNet (0: none)", minimum=0),
        Param("batch_size", 16, "images per step (paper: 16)", minimum=2),
        Param("lr", 0.01, "base learning rate of the block-wise training (paper: 0.01, poly policy)", minimum=0.0),
        Param("finetune_lr", 0.01, "base learning rate of the fine-tuning (paper: the same base rate)", minimum=0.0),
        Param("momentum", 0.9, "SGD momentum", minimum=0.0),
        Param("weight_decay", 5e-3, "weight decay (paper: 5e-3)", minimum=0.0),
        Param("poly_power", 0.9, "power of the poly learning-rate policy (paper: 0.9)", minimum=0.0),
        Param("reduction", 4, "channel reduction r of the teacher-level filters (c -> c/r)", minimum=1),
        Param("ap_by_block", True, "with a validation set: AP of every task branching at each block (paper Fig. 3)"),
    ),
    run=run,
    branches=True,
)
