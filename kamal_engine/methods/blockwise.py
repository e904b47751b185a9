"""What the block-wise methods (``filtered-ka``, ``dual-gan``) share: the student and the teachers
paired block by block, the trained teacher-level filters in a checkpoint, resuming the finished
blocks, and Eq. 10's regrouping into the branched TargetNet, evaluated by block and fine-tuned
(``docs/architecture.md``, "Adding a method").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..backbones import split_model
from ..backbones.blocks import BlockNet
from ..branchplan import BranchSizes, PlanSpace, budget_parameters, choose_plan, over_budget, parse_branch_at
from ..errors import KamalError
from ..events import BlockConverged, BranchPlanChosen, BranchPlansMeasured, RunWarning, StageStarted
from ..filters import build_filter, filter_spec
from ..profile import count_parameters
from ..targetnet import Branch, BranchSpec, TargetNet, TaskGroup
from ..training import StepLoop
from . import Param
from .common import RunContext, columns
from .phases import Loss, finetune


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
        tail = [copy.deepcopy(b) for b in list(net.blocks)[k:]]
        branches.append(Branch(copy.deepcopy(filters[(k, n)]), tail, copy.deepcopy(net.head), outputs))
        branch_specs.append(spec)
    groups_out = [TaskGroup(t.kind, list(t.positions), t.name) for t in selection.tasks]
    return TargetNet([copy.deepcopy(b) for b in trunk_blocks], trunk_names, branches, branch_specs, selection.labels,
                     groups_out)


@dataclass
class PairedBlocks:
    """Student block k paired with block k of every teacher, and the filter spec joining them."""

    student: BlockNet
    teachers: list[BlockNet]
    student_shapes: list[tuple[int, ...]]  # (C, H, W) of each student block's output
    specs: list[list[dict]]  # specs[k-1][n]: student block k -> teacher n's block k+1
    teacher_shapes: list[list[tuple[int, ...]]]  # teacher_shapes[n][k-1]: (C, H, W) of teacher n's block k
    active: list[int]  # the teachers with selected tasks
    outputs: dict[int, list[int]]  # outputs[n]: teacher n's selected output columns, in task order

    @property
    def names(self) -> list[str]:
        return self.student.block_names

    def through_teachers(self, k: int, feature: torch.Tensor, filters: dict[int, torch.nn.Module]) -> torch.Tensor:
        """Eq. 6: the student's block-k ``feature`` through every active teacher n's filter f_k^n and its
        blocks after k and head; the selected outputs side by side, in task order."""
        return torch.cat([self.teachers[n].forward_from(k, filters[n](feature))[:, columns(self.outputs[n])]
                          for n in self.active], 1)


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
    active = [n for n in range(len(teachers)) if ctx.selection.tasks_of(n)]
    outputs = {n: [o for t in ctx.selection.tasks_of(n) for o in t.outputs] for n in active}
    return PairedBlocks(student_net, teacher_nets, student_shapes, specs, teacher_shapes, active, outputs)


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
    with ctx.profile.part("ap by block"):
        for k in range(1, len(names) + 1):
            evaluation = ctx.evaluate(build({t.name: k for t in ctx.selection.tasks}).to(ctx.device))
            table[names[k - 1]] = {"ap": evaluation.ap, "mean_ap": evaluation.mean_ap}
    return table


def branch_sizes(student_net: BlockNet, teacher_nets: list[BlockNet], filters: dict, n_blocks: int) -> BranchSizes:
    """The parameter counts :meth:`BranchSizes.size` adds up for a plan (Eq. 10's parts)."""
    tails = []
    for net in teacher_nets:
        per_block = [count_parameters(b) for b in net.blocks]
        head = count_parameters(net.head)
        tails.append([sum(per_block[k:]) + head for k in range(1, n_blocks + 1)])
    return BranchSizes([count_parameters(b) for b in student_net.blocks], tails,
                       {key: count_parameters(f) for key, f in filters.items()})


def resume_blocks(ctx: RunContext, paired: PairedBlocks) -> tuple[int, dict[str, list[float]], dict]:
    """The blocks a resumed run had finished: their count, every task's converged loss per finished
    block, and the trained filters ``{(k, n): f_k^n}``; the student's weights (and, when saved, the
    filter specs) are restored, and the finished blocks' converged losses re-emitted for the plots."""
    saved = ctx.saved()
    done = saved.get("blocks_done", 0)
    converged: dict[str, list[float]] = saved.get("converged", {t.name: [] for t in ctx.selection.tasks})
    filters: dict[tuple[int, int], torch.nn.Module] = {}
    if done:
        if "specs" in saved:
            paired.specs[:] = saved["specs"]
        ctx.student.load_state_dict(saved["student"])
        filters = restore_filters(saved["filters"], paired.specs, ctx.device)
    for k in range(1, done + 1):
        ctx.emit(BlockConverged(k, paired.names[k - 1], {task: losses[k - 1] for task, losses in converged.items()}))
    return done, converged, filters


def save_block(ctx: RunContext, loop: StepLoop, k: int, converged: dict, filters: dict, **parts) -> None:
    """Checkpoint after block k: the student, every task's converged losses and the filters so far."""
    ctx.save(loop, blocks_done=k, blocks_step=loop.state.step, converged=converged,
             student=ctx.student.state_dict(), filters=filters_state(filters), **parts)


def regroup(ctx: RunContext, loop: StepLoop, paired: PairedBlocks, filters: dict, plan: dict[str, int],
            report: dict, *, phase: int, steps_per_epoch: int,
            batches: Callable[[torch.Generator], Iterable[torch.Tensor]],
            loss: Callable[[TargetNet, torch.Generator], Loss]) -> TargetNet:
    """Step III of the block-wise methods: with a validation set (and ``ap_by_block``) the AP of every
    task branching at each block goes into ``report`` (the filtered-KA paper's Fig. 3), then the
    TargetNet of ``plan`` is built (Eq. 10) and fine-tuned (:func:`~.phases.finetune`)."""
    def build(plan_: dict[str, int]) -> TargetNet:
        return assemble(plan_, list(paired.student.blocks), paired.names, paired.teachers, filters, paired.specs,
                        ctx.selection, ctx.params["granularity"])

    if ctx.evaluate is not None and ctx.params["ap_by_block"] and "ap_by_block" not in report:
        report["ap_by_block"] = ap_by_block(ctx, build, paired.names)  # before fine-tuning, as the paper's Fig. 3
    net = build(plan).to(ctx.device)
    finetune(ctx, loop, net, phase=phase, blocks=len(paired.names), steps_per_epoch=steps_per_epoch,
             batches=batches, loss=lambda draw: loss(net, draw))
    net.eval()
    return net


# --- the branch plan (Eq. 9, 10 and 18, with the user's budget) -------------------------------------

def plan_params(max_params: float, rule: str) -> tuple[Param, ...]:
    """The parameters choosing the branch plan (:func:`~kamal_engine.branchplan.choose_plan`); ``rule`` names
    the method's own rule (Eq. 9 or Eq. 18) for the help texts."""
    return (
        Param("max_params", max_params, "the TargetNet has at most this many parameters: up to 100 a multiple of "
              "the summed parameters of the teachers it learns from (0.6: 60 %), above 100 a count; when the plan "
              f"of {rule} is bigger, the plan of least total converged loss that fits is taken; 0: no budget",
              minimum=0.0),
        Param("branch_tolerance", 0.0, "ε: each task branches at the deepest block whose converged loss is within "
              f"(1 + ε) × its minimum (more shared blocks, a smaller TargetNet); 0: {rule}", minimum=0.0),
        Param("branch_at", {}, "blocks fixed by hand, label = block name (e.g. one = \"b3\"); the other labels "
              "follow branch_tolerance and max_params; empty: none"),
    )


def teachers_parameters(ctx: RunContext, paired: PairedBlocks) -> int:
    """The summed parameters of the teachers the student learns from (what ``max_params`` is a share of)."""
    return sum(count_parameters(ctx.selection.teachers[n].model) for n in paired.active)


def check_budget(ctx: RunContext, paired: PairedBlocks, *, joint: bool) -> None:
    """Before any training: ``branch_at`` names real labels and blocks, and ``max_params`` is not below what
    even the smallest TargetNet needs without its filters (the student's trunk and the teachers' heads)."""
    fixed = parse_branch_at(ctx.params["branch_at"], ctx.selection.tasks, paired.names)
    budget = budget_parameters(ctx.params["max_params"], teachers_parameters(ctx, paired))
    if budget is None:
        return
    sizes = branch_sizes(paired.student, paired.teachers, {}, len(paired.names))
    sizes.filters = {(k, n): 0 for k in range(1, len(paired.names) + 1) for n in paired.active}
    teacher_of = {t.name: t.teacher for t in ctx.selection.tasks}
    space = PlanSpace({t.name: [0.0] * len(paired.names) for t in ctx.selection.tasks}, teacher_of, sizes,
                      joint=joint, fixed=fixed)
    least = space.smallest().parameters
    if least > budget:
        total = teachers_parameters(ctx, paired)
        raise KamalError(f"[method] max_params = {ctx.params['max_params']:g} allows {budget:,} parameters, but the "
                         f"smallest TargetNet of this student and these teachers has more than {least:,} "
                         f"({least / max(total, 1):.2f} x the teachers'{' with the blocks of branch_at' if fixed else ''})"
                         f": raise max_params to at least {least / max(total, 1) + 0.01:.2f} or choose a smaller student")


def plan_branches(ctx: RunContext, paired: PairedBlocks, filters: dict, converged: dict[str, list[float]],
                  report: dict, *, joint: bool, rule: str) -> dict[str, int]:
    """Step III's plan: with a validation set the AP of every task branching at each block (the paper's
    Fig. 3, into ``report``), every plan's exact size and loss (:class:`~kamal_engine.branchplan.PlanSpace`),
    the plan of the rules (``branch_at``, ``branch_tolerance``, ``max_params``); the plans and the choice go
    to the events and ``report["branch_plan"]``. ``joint``: a teacher's tasks branch together (Eq. 18)."""
    p, selection, names = ctx.params, ctx.selection, paired.names
    if ctx.evaluate is not None and p["ap_by_block"]:
        def build(plan_: dict[str, int]) -> TargetNet:
            return assemble(plan_, list(paired.student.blocks), names, paired.teachers, filters, paired.specs,
                            selection, p["granularity"])
        report["ap_by_block"] = ap_by_block(ctx, build, names)
    ap = None
    if "ap_by_block" in report:
        ap = {}
        for k, name in enumerate(names, 1):
            for label, value in report["ap_by_block"][name]["ap"].items():
                ap.setdefault(label, {})[k] = value
    sizes = branch_sizes(paired.student, paired.teachers, filters, len(names))
    teacher_of = {t.name: t.teacher for t in selection.tasks}
    labels_of = {t.name: list(t.labels) for t in selection.tasks}
    fixed = parse_branch_at(p["branch_at"], selection.tasks, names)
    space = PlanSpace(converged, teacher_of, sizes, joint=joint, fixed=fixed, ap=ap, labels_of=labels_of)
    total = teachers_parameters(ctx, paired)
    budget = budget_parameters(p["max_params"], total)
    with ctx.profile.part("plan search"):
        plan, how = choose_plan(space, p["branch_tolerance"], budget)
        front, plans = space.front(), space.candidates()
    if how == "over-budget":  # the filters' sizes are known only now; check_budget refused what it could before
        ctx.emit(RunWarning(over_budget(plan, budget, total, names, bool(fixed))))
    plain = PlanSpace(converged, teacher_of, sizes, joint=joint, ap=ap, labels_of=labels_of)
    eq9 = plain.plan(plain.tolerance_plan(0.0))
    for extra in (plan, eq9):
        if all(c.key() != extra.key() for c in plans):
            plans.append(extra)
    keys = [c.key() for c in plans]
    rows = [c.to_dict(names, total) for c in plans]
    measured = BranchPlansMeasured(blocks=list(names), teachers_parameters=total, plans=rows,
                                   front=[keys.index(f.key()) for f in front], chosen=keys.index(plan.key()),
                                   budget=budget, rule=how)
    ctx.emit(measured)
    ctx.emit(BranchPlanChosen(plan.named(names)))
    report["branch_plan"] = {
        "rule": how, "joint": joint, "tolerance": p["branch_tolerance"], "branch_at": plan_named(fixed, names),
        "eq9": eq9.named(names), "eq9_parameters": eq9.parameters, "budget_parameters": budget,
        "parameters": plan.parameters, "teachers_parameters": total, "chosen": rows[measured.chosen],
        "front": measured.front, "plans": rows,
    }
    return ctx.world.from_main(dict(plan.blocks))  # distributed: rank 0's plan, which alone saw the AP by block


def plan_named(blocks: dict[str, int], names) -> dict[str, str]:
    return {task: names[k - 1] for task, k in blocks.items()}
