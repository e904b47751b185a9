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

Where the teachers were not fine-tuned from one backbone (README "Teachers trained apart"), four
departures, each a parameter whose other value is the paper's form:

* ``filter = "auto"``: per teacher and block, the SE gate where the student's channels are aligned
  with the teacher's (:func:`~kamal_engine.relatedness.channel_alignment`), else a 1x1-conv adapter
  started at the least-squares map between the two features (``"se"``: the paper).
* ``max_rounds_per_block``: a block trains again while a round still lowers its converged loss
  (Algorithm 1 trains to convergence; 1: the paper's fixed epochs).
* ``max_size``: the branch plan of Eq. 9 is capped so that the TargetNet is no bigger than the
  teachers it replaces (:func:`~kamal_engine.targetnet.fit_branch_plan`; 0: Eq. 10 as it falls).
* Every block is diagnosed: linear CKA and channel alignment before, and the share of each teacher's
  knowledge reproduced after (:mod:`kamal_engine.relatedness`), in the report, the events and a
  warning when a teacher's share at its branch block is below ``warn_share``.

``augment`` (consistent views for teachers and student) and ``feature_weight`` (Eq. 5's feature
term beside Eq. 7) are there to try; both are off by default.

Optimisation as in Section 4.1: SGD with the poly policy (power 0.9), base learning rate 0.01,
weight decay 5e-3 (momentum 0.9 is our choice; the paper does not give it). The paper's batch size
16 is kept as the default. When a teacher's block k differs from the student's in shape, a 1x1-conv
+ resize adapter replaces the SE filter (the paper assumes equal shapes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from ..backbones import split_model
from ..backbones.blocks import BlockNet, eval_mode
from ..errors import KamalError
from ..events import BlockConverged, BlockDiagnosed, BranchPlanChosen, RunWarning, StageStarted
from ..filters import FeatureAdapter, build_filter, filter_spec
from ..profile import count_parameters
from ..relatedness import channel_alignment, feature_cka, knowledge_share, least_squares_map, reference_losses
from ..targetnet import (Branch, BranchSizes, BranchSpec, TargetNet, TaskGroup, choose_branch_points,
                         fit_branch_plan)
from ..training import (AUGMENTATIONS, autocast, consistent_views, poly_schedule, set_mode, task_losses,
                        task_probabilities)
from . import MethodInfo, MethodResult, Param
from .common import RunContext, copy_module, loss_dict, steps_per_epoch


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
    teacher_shapes: list[list[tuple[int, ...]]]  # teacher_shapes[n][k-1]: (C, H, W) of teacher n's block k

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
    return PairedBlocks(student_net, teacher_nets, student_shapes, specs, teacher_shapes)


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


PROBE_BATCH = 64  # images per forward pass of the probe (the features are kept on the CPU)


@torch.no_grad()
def probe_features(ctx: RunContext, paired: PairedBlocks, k: int, idx: torch.Tensor, active: list[int]
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The student's block-k feature ``F_u^k`` and every active teacher's own ``F_n^k`` on images ``idx``
    (each network sees them preprocessed its own way), in eval mode, as float32 on the CPU."""
    students, teachers = [], {n: [] for n in active}
    with eval_mode(paired.student):
        for start in range(0, len(idx), PROBE_BATCH):
            x = ctx.images.images[idx[start:start + PROBE_BATCH]].to(ctx.device)
            feature = ctx.student_preprocessing(x)
            for block in list(paired.student.blocks)[:k]:
                feature = block(feature)
            students.append(feature.float().cpu())
            for n in active:
                feature = ctx.selection.teachers[n].preprocessing(x)
                for block in list(paired.teachers[n].blocks)[:k]:
                    feature = block(feature)
                teachers[n].append(feature.float().cpu())
    return torch.cat(students), {n: torch.cat(f) for n, f in teachers.items()}


def choose_filter(p: dict, student_shape, teacher_shape, aligned: float) -> dict:
    """The spec of the filter f_k^n: the paper's SE gate (``filter = "se"``), a 1x1-conv adapter
    (``"adapter"``), or by measurement (``"auto"``): the SE gate where the shapes match and the student's
    channels stand for the teacher's (channel alignment ≥ ``aligned_threshold``; a gate can only rescale
    channels), an adapter where they do not."""
    kind = p["filter"]
    if kind == "auto":
        kind = "se" if aligned >= p["aligned_threshold"] else "adapter"
    return filter_spec(student_shape, teacher_shape, p["reduction"], kind)


def new_filter(spec: dict, p: dict, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.nn.Module:
    """A fresh filter; an adapter starts as the least-squares 1x1 map from the student's probe feature to
    the teacher's (``adapter_init = "least-squares"``) or as the identity on channels (``"identity"``)."""
    module = build_filter(spec)
    if isinstance(module, FeatureAdapter):
        if p["adapter_init"] == "least-squares":
            module.set_map(*least_squares_map(student_feature.cpu(), teacher_feature.cpu()))
        else:
            module.set_identity()
    return module


def feature_distance(filtered: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Dist of Eq. 5: the mean squared difference relative to the teacher feature's mean square, so that
    blocks of any magnitude weigh alike (the paper's objection to Eq. 5 is exactly those magnitudes)."""
    filtered, teacher = filtered.float(), teacher.float()
    return (filtered - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-8)


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
    task_index = {n: [i for i, t in enumerate(selection.tasks) if t.teacher == n] for n in active}
    n_tasks = len(selection.tasks)
    images, batch = ctx.images, p["batch_size"]
    spe = steps_per_epoch(len(images), batch)
    round_steps = p["epochs_per_block"] * spe
    total = n_blocks * p["max_rounds_per_block"] * round_steps + p["finetune_epochs"] * spe
    augment, weight = p["augment"], p["feature_weight"]

    ctx.student.to(device)
    for t in teachers:
        t.model.to(device)
    set_mode([], [t.model for t in teachers])

    state = ctx.checkpoint.load() or {}
    blocks_done = state.get("blocks_done", 0)
    converged: dict[str, list[float]] = state.get("converged", {t.name: [] for t in selection.tasks})
    diagnosis: dict = state.get("diagnosis", {"blocks": []})
    filters: dict[tuple[int, int], torch.nn.Module] = {}
    if blocks_done:
        specs[:] = state["specs"]
        ctx.student.load_state_dict(state["student"])
        filters = restore_filters(state["filters"], specs, device)
    for k, block_diagnosis in enumerate(diagnosis["blocks"][:blocks_done], 1):  # resumed: what the finished blocks gave
        name = student_net.block_names[k - 1]
        ctx.emit(BlockConverged(k, name, {task: losses[k - 1] for task, losses in converged.items()}))
        ctx.emit(BlockDiagnosed(k, name, block_diagnosis["teachers"]))
    loop = ctx.loop(total - state.get("skipped_steps", 0), state.get("step", 0))
    skipped = state.get("skipped_steps", 0)
    targets_all = torch.cat(ctx.targets, 1)
    floors, priors = reference_losses(targets_all, selection.tasks)
    probe = torch.randperm(len(images), generator=torch.Generator().manual_seed(ctx.seed))[:p["diagnose_images"]]

    def teacher_views(x: torch.Tensor, k: int, need_targets: bool = True):
        """Each teacher's own F_n^k on the views ``x`` (k ≥ 1), and with ``need_targets`` the soft targets of
        every selected output on them (the teachers then run to their heads)."""
        with torch.no_grad():
            probs, features = [], {}
            for n in active:
                net = teacher_nets[n]
                f = selection.teachers[n].preprocessing(x)
                for j, block in enumerate(net.blocks, 1):
                    if j > k and not need_targets:
                        break
                    f = block(f)
                    if j == k:
                        features[n] = f
                if need_targets:
                    probs.append(task_probabilities(net.head(f)[:, outputs_of[n]], tasks_of[n]))
            return (torch.cat(probs, 1) if need_targets else None), features

    def student_feature(k: int, x: torch.Tensor) -> torch.Tensor:
        xs = ctx.student_preprocessing(x)
        with torch.no_grad():
            for block in list(student_net.blocks)[:k - 1]:
                xs = block(xs)
        return student_net.blocks[k - 1](xs)

    def forward_tasks(k: int, x: torch.Tensor, fk: dict[int, torch.nn.Module]) -> torch.Tensor:
        """Per-task logits of Eq. 6: student block k entangled with every teacher through f_k^n."""
        feature = student_feature(k, x)
        logits = [teacher_nets[n].forward_from(k, fk[n](feature))[:, outputs_of[n]] for n in active]
        return torch.cat(logits, 1)

    def block_step(k, fk, optimizer, schedule, generator):
        """One SGD step on Eq. 7 (+ λ·Eq. 5 when ``feature_weight`` > 0) on consistent views."""
        def step(idx):
            if augment == "none" and weight == 0:
                per_task = ctx.batch_losses(lambda x: forward_tasks(k, x, fk), idx)
                feature_terms = None
            else:
                with autocast(device, ctx.precision):
                    x = consistent_views(images.images[idx], generator, augment).to(device)
                    if augment == "none":  # the teachers' predictions on these very images are precomputed
                        targets = ctx.all_targets(idx)
                        _, teacher_f = teacher_views(x, k, need_targets=False)
                    else:
                        targets, teacher_f = teacher_views(x, k)
                    feature = student_feature(k, x)
                    filtered = {n: fk[n](feature) for n in active}
                    logits = torch.cat([teacher_nets[n].forward_from(k, filtered[n])[:, outputs_of[n]]
                                        for n in active], 1)
                per_task = task_losses(logits, targets, selection.tasks)
                feature_terms = ([feature_distance(filtered[n], teacher_f[n]) for n in active] if weight > 0
                                 else None)
            loss = per_task.sum() / n_tasks
            if feature_terms:
                loss = loss + weight * torch.stack(feature_terms).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            out = loss_dict(loss, per_task, selection)
            if feature_terms:
                out.update({f"feature:{teachers[n].name}": float(v) for n, v in zip(active, feature_terms)})
            return out
        return step

    def converged_losses(k: int, fk) -> torch.Tensor:
        """Eq. 7's per-task loss with the block's current weights, eval mode, the whole unlabeled set."""
        set_mode([], [student_net.blocks[k - 1], *fk.values()])
        sums = torch.zeros(n_tasks)
        with torch.no_grad():
            for start in range(0, len(images), 128):
                ctx.cancel.check()
                idx = torch.arange(start, min(start + 128, len(images)))
                sums += ctx.batch_losses(lambda x: forward_tasks(k, x, fk), idx).cpu() * len(idx)
        return sums / len(images)

    for k in range(blocks_done + 1, n_blocks + 1):
        name = student_net.block_names[k - 1]
        torch.manual_seed(ctx.phase_seed(k))
        before_u, before_t = probe_features(ctx, paired, k, probe, active)
        related = {n: feature_cka(before_u, before_t[n]) for n in active}
        aligned = {n: channel_alignment(before_u, before_t[n]) for n in active}
        for n in active:
            specs[k - 1][n] = choose_filter(p, paired.student_shapes[k - 1], paired.teacher_shapes[n][k - 1],
                                            aligned[n])
        fk = {n: new_filter(specs[k - 1][n], p, before_u, before_t[n]).to(device) for n in active}
        block = student_net.blocks[k - 1]
        generator = torch.Generator().manual_seed(ctx.phase_seed(k))
        best, best_state, rounds = None, None, 0
        for r in range(1, p["max_rounds_per_block"] + 1):
            ctx.emit(StageStarted("amalgamate", k, name, n_blocks, p["epochs_per_block"], round_steps))
            set_mode([block, *fk.values()], [*list(student_net.blocks)[:k - 1]])
            trainable = [q for m in (block, *fk.values()) for q in m.parameters()]
            optimizer = ctx.sgd(trainable, p["lr"])
            schedule = poly_schedule(optimizer, round_steps, p["poly_power"])
            step = block_step(k, fk, optimizer, schedule, generator)
            for epoch in range(1, p["epochs_per_block"] + 1):
                loop.run_epoch(images.batches(batch, generator), step, "amalgamate", k, (r - 1) * p["epochs_per_block"] + epoch)
            losses = converged_losses(k, fk)
            rounds = r
            mean = float(losses.mean())
            improved = best is None or mean < float(best.mean())
            gain = 1.0 if best is None else (float(best.mean()) - mean) / max(float(best.mean()), 1e-12)
            if improved:
                best = losses
                best_state = copy.deepcopy([block.state_dict(), {n: f.state_dict() for n, f in fk.items()}])
            remaining = sum(1 - knowledge_share(float(best[i]), float(floors[i]), float(priors[i]))
                            for i in range(n_tasks)) / n_tasks
            if (not improved or gain < p["converge_tolerance"] or remaining < p["converge_tolerance"]
                    or r == p["max_rounds_per_block"]):
                break
        if best_state is not None and rounds > 1:  # a round that made it worse is undone
            block.load_state_dict(best_state[0])
            for n, f in fk.items():
                f.load_state_dict(best_state[1][n])
        left = (p["max_rounds_per_block"] - rounds) * round_steps
        skipped += left
        loop.state.total_steps -= left
        values = {t.name: float(v) for t, v in zip(selection.tasks, best)}
        for task, value in values.items():
            converged[task].append(value)
        after_u, after_t = probe_features(ctx, paired, k, probe, active)
        set_mode([], [block, *fk.values()])
        with torch.no_grad():
            reached = {n: feature_cka(torch.cat([fk[n](chunk.to(device)).float().cpu()
                                                 for chunk in after_u.split(PROBE_BATCH)]), after_t[n])
                       for n in active}
        shares = [knowledge_share(float(best[i]), float(floors[i]), float(priors[i])) for i in range(n_tasks)]
        diagnosis["blocks"].append({
            "block": name, "rounds": rounds,
            "teachers": {teachers[n].name: {
                "filter": specs[k - 1][n]["kind"], "related_before": round(related[n], 4),
                "aligned_before": round(aligned[n], 4),
                "related_after": round(reached[n], 4),
                "share": round(sum(shares[i] for i in task_index[n]) / len(task_index[n]), 4),
                "gap": round(sum(float(best[i] - floors[i]) for i in task_index[n]) / len(task_index[n]), 5),
            } for n in active},
            "tasks": {t.name: {"loss": round(float(best[i]), 5), "floor": round(float(floors[i]), 5),
                               "share": round(shares[i], 4)} for i, t in enumerate(selection.tasks)},
        })
        ctx.emit(BlockConverged(k, name, values))
        ctx.emit(BlockDiagnosed(k, name, diagnosis["blocks"][-1]["teachers"]))
        filters.update({(k, n): f for n, f in fk.items()})
        ctx.checkpoint.save({
            "blocks_done": k, "step": loop.state.step, "skipped_steps": skipped, "converged": converged,
            "student": ctx.student.state_dict(), "specs": specs, "diagnosis": diagnosis,
            "filters": filters_state(filters),
        })

    names = student_net.block_names
    eq9 = choose_branch_points(converged)
    sizes = branch_sizes(student_net, teacher_nets, filters, n_blocks)
    teacher_of = {t.name: t.teacher for t in selection.tasks}
    budget = None
    if p["max_size"] > 0:
        budget = int(p["max_size"] * sum(count_parameters(teachers[n].model) for n in active))
    plan, how = fit_branch_plan(eq9, converged, teacher_of, sizes, budget)
    ctx.emit(BranchPlanChosen({task: names[k - 1] for task, k in plan.items()}))

    def build(plan_):
        return assemble(plan_, list(student_net.blocks), names, teacher_nets, filters, specs, selection, granularity)

    warnings = knowledge_warnings(diagnosis, plan, selection, names, p["warn_share"])
    for message in warnings:
        ctx.emit(RunWarning(message))
    report = {
        "granularity": granularity,
        "blocks": names,
        "converged_loss": {task: dict(zip(names, losses)) for task, losses in converged.items()},
        "branch_points": {task: names[k - 1] for task, k in plan.items()},
        "branch_plan": {"rule": how, "eq9": {task: names[k - 1] for task, k in eq9.items()},
                        "eq9_parameters": sizes.size(eq9, teacher_of), "budget_parameters": budget,
                        "parameters": sizes.size(plan, teacher_of)},
        "diagnosis": {**diagnosis, "floor": {t.name: round(float(f), 5) for t, f in zip(selection.tasks, floors)},
                      "warnings": warnings},
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
            if augment == "none":
                return ctx.soft_target_step(lambda x: net(ctx.student_preprocessing(x)), idx, optimizer, schedule)
            with autocast(device, ctx.precision):
                x = consistent_views(images.images[idx], generator, augment).to(device)
                targets, _ = teacher_views(x, 0)
                per_task = task_losses(net(ctx.student_preprocessing(x)), targets, selection.tasks)
            loss = per_task.sum() / n_tasks
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            return loss_dict(loss, per_task, selection)

        for epoch in range(1, p["finetune_epochs"] + 1):
            loop.run_epoch(images.batches(batch, generator), finetune_step, "finetune", None, epoch)
        ctx.checkpoint.save({**(ctx.checkpoint.load() or {}), "finetuned": True, "step": loop.state.step,
                             "targetnet": net.state_dict()})
    net.eval()
    return MethodResult(net, granularity, report)


def branch_sizes(student_net: BlockNet, teacher_nets: list[BlockNet], filters: dict, n_blocks: int) -> BranchSizes:
    """The parameter counts :meth:`BranchSizes.size` adds up for a plan (Eq. 10's parts)."""
    tails = []
    for net in teacher_nets:
        per_block = [count_parameters(b) for b in net.blocks]
        head = count_parameters(net.head)
        tails.append([sum(per_block[k:]) + head for k in range(1, n_blocks + 1)])
    return BranchSizes([count_parameters(b) for b in student_net.blocks], tails,
                       {key: count_parameters(f) for key, f in filters.items()})


def knowledge_warnings(diagnosis: dict, plan: dict[str, int], selection, names: list[str], threshold: float
                       ) -> list[str]:
    """A plain sentence for every teacher whose knowledge does not get through at its branch block(s):
    the share of :func:`~kamal_engine.relatedness.knowledge_share` below ``threshold``."""
    out = []
    for n, teacher in enumerate(selection.teachers):
        blocks = sorted({plan[t.name] for t in selection.tasks_of(n)})
        if not blocks:
            continue
        rows = [diagnosis["blocks"][k - 1]["teachers"][teacher.name] for k in blocks]
        share = min(r["share"] for r in rows)
        if share >= threshold:
            continue
        every = [b["teachers"][teacher.name]["share"] for b in diagnosis["blocks"]]
        where = ("at every block" if max(every) < threshold else
                 f"at its branch block{'s' if len(blocks) > 1 else ''} {', '.join(names[k - 1] for k in blocks)}")
        out.append(f"the student reproduces {teacher.name} only {share:.0%} of the way {where} (its labels' converged "
                   f"loss stays {max(r['gap'] for r in rows):.3f} above the teacher's own entropy; linear CKA of the "
                   f"features {min(r['related_before'] for r in rows):.2f}): its labels may end below the teacher's; "
                   "see 'Teachers trained apart' in the README for what to try")
    return out


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
        Param("epochs_per_block", 3, "epochs over the unlabeled images in one round of training a student block (a "
              "poly decay from lr to 0)", minimum=1),
        Param("max_rounds_per_block", 2, "rounds of epochs_per_block epochs per block at most: Algorithm 1 trains a "
              "block to convergence, so another round follows until the block has converged (a round that makes it "
              "worse is undone); 1: the paper's fixed epoch count", minimum=1),
        Param("converge_tolerance", 0.02, "a block has converged when the student is within this share of the "
              "teachers' knowledge (mean 1 - knowledge share over the tasks) or when a round lowered the block's "
              "converged loss by less than this fraction", minimum=0.0),
        Param("finetune_epochs", 6, "epochs fine-tuning the branched TargetNet (0: none)", minimum=0),
        Param("batch_size", 16, "images per step (paper: 16)", minimum=2),
        Param("lr", 0.01, "base learning rate of the block-wise training (paper: 0.01, poly policy)", minimum=0.0),
        Param("finetune_lr", 0.01, "base learning rate of the fine-tuning (paper: the same base rate)", minimum=0.0),
        Param("momentum", 0.9, "SGD momentum", minimum=0.0),
        Param("weight_decay", 5e-3, "weight decay (paper: 5e-3)", minimum=0.0),
        Param("poly_power", 0.9, "power of the poly learning-rate policy (paper: 0.9)", minimum=0.0),
        Param("filter", "auto", "teacher-level filter f_k^n: 'se' (the paper's channel gate, Eq. 4; an adapter only "
              "where the shapes differ), 'adapter' (a 1x1 convolution, which can re-map channels), 'auto' (per teacher "
              "and block: the SE gate where the student's channels stand for the teacher's, channel alignment ≥ "
              "aligned_threshold, else an adapter)", choices=("auto", "se", "adapter")),
        Param("aligned_threshold", 0.2, "with filter = 'auto': channel alignment between the student's and a "
              "teacher's block feature (the share of the teacher feature a per-channel rescaling explains) at and "
              "above which the SE gate is used", minimum=0.0),
        Param("adapter_init", "least-squares", "how an adapter starts: 'least-squares' (the best 1x1 map from the "
              "student's feature to the teacher's on the probe images) or 'identity'",
              choices=("least-squares", "identity")),
        Param("feature_weight", 0.0, "weight of Eq. 5's feature term, the filtered student feature against the "
              "teacher's own (relative squared distance), added to Eq. 7 (0: Eq. 7 alone, as the paper)",
              minimum=0.0),
        Param("augment", "none", "consistent augmentation: the teachers predict on the very view the student gets "
              "('shift': ±4 pixels; 'shift+flip' adds horizontal flips; 'none': the images as they are, the "
              "teachers' predictions computed once)", choices=AUGMENTATIONS),
        Param("max_size", 1.0, "the TargetNet has at most this many times the summed parameters of the teachers it "
              "learns from (tasks of a teacher then share one branch point); 0: Eq. 10 as it falls", minimum=0.0),
        Param("diagnose_images", 512, "unlabeled images on which the features' relatedness (linear CKA) is measured "
              "and adapters are started", minimum=16),
        Param("warn_share", 0.9, "warn when the student reproduces less than this share of a teacher's knowledge at "
              "its branch block (1 - converged-loss gap / the gap of a prediction that ignores the image)",
              minimum=0.0),
        Param("reduction", 4, "channel reduction r of the teacher-level filters (c -> c/r)", minimum=1),
        Param("ap_by_block", True, "with a validation set: AP of every task branching at each block (paper Fig. 3)"),
    ),
    run=run,
    branches=True,
)
